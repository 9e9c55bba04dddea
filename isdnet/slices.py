"""Training slices: prepared volumes cached on disk, a torch Dataset of fixed-size crops, augmentation, and each
epoch's batches."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .config import TrainConfig
from .distributed import ProcessGroup
from .errors import PathLike
from .runtime import to_device


@dataclass
class CachedVolume:
    """A prepared volume's slices memory-mapped from a cache: ``image`` float16, ``label`` uint8 or None."""

    image: np.ndarray
    label: Optional[np.ndarray]
    minimum: float

    @property
    def num_slices(self) -> int:
        """Number of slices N."""
        return int(self.image.shape[0])


def cache_volumes(volumes: Iterable[Any], folder: PathLike) -> list[CachedVolume]:
    """Write each volume's slices to ``folder`` (image float16, label uint8 .npy) and map them back
    read-only, so a training set larger than memory only loads the slices in use."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cached = []
    for i, volume in enumerate(volumes):
        image_path = folder / f"{i:05d}_image.npy"
        np.save(image_path, np.asarray(volume.image).astype(np.float16))
        label_path = None
        if volume.label is not None:
            label_path = folder / f"{i:05d}_label.npy"
            np.save(label_path, np.asarray(volume.label, dtype=np.uint8))
        image = np.load(image_path, mmap_mode="r")
        cached.append(CachedVolume(image=image, minimum=float(image.min()),
                                   label=None if label_path is None else np.load(label_path, mmap_mode="r")))
    return cached


class SliceDataset(torch.utils.data.Dataset):
    """The 2D slices of prepared (or cached) volumes, cropped or padded to ``size``: items are
    ``(image (1, H, W) float32, label (H, W) int64)`` when ``labeled``, else ``(image,)``.

    Larger slices are cropped (random offsets when ``random_crop``, from a generator seeded by ``seed``; else
    centred); smaller ones are padded, centred, with the volume's minimum value (labels with 0).
    ``slice_volume_index[i]`` is the volume slice i comes from.
    """

    def __init__(self, volumes: Sequence[Any], size: Any, labeled: bool, random_crop: bool, seed: int = 0):
        self.volumes = list(volumes)
        pair = [size, size] if isinstance(size, int) else list(size)
        if len(pair) != 2 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in pair):
            raise ValueError(f"slice size must be two positive integers, got {size!r}")
        self.size = (int(pair[0]), int(pair[1]))
        self.labeled = labeled
        self.random_crop = random_crop
        self.rng = np.random.default_rng(seed)
        if labeled and any(v.label is None for v in self.volumes):
            raise ValueError("a labeled slice dataset needs a label for every volume")
        self.minimums = [float(v.minimum) if hasattr(v, "minimum") else float(np.min(v.image))
                         for v in self.volumes]
        self.slice_volume_index: list[int] = []
        self.slice_index: list[int] = []
        for vi, volume in enumerate(self.volumes):
            n = int(volume.image.shape[0])
            self.slice_volume_index += [vi] * n
            self.slice_index += range(n)
        self._foreground: Optional[np.ndarray] = None

    @property
    def foreground(self) -> np.ndarray:
        """Per slice, True when its whole label (before any crop) holds a class other than 0."""
        if not self.labeled:
            raise ValueError("an unlabeled slice dataset has no foreground")
        if self._foreground is None:
            self._foreground = np.concatenate([np.asarray(v.label).reshape(v.label.shape[0], -1).any(1)
                                               for v in self.volumes]) if self.volumes else np.zeros(0, bool)
        return self._foreground

    def __len__(self) -> int:
        return len(self.slice_index)

    def reseed(self, seed: int) -> None:
        """Restart the random crops from ``seed``, so an epoch's crops do not depend on the epochs before it."""
        self.rng = np.random.default_rng(seed)

    def _window(self, have: int, want: int) -> tuple[int, int, int]:
        """(start in the slice, length taken, offset in the output) along one axis."""
        if have > want:
            start = int(self.rng.integers(0, have - want + 1)) if self.random_crop else (have - want) // 2
            return start, want, 0
        return 0, have, (want - have) // 2

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        vi, si = self.slice_volume_index[i], self.slice_index[i]
        volume = self.volumes[vi]
        height, width = volume.image.shape[1:]
        (r0, rn, ro), (c0, cn, co) = self._window(height, self.size[0]), self._window(width, self.size[1])
        image = np.full(self.size, self.minimums[vi], dtype=np.float32)
        image[ro:ro + rn, co:co + cn] = volume.image[si, r0:r0 + rn, c0:c0 + cn]
        if not self.labeled:
            return (torch.from_numpy(image)[None],)
        label = np.zeros(self.size, dtype=np.int64)
        label[ro:ro + rn, co:co + cn] = volume.label[si, r0:r0 + rn, c0:c0 + cn]
        return torch.from_numpy(image)[None], torch.from_numpy(label)


