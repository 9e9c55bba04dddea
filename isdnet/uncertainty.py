"""Where a model is unsure of a volume: per-voxel uncertainty maps on the input's grid, and the volume's scores.

The maps (``config.UNCERTAINTIES``, each in [0, 1]) are 1 - D's confidence, S's normalised softmax entropy and
the disagreement of S with itself on the slice flipped along its columns. Slices go through ``infer``'s own
preparation, padding and batching (``predict_slices``) and come back with ``to_input_grid_slices``; the flipped
slices are a second ``predict_slices`` pass, in step with the first. A volume's score for a map is its mean over
the voxels S labels foreground (for ``confidence``: the share of them below ``config.LOW_CONFIDENCE``), over all
voxels when S labels none: what ``isdnet rank`` orders volumes by.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import SimpleITK as sitk
import torch

from .config import LOW_CONFIDENCE, UNCERTAINTIES
from .errors import ModelFileError, PathLike
from .geometry import SliceGeometry, prepare_volume
from .images import read_image
from .infer import batch_size_for, class_indices, predict_slices, to_input_grid_slices, to_input_image
from .modelfile import LoadedModel, load_model
from .runtime import resolve_device, resolve_precision


@dataclass
class Analysis:
    """S's labels, the requested uncertainty maps (all on the input's grid) and the volume's score for each."""

    labels: sitk.Image
    maps: dict[str, sitk.Image] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    foreground_voxels: int = 0


def entropy_map(probabilities: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) class probabilities -> (B, 1, H, W) softmax entropy divided by log K: 0 certain, 1 uniform."""
    k = probabilities.shape[1]
    terms = probabilities * probabilities.clamp_min(1e-12).log()
    return (-terms.sum(1, keepdim=True) / math.log(k)).clamp(0.0, 1.0)


def flip_disagreement(probabilities: torch.Tensor, flipped_back: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) twice -> (B, 1, H, W) total variation distance between the two predictions, in [0, 1]."""
    return (0.5 * (probabilities - flipped_back).abs().sum(1, keepdim=True)).clamp(0.0, 1.0)


def available_uncertainties(model: LoadedModel) -> tuple[str, ...]:
    """The maps this model can give: ``confidence`` only when its file holds the confidence network."""
    return tuple(k for k in UNCERTAINTIES if k != "confidence" or model.confidence is not None)


def check_uncertainties(model: LoadedModel, kinds: Sequence[str], source: Optional[PathLike] = None) -> None:
    """Refuse an unknown map, or ``confidence`` from a model file without its confidence network."""
    for kind in kinds:
        if kind not in UNCERTAINTIES:
            raise ValueError(f"unknown uncertainty {kind!r}; choose one of {', '.join(UNCERTAINTIES)}")
    if "confidence" in kinds and model.confidence is None:
        raise ModelFileError(source or "the model", "holds no confidence network, so it gives no confidence-based "
                             f"uncertainty; use {' or '.join(available_uncertainties(model))}")


class _Sums:
    """Running sums of each map over the predicted foreground and over the whole volume."""

    def __init__(self, kinds: Sequence[str]):
        self.foreground = {k: 0.0 for k in kinds}
        self.everywhere = {k: 0.0 for k in kinds}
        self.foreground_voxels = 0
        self.voxels = 0

    def add(self, kind: str, values: torch.Tensor, foreground: torch.Tensor) -> None:
        self.foreground[kind] += float(values[foreground].sum())
        self.everywhere[kind] += float(values.sum())

    def scores(self) -> dict[str, float]:
        if self.foreground_voxels:
            return {k: v / self.foreground_voxels for k, v in self.foreground.items()}
        return {k: v / max(self.voxels, 1) for k, v in self.everywhere.items()}


