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