@dataclass
class Augmentation:
    """One batch's random rotation, scaling and column flip (an affine per sample) and intensity gain and bias,
    drawn once (``draw_augmentation``) so that it can warp images and, alike, their labels or pseudo-labels."""

    theta: torch.Tensor  # (B, 2, 3) output -> input maps in affine_grid's normalised coordinates, float64 CPU
    gain: torch.Tensor  # (B,)
    bias: torch.Tensor  # (B,)

    def apply(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Warp ``images`` (B, 1, H, W) bilinearly and ``labels`` (B, H, W) with nearest neighbours, then change
        the images' intensities; on the images' device."""
        if images.dim() != 4 or images.shape[1] != 1 or len(images) != len(self.theta):
            raise ValueError(f"images must be (B, 1, H, W) with B = {len(self.theta)}, got {tuple(images.shape)}")
        if labels is not None and tuple(labels.shape) != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"labels must be (B, H, W) matching the images, got {tuple(labels.shape)}")
        b, _, h, w = images.shape
        grid = F.affine_grid(self.theta.to(images.device, torch.float32), [b, 1, h, w], align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = out * self.gain.to(out).view(b, 1, 1, 1) + self.bias.to(out).view(b, 1, 1, 1)
        out = out.to(images.dtype)
        if labels is not None:
            moved = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="border",
                                  align_corners=False)
            labels = moved[:, 0].round().long()
        return out, labels


def draw_augmentation(batch: int, height: int, width: int, generator: torch.Generator, *,
                      max_rotation_deg: float = 15.0, scale_range: tuple[float, float] = (0.9, 1.1),
                      flip_prob: float = 0.5, gain_range: tuple[float, float] = (0.9, 1.1), max_bias: float = 0.1
                      ) -> Augmentation:
    """Draw a batch's augmentation, reproducibly from ``generator`` (a CPU generator: the parameters are drawn on
    the CPU, the warp runs on the images' device, so a GPU run does not stall on host-side resampling)."""
    u = torch.rand(batch, 5, generator=generator, dtype=torch.float64)
    angle = (2 * u[:, 0] - 1) * math.radians(max_rotation_deg)
    scale = scale_range[0] + (scale_range[1] - scale_range[0]) * u[:, 1]
    flip = torch.where(u[:, 2] < flip_prob, -1.0, 1.0).to(torch.float64)
    gain = gain_range[0] + (gain_range[1] - gain_range[0]) * u[:, 3]
    bias = (2 * u[:, 4] - 1) * max_bias
    # Output -> input map in pixel units is R(angle) / scale with x flipped; conjugate by the pixel size so
    # the rotation stays a rotation on non-square slices in affine_grid's normalised coordinates.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin * height / width
    theta[:, 1, 0] = sin * flip * width / height
    theta[:, 1, 1] = cos
    return Augmentation(theta, gain, bias)


def augment(images: torch.Tensor, labels: Optional[torch.Tensor], generator: torch.Generator, **ranges: Any
            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Draw an augmentation for this batch (``draw_augmentation``) and apply it to the images and labels."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 1, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    return draw_augmentation(b, h, w, generator, **ranges).apply(images, labels)


class ForegroundBatches(Sampler):
    """Endless batches of slice indices, shuffled from ``seed``, each with at least ``ceil(fraction * batch_size)``
    slices that contain foreground: a batch is drawn from a shuffled stream of ``indices``, and as many of its
    background slices as it lacks are swapped for the next ones of a shuffled stream of the foreground slices.

    Without any foreground slice, the batches are plain shuffled ones.
    """

    def __init__(self, foreground: np.ndarray, indices: Sequence[int], batch_size: int, fraction: float, seed: int):
        self.foreground = np.asarray(foreground, dtype=bool)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size, self.seed = batch_size, seed
        self.needed = min(batch_size, math.ceil(fraction * batch_size - 1e-9))

    @staticmethod
    def _stream(pool: np.ndarray, rng: np.random.Generator) -> Iterator[int]:
        while True:
            yield from (int(i) for i in rng.permutation(pool))

    def __iter__(self) -> Iterator[list[int]]:
        everything = self._stream(self.indices, np.random.default_rng(self.seed))
        pool = self.indices[self.foreground[self.indices]]
        extra = self._stream(pool, np.random.default_rng(self.seed + 1)) if len(pool) else None
        while True:
            batch = [next(everything) for _ in range(self.batch_size)]
            if extra is not None:
                missing = self.needed - int(self.foreground[batch].sum())
                for position in [p for p, i in enumerate(batch) if not self.foreground[i]][:max(0, missing)]:
                    batch[position] = next(extra)
            yield batch


def _shuffled_batches(dataset: SliceDataset, batch_size: int, seed: int, group: ProcessGroup,
                      pin_memory: bool = False, foreground_fraction: float = 0.0) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled batches, the shuffle fixed by ``seed`` so a resumed epoch sees the same batches; with a
    ``foreground_fraction`` (labeled slices only), at least that share of each batch contains foreground
    (``ForegroundBatches``).

    In a distributed run each rank draws from its own shard of the slices (a DistributedSampler). No worker
    processes: a batch is a crop of slices already in memory (0.8 ms for 8 of 128 x 128 here), and workers would
    take cores from the step. ``pin_memory`` (for CUDA) makes the copy to the GPU asynchronous.
    """
    if foreground_fraction > 0 and dataset.labeled:
        shard = np.random.default_rng(seed).permutation(len(dataset))[group.rank::group.world_size] \
            if group.active else np.arange(len(dataset))
        sampler = ForegroundBatches(dataset.foreground, shard, batch_size, foreground_fraction, seed)
        yield from DataLoader(dataset, batch_sampler=sampler, pin_memory=pin_memory)
        return
    if not group.active:
        generator = torch.Generator().manual_seed(seed)
        drop_last = len(dataset) >= batch_size
        while True:
            yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                                  drop_last=drop_last, pin_memory=pin_memory)
    sampler = DistributedSampler(dataset, num_replicas=group.world_size, rank=group.rank, shuffle=True, seed=seed,
                                 drop_last=len(dataset) >= group.world_size * batch_size)
    for pass_index in itertools.count():
        sampler.set_epoch(pass_index)
        yield from DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                              drop_last=len(sampler) >= batch_size, pin_memory=pin_memory)


def epoch_batches(labeled_set: SliceDataset, unlabeled_set: Optional[SliceDataset], config: TrainConfig, epoch: int,
                  device: torch.device, group: ProcessGroup,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[Augmentation]]]:
    """Epoch ``epoch``'s endless (labeled images, labels, unlabeled images or None, their augmentation or None),
    moved to ``device``; fixed by the seed and the epoch, so a resumed epoch replays the same batches.

    Labeled batches come augmented. Unlabeled ones come as they are, with the augmentation drawn for them, which
    the trainer applies (to the pseudo-labels too, when they come from the unaugmented slices). Unlabeled images
    come after the warm-up epochs only. ``config.foreground_fraction`` sets the least share of labeled slices with
    foreground in a batch.
    """
    seed = config.seed * 100_003 + epoch
    pin = device.type == "cuda"
    labeled_set.reseed(seed)
    labeled = _shuffled_batches(labeled_set, config.batch_size, seed, group, pin, config.foreground_fraction)
    unlabeled = None
    if unlabeled_set is not None and epoch > config.warmup_epochs:
        unlabeled_set.reseed(seed + 7)
        unlabeled = _shuffled_batches(unlabeled_set, config.batch_size, seed + 7, group, pin)
    augmenter = torch.Generator().manual_seed(seed + 13)
    augmenter_unlabeled = torch.Generator().manual_seed(seed + 17)  # labeled augmentation independent of it
    while True:
        x_l, y_l = next(labeled)
        x_l, y_l = to_device(x_l, device), y_l.to(device, non_blocking=True)
        x_u = to_device(next(unlabeled)[0], device) if unlabeled is not None else None
        augmentation_u = None
        if config.augment:
            x_l, y_l = augment(x_l, y_l, augmenter)
            if x_u is not None:
                augmentation_u = draw_augmentation(len(x_u), *x_u.shape[-2:], augmenter_unlabeled)
        yield x_l, y_l, x_u, augmentation_u

