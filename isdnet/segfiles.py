"""Slicer segmentation files (``.seg.nrrd``): their segments' names, colours and terminology (read with slicerio,
which exists for this), and their layers flattened into one label map when the segments do not overlap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .config import SEGMENTATION_ENDING
from .errors import InputError, PathLike


@dataclass(frozen=True)
class SegmentInfo:
    """One segment: its value in the label map ISDNet reads from the file, name, colour (0-255) and terminology
    entry (Slicer's string form; empty when the file gives none)."""

    value: int
    name: str
    color: tuple[int, int, int]
    terminology: str


def is_segmentation_file(path: PathLike) -> bool:
    """True for a Slicer segmentation file, by its name."""
    return str(path).lower().endswith(SEGMENTATION_ENDING)


def _header_segments(path: Path) -> list[dict[str, Any]]:
    from slicerio.segmentation import read_segmentation

    try:
        segments = read_segmentation(str(path), skip_voxels=True)["segments"]
    except Exception as error:  # noqa: BLE001 - slicerio and pynrrd raise many kinds; all mean a bad header
        raise InputError(path, f"its segmentation header cannot be read ({error})") from None
    if not segments:
        raise InputError(path, "is a segmentation file without segments")
    return segments


def _flat_values(segments: list[dict[str, Any]]) -> list[int]:
    """Each segment's value in one label map: its own label value when these differ across the file's layers, else
    1, 2, ... in the file's order."""
    own = [int(s["labelValue"]) for s in segments]
    return own if len(set(own)) == len(own) else list(range(1, len(own) + 1))


def segments_of(path: PathLike) -> list[SegmentInfo]:
    """The segments a ``.seg.nrrd`` file describes, with their values in the label map ``flatten_layers`` gives."""
    from slicerio.segmentation import terminology_entry_to_string

    path = Path(path)
    segments = _header_segments(path)
    return [SegmentInfo(value, str(s.get("name") or f"segment {value}"),
                        tuple(int(round(255 * min(1.0, max(0.0, c)))) for c in s.get("color", (0.5, 0.5, 0.5))),
                        terminology_entry_to_string(s["terminology"]) if s.get("terminology") else "")
            for value, s in zip(_flat_values(segments), segments)]


def flatten_layers(image: sitk.Image, path: PathLike) -> sitk.Image:
    """One label map from a multi-layer ``.seg.nrrd`` (read by ITK as one component a layer), refused with the
    file named when its segments overlap: a voxel must belong to one class."""
    path = Path(path)
    segments = _header_segments(path)
    layers = sitk.GetArrayViewFromImage(image)  # (z, y, x, layer)
    flat = np.zeros(layers.shape[:3], dtype=np.uint8)
    taken = np.zeros(layers.shape[:3], dtype=bool)
    for value, segment in zip(_flat_values(segments), segments):
        layer = int(segment.get("layer", 0))
        if not 0 <= layer < layers.shape[3]:
            raise InputError(path, f"its segment {segment.get('name')!r} is in layer {layer}, which the file lacks")
        mask = layers[..., layer] == int(segment["labelValue"])
        if (mask & taken).any():
            raise InputError(path, f"its segment {segment.get('name')!r} overlaps another segment (the file has "
                                   f"{layers.shape[3]} layers); a voxel must belong to one class: remove the overlap "
                                   "in Slicer's Segment Editor and save again")
        flat[mask] = value
        taken |= mask
    result = sitk.GetImageFromArray(flat)
    result.CopyInformation(image)
    return result
