"""Training slices (isdnet.slices): crops and padding, the cache, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from volume_helpers import (
    phantom,
)

from isdnet.geometry import (
    SliceGeometry,
    prepare_volume,
)
from isdnet.slices import SliceDataset, augment, cache_volumes

# ----------------------------------------------------------------------------------------------------------
# training slices


class Volume:
    def __init__(self, image: np.ndarray, label: np.ndarray | None):
        self.image, self.label = image, label


def test_slice_dataset_crops_and_pads():
    image = np.arange(2 * 6 * 10, dtype=np.float32).reshape(2, 6, 10)
    label = (image.astype(np.int64) % 3).astype(np.uint8)
    big = Volume(image, label)
    small = Volume(image[:, :3, :4] - 100, label[:, :3, :4])
    data = SliceDataset([big, small], (4, 8), labeled=True, random_crop=False, seed=0)
    assert len(data) == 4 and data.slice_volume_index == [0, 0, 1, 1]
    x, y = data[1]
    assert x.shape == (1, 4, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert np.array_equal(x[0].numpy(), image[1, 1:5, 1:9]) and np.array_equal(y.numpy(), label[1, 1:5, 1:9])
    x, y = data[2]
    assert np.array_equal(x[0, 0:3, 2:6].numpy(), image[0, :3, :4] - 100)
    assert float(x[0, 3, 0]) == float((image[:, :3, :4] - 100).min())
    assert y[3].sum() == 0 and y[:, :2].sum() == 0
    random_data = SliceDataset([big], (4, 8), labeled=False, random_crop=True, seed=3)
    crops = {tuple(random_data[0][0][0, 0, :2].tolist()) for _ in range(30)}
    assert len(crops) > 1
    assert len(random_data[0]) == 1
    for _ in range(10):
        (x,) = random_data[1]
        first = float(x[0, 0, 0])
        r, c = divmod(int(first) - 60, 10)
        assert np.array_equal(x[0].numpy(), image[1, r:r + 4, c:c + 8])
    with pytest.raises(ValueError):
        SliceDataset([Volume(image, None)], (4, 8), labeled=True, random_crop=False)


def test_cache_round_trip(tmp_path):
    image, label = phantom(size_xyz=(20, 18, 5))
    prepared = [prepare_volume(image, SliceGeometry("auto", (1.0, 1.0), (16, 16)), label),
                prepare_volume(image, SliceGeometry("auto", (1.0, 1.0), (16, 16)))]
    cached = cache_volumes(iter(prepared), tmp_path / "cache")
    assert len(cached) == 2 and cached[1].label is None
    assert isinstance(cached[0].image, np.memmap) and cached[0].image.dtype == np.float16
    assert np.array_equal(cached[0].label, prepared[0].label)
    assert np.allclose(cached[0].image, prepared[0].image, atol=1e-2)
    from_memory = SliceDataset(prepared[:1], (16, 16), labeled=True, random_crop=False)
    from_cache = SliceDataset(cached[:1], (16, 16), labeled=True, random_crop=False)
    for i in range(len(from_memory)):
        (xm, ym), (xc, yc) = from_memory[i], from_cache[i]
        assert torch.allclose(xm, xc, atol=1e-2) and torch.equal(ym, yc)


def test_augment_aligned_and_deterministic():
    label = torch.zeros(4, 40, 56, dtype=torch.long)
    label[:, 8:30, 10:25] = 1
    label[:, 15:35, 30:50] = 2
    image = label[:, None].float()
    out1, lab1 = augment(image, label, torch.Generator().manual_seed(5), gain_range=(1, 1), max_bias=0.0)
    out2, lab2 = augment(image, label, torch.Generator().manual_seed(5), gain_range=(1, 1), max_bias=0.0)
    assert torch.equal(out1, out2) and torch.equal(lab1, lab2)
    assert lab1.dtype == torch.long and out1.shape == image.shape
    assert not torch.equal(lab1, label)
    agreement = (out1[:, 0].round().long() == lab1).float().mean()
    assert agreement > 0.97
    # unlabeled batches, default jitter: changed values, still deterministic
    u1, none = augment(image, None, torch.Generator().manual_seed(9))
    u2, _ = augment(image, None, torch.Generator().manual_seed(9))
    assert none is None and torch.equal(u1, u2)
    # pure flip: exact mirror of the columns for image and label alike
    flipped, flipped_label = augment(image, label, torch.Generator().manual_seed(0), max_rotation_deg=0,
                                     scale_range=(1, 1), flip_prob=1.0, gain_range=(1, 1), max_bias=0)
    assert torch.equal(flipped_label, label.flip(-1))
    assert torch.allclose(flipped, image.flip(-1), atol=1e-5)
    same, same_label = augment(image, label, torch.Generator().manual_seed(0), max_rotation_deg=0,
                               scale_range=(1, 1), flip_prob=0.0, gain_range=(2, 2), max_bias=0)
    assert torch.equal(same_label, label) and torch.allclose(same, 2 * image, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# foreground oversampling


def _sparse_phantom_set(seed: int = 0) -> SliceDataset:
    """Two phantom volumes whose label is kept on 6 of their 24 slices only: a quarter of the slices hold
    foreground, as in scans where the structure fills a few slices."""
    import SimpleITK as sitk

    from isdnet.phantoms import make_phantom
    from isdnet.slices import CachedVolume

    volumes = []
    for s in (seed, seed + 1):
        image, label = (sitk.GetArrayFromImage(i) for i in make_phantom(s, shape=(24, 24, 24), num_classes=2))
        label[:9], label[15:] = 0, 0
        assert label[9:15].reshape(6, -1).any(1).all()
        volumes.append(CachedVolume(image=image.astype(np.float16), label=label, minimum=float(image.min())))
    return SliceDataset(volumes, (24, 24), labeled=True, random_crop=False)


def _batches(fraction: float, seed: int, count: int = 20) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from isdnet.config import TrainConfig
    from isdnet.distributed import ProcessGroup
    from isdnet.slices import epoch_batches

    config = TrainConfig(method="baseline", batch_size=8, seed=seed, augment=False, foreground_fraction=fraction)
    batches = epoch_batches(_sparse_phantom_set(), None, config, 1, torch.device("cpu"), ProcessGroup())
    return [next(batches)[:2] for _ in range(count)]


def test_foreground_fraction_sets_the_least_share_of_slices_with_foreground_in_each_batch():
    dataset = _sparse_phantom_set()
    assert dataset.foreground.mean() == pytest.approx(0.25)
    plain = [int(y.flatten(1).any(1).sum()) for _, y in _batches(0.0, seed=3)]
    assert min(plain) < 4, "plain shuffling leaves some batches with fewer than half foreground slices"
    for fraction, least in ((0.5, 4), (0.3, 3), (1.0, 8)):
        shares = [int(y.flatten(1).any(1).sum()) for _, y in _batches(fraction, seed=3)]
        assert min(shares) >= least, (fraction, shares)
    assert max(int(y.flatten(1).any(1).sum()) for _, y in _batches(0.5, seed=3)) < 8, "not every slice forced"
    first, again = _batches(0.5, seed=3, count=5), _batches(0.5, seed=3, count=5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again)), "seeded"
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, _batches(0.5, seed=4, count=5)))


def test_foreground_batches_swap_only_background_slices_and_cope_without_foreground():
    from isdnet.slices import ForegroundBatches

    foreground = np.array([True, False, False, False, False, False, False, False, False, True])
    batches = iter(ForegroundBatches(foreground, range(10), 4, 0.5, seed=0))
    for _ in range(10):
        batch = next(batches)
        assert len(batch) == 4 and foreground[batch].sum() >= 2
    none = iter(ForegroundBatches(np.zeros(10, bool), range(10), 4, 0.5, seed=0))
    assert sorted(next(none) + next(none) + next(none)[:2]) == list(range(10)), "plain shuffled passes"