def _add_batch(prepared: Any, values: torch.Tensor, start: int, probs: torch.Tensor, conf: Optional[torch.Tensor],
               flipped: Optional[Iterator[Any]], kinds: Sequence[str], labels: np.ndarray,
               arrays: dict[str, np.ndarray], sums: _Sums) -> None:
    """One batch of slices: its labels, maps (on the input slice grid) and their sums."""
    back = to_input_grid_slices(prepared, probs)
    indices = class_indices(back)
    stop = start + len(back)
    labels[start:stop] = values[indices].cpu().numpy()
    foreground = values[indices] != 0
    sums.foreground_voxels += int(foreground.sum())
    sums.voxels += foreground.numel()
    batch_maps = {}
    if "entropy" in kinds:
        batch_maps["entropy"] = entropy_map(back)[:, 0]
    if "confidence" in kinds:
        batch_maps["confidence"] = 1.0 - to_input_grid_slices(prepared, conf)[:, 0]
    if flipped is not None:
        flipped_start, flipped_probs, _ = next(flipped)
        assert flipped_start == start, "the two passes go through the same batches"
        batch_maps["flip"] = flip_disagreement(back, to_input_grid_slices(prepared, flipped_probs.flip(-1)))[:, 0]
    for kind, batch_map in batch_maps.items():
        low = (batch_map > 1.0 - LOW_CONFIDENCE).float() if kind == "confidence" else batch_map
        sums.add(kind, low, foreground)
        if kind in arrays:
            arrays[kind][start:stop] = batch_map.cpu().numpy()


def analyse(image: Union[sitk.Image, PathLike], model: Union[LoadedModel, PathLike], *,
            kinds: Optional[Sequence[str]] = None, maps: bool = True, batch_size: int = 16, device: str = "auto",
            precision: str = "auto") -> Analysis:
    """S's labels with the uncertainty maps ``kinds`` (default: all the model can give) and their volume scores.

    ``maps=False`` keeps only the scores (what ranking needs), so no float32 map of the whole volume is held.
    """
    source = None if isinstance(image, sitk.Image) else image
    if source is not None:
        image = read_image(source)
    model_source = None if isinstance(model, LoadedModel) else model
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    kinds = tuple(available_uncertainties(loaded) if kinds is None else kinds)
    check_uncertainties(loaded, kinds, model_source)
    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    segmenter = loaded.segmenter.to(torch_device, memory_format=torch.channels_last)
    confidence_net = loaded.confidence.to(torch_device) if "confidence" in kinds else None
    geometry = SliceGeometry.from_dict(loaded.header["geometry"])
    prepared = prepare_volume(image, geometry, source=source)
    values = torch.tensor([c["value"] for c in loaded.header["classes"]], dtype=torch.uint8, device=torch_device)
    batch_size = batch_size_for(math.prod(prepared.image.shape[1:]), torch_device, batch_size)
    settings = dict(batch_size=batch_size, device=torch_device, dtype=dtype, slice_size=geometry.size,
                    fill=prepared.minimum)
    n, grid = prepared.num_slices, prepared.input_slice_size
    labels = np.empty((n, *grid), dtype=np.uint8)
    arrays = {k: np.empty((n, *grid), dtype=np.float32) for k in kinds} if maps else {}
    sums = _Sums(kinds)
    # The two passes are generators suspended inside inference mode in turn: under one inference mode of our own,
    # and closed within it, each restores the state it found, so neither leaves inference mode on behind us.
    with torch.inference_mode():
        plain = predict_slices(segmenter, prepared.image, confidence_net=confidence_net, **settings)
        flipped = (predict_slices(segmenter, np.ascontiguousarray(prepared.image[:, :, ::-1]), **settings)
                   if "flip" in kinds else None)
        try:
            for start, probs, conf in plain:
                _add_batch(prepared, values, start, probs, conf, flipped, kinds, labels, arrays, sums)
        finally:
            if flipped is not None:
                flipped.close()
            plain.close()
    return Analysis(labels=to_input_image(prepared, labels),
                    maps={k: to_input_image(prepared, a) for k, a in arrays.items()},
                    scores=sums.scores(), foreground_voxels=sums.foreground_voxels)
