"""Slice-wise inference: a volume in, a label map on the input's exact grid out (and, on request, confidence maps).

Slices go through the network in batches, channels-last, under ``torch.inference_mode`` and bf16 autocast where
the hardware has it; each batch's probabilities are mapped back to the input grid and reduced to uint8 labels at
once, so float32 probabilities never exist for the whole volume unless asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from .errors import PathLike
from .geometry import PreparedVolume, SliceGeometry, prepare_volume
from .images import read_image
from .modelfile import LoadedModel, load_model
from .networks import discriminator_input
from .runtime import autocast, resolve_device, resolve_precision, to_device

# Pixels in one batch of slices. On a CPU a batch whose activations stay near the caches is fastest: on the 2-core
# Zen 4 development machine, batches of 2**18 pixels (2 slices of 320 x 320, 1 of 512 x 512) ran 1.27x and 1.38x
# faster than batches of 16 and 8 (docs/speed.md, "Why the code is as it is"). A GPU wants large batches; 2**21
# pixels keeps a batch's activations a few hundred MiB (about 585 bytes a pixel at width 32 in bf16).
MAX_BATCH_PIXELS = {"cpu": 2**18, "gpu": 2**21}


def batch_size_for(slice_pixels: int, device: torch.device, requested: int) -> int:
    """The batch size for slices of ``slice_pixels``: ``requested``, capped by the device's pixel budget."""
    budget = MAX_BATCH_PIXELS["cpu" if device.type == "cpu" else "gpu"]
    return max(1, min(requested, budget // slice_pixels))


@dataclass
class SegmentationResult:
    """The outputs of ``segment``, each on exactly the input image's grid."""

    labels: sitk.Image
    confidence: Optional[sitk.Image] = None
    probabilities: Optional[sitk.Image] = None


def pad_as_in_training(x: torch.Tensor, slice_size: Optional[tuple[int, int]], fill: float, multiple: int
                       ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Slices (B, C, h, w) centred in what training showed the network, and where they start (top, left).

    Training pads a slice smaller than the model's slice size to that size, centred, with the volume's minimum
    (``data.SliceDataset``). Inference must do the same: a network that only ever saw such borders segments
    badly when a slice arrives unpadded, or padded another way (measured on hippocampus MRI with 64 x 64
    training slices: mean Dice 0.22 without this padding, 0.84 with it). A side longer than the training size
    is padded with the same value up to a multiple of ``multiple``.
    """
    h, w = x.shape[-2:]
    if slice_size is None:
        return x, (0, 0)
    targets = [size if n <= size else -(-n // multiple) * multiple for n, size in zip((h, w), slice_size)]
    top, left = (targets[0] - h) // 2, (targets[1] - w) // 2
    if targets == [h, w]:
        return x, (0, 0)
    padded = F.pad(x, (left, targets[1] - w - left, top, targets[0] - h - top), value=fill)
    return padded, (top, left)


def predict_slices(segmenter: nn.Module, slices: np.ndarray, *, batch_size: int, device: torch.device,
                   dtype: torch.dtype, confidence_net: Optional[nn.Module] = None,
                   slice_size: Optional[tuple[int, int]] = None, fill: float = 0.0,
                   ) -> Iterator[tuple[int, torch.Tensor, Optional[torch.Tensor]]]:
    """Yield (first slice index, probabilities (B, C, H, W) float32, confidence (B, 1, H, W) or None) per batch.

    ``slices`` is (N, H, W), already normalised. Each batch is padded as in training (``pad_as_in_training``:
    to ``slice_size`` with ``fill``) and the results cropped back to (H, W). Confidence is sigmoid(D(S(X))) when
    a confidence net is given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    was_training = segmenter.training
    segmenter.eval()
    multiple = int(getattr(segmenter, "multiple", 1))
    height, width = slices.shape[1:]
    try:
        with torch.inference_mode():
            for start in range(0, len(slices), batch_size):
                batch = torch.from_numpy(np.asarray(slices[start:start + batch_size], dtype=np.float32))
                x, (top, left) = pad_as_in_training(batch[:, None], slice_size, fill, multiple)
                x = to_device(x, device)
                with autocast(device, dtype):
                    logits = segmenter(x)
                probabilities = torch.softmax(logits.float(), dim=1)
                confidence = None
                if confidence_net is not None:
                    with autocast(device, dtype):
                        seen = discriminator_input(confidence_net, probabilities, x)
                        confidence = torch.sigmoid(confidence_net(seen).float())
                    confidence = confidence[..., top:top + height, left:left + width]
                yield start, probabilities[..., top:top + height, left:left + width], confidence
    finally:
        segmenter.train(was_training)


def segment(image: Union[sitk.Image, PathLike], model: Union[LoadedModel, PathLike], *, batch_size: int = 16,
            device: str = "auto", precision: str = "auto", confidence: bool = False, probabilities: bool = False,
            progress: Optional[Callable[[int, int], None]] = None) -> SegmentationResult:
    """Segment one volume with a trained model; the labels carry the model's label values, as uint8.

    ``confidence`` adds the confidence map sigmoid(D(S(X))) (needs a model saved with its confidence network);
    ``probabilities`` adds the class probabilities as a vector image (float32 for the whole volume: opt-in).
    ``progress(done, total)`` is called after each batch of slices. Batches hold at most ``MAX_BATCH_PIXELS``
    of the device.
    """
    source = None if isinstance(image, sitk.Image) else image
    if source is not None:
        image = read_image(source)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    if confidence and loaded.confidence is None:
        raise ValueError("this model file holds no confidence network, so it cannot give a confidence map")
    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    segmenter = loaded.segmenter.to(torch_device, memory_format=torch.channels_last)
    confidence_net = loaded.confidence.to(torch_device) if confidence else None

    prepared = prepare_volume(image, SliceGeometry.from_dict(loaded.header["geometry"]), source=source)
    values = torch.tensor([c["value"] for c in loaded.header["classes"]], dtype=torch.uint8, device=torch_device)
    n = prepared.num_slices
    labels: Optional[np.ndarray] = None
    confidence_slices: Optional[np.ndarray] = None
    probability_slices: Optional[np.ndarray] = None
    batch_size = batch_size_for(math.prod(prepared.image.shape[1:]), torch_device, batch_size)
    geometry = SliceGeometry.from_dict(loaded.header["geometry"])
    for start, probs, conf in predict_slices(segmenter, prepared.image, batch_size=batch_size,
                                             device=torch_device, dtype=dtype, confidence_net=confidence_net,
                                             slice_size=geometry.size, fill=prepared.minimum):
        back = to_input_grid_slices(prepared, probs)  # stays on the device: only uint8 labels travel back
        if labels is None:
            labels = np.empty((n, *back.shape[-2:]), dtype=np.uint8)
        stop = start + len(back)
        labels[start:stop] = values[class_indices(back)].cpu().numpy()
        if conf is not None:
            if confidence_slices is None:
                confidence_slices = np.empty((n, *back.shape[-2:]), dtype=np.float32)
            confidence_slices[start:stop] = to_input_grid_slices(prepared, conf).cpu()[:, 0].numpy()
        if probabilities:
            if probability_slices is None:
                probability_slices = np.empty((back.shape[1], n, *back.shape[-2:]), dtype=np.float32)
            probability_slices[:, start:stop] = back.permute(1, 0, 2, 3).cpu().numpy()
        if progress is not None:
            progress(stop, n)
    assert labels is not None, "a prepared volume always has at least one slice"
    return SegmentationResult(
        labels=to_input_image(prepared, labels),
        confidence=None if confidence_slices is None else to_input_image(prepared, confidence_slices),
        probabilities=None if probability_slices is None else _compose(prepared, probability_slices),
    )


def class_indices(maps: torch.Tensor) -> torch.Tensor:
    """``maps.argmax(1)`` for (B, K, H, W) maps, as K - 1 elementwise passes (ties go to the lower class, as in
    argmax). Why: on the CPU, torch's argmax over the channels of an NCHW tensor is about 15x slower (114 ms vs
    7 ms for 16 x 2 x 320 x 320), 7% of ``segment()`` on a 320 x 320 volume."""
    best = maps[:, 0]
    indices = torch.zeros(best.shape, dtype=torch.long, device=maps.device)
    for k in range(1, maps.shape[1]):
        indices.masked_fill_(maps[:, k] > best, k)
        best = torch.maximum(best, maps[:, k])
    return indices


def _compose(prepared: PreparedVolume, per_class: np.ndarray) -> sitk.Image:
    """A vector image with one component per class, on the input grid."""
    return sitk.Compose([to_input_image(prepared, channel) for channel in per_class])


def to_input_grid_slices(prepared: PreparedVolume, values: torch.Tensor) -> torch.Tensor:
    """The inverse of ``prepare_volume`` for per-slice maps: (B, K, H, W) on the prepared grid -> (B, K, H0, W0)
    float32 on the canonical input slice grid, by bilinear interpolation with the exact index mapping
    j = i * old_spacing / new_spacing.

    Done in torch rather than SimpleITK so inference streams batches of slices and never holds float32
    probabilities for a whole volume.
    """
    if values.dim() != 4 or tuple(values.shape[-2:]) != tuple(prepared.image.shape[1:]):
        raise ValueError(f"expected (B, K, {prepared.image.shape[1]}, {prepared.image.shape[2]}) maps on the "
                         f"prepared grid, got {tuple(values.shape)}")
    coords = []
    for k in (0, 1):
        old_n, new_n = prepared.input_slice_size[k], values.shape[2 + k]
        ratio = prepared.input_slice_spacing[k] / prepared.slice_spacing[k]
        j = torch.arange(old_n, dtype=torch.float64) * ratio
        coords.append(2 * j / (new_n - 1) - 1 if new_n > 1 else torch.zeros_like(j))
    rows, cols = torch.meshgrid(coords[0], coords[1], indexing="ij")
    grid = torch.stack((cols, rows), dim=-1).to(device=values.device, dtype=torch.float32)
    grid = grid.unsqueeze(0).expand(values.shape[0], -1, -1, -1)
    return F.grid_sample(values.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)

def to_input_image(prepared: PreparedVolume, slices: np.ndarray) -> sitk.Image:
    """The inverse of ``prepare_volume`` for a whole volume: an (N, H0, W0) array on the canonical input slice
    grid (uint8 labels or float32 maps) as an image on exactly the input's grid (size, spacing, origin,
    direction)."""
    expected = (prepared.num_slices, *prepared.input_slice_size)
    if tuple(slices.shape) != expected:
        raise ValueError(f"expected slices of shape {expected} on the input slice grid, "
                         f"got {slices.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(slices, 0, prepared.slice_axis)))
    image.SetSpacing(prepared.canonical_spacing)
    image.SetOrigin(prepared.canonical_origin)
    image.SetDirection(prepared.canonical_direction)
    image = sitk.DICOMOrient(image, prepared.input_orientation)
    if (image.GetSize() != prepared.input_size
            or not np.allclose(image.GetDirection(), prepared.input_direction, atol=1e-6)):
        raise RuntimeError("reorienting back to the input did not restore its grid; this is a bug")
    image.SetSpacing(prepared.input_spacing)
    image.SetOrigin(prepared.input_origin)
    image.SetDirection(prepared.input_direction)
    return image
