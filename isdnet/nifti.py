"""Checks of a NIfTI file's header and length before ITK reads it.

ITK trusts the header: on a damaged one it can read garbage silently (a truncated file is padded), fail with an
unhelpful message, or never return (found by the fuzz test in ``Testing/test_fuzz_inputs.py``). Parsing the
348-byte NIfTI-1 (or 540-byte NIfTI-2) header with ``struct`` first lets every such file be refused with a
message that says which field is wrong. Hand-written because no maintained library checks a header without
reading the voxels too (nibabel would, but it is not a dependency, and SimpleITK is the one doing the reading).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import InputError

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
# datatype code -> bits per voxel (NIfTI-1 standard, nifti1.h)
DATATYPE_BITS = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64,
                 1280: 64, 1536: 128, 1792: 128, 2048: 256, 2304: 32}
MAX_VOXELS = 2**40  # beyond any volume a machine can hold; larger products are corrupt headers


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a single-file NIfTI-1/2 header that decide how its voxels are read."""

    version: int
    dims: tuple[int, ...]  # dim[1..dim[0]]
    datatype: int
    bitpix: int
    pixdim: tuple[float, ...]  # pixdim[1..dim[0]]
    vox_offset: float
    scaling: tuple[float, float]  # scl_slope, scl_inter
    orientation: tuple[float, ...]  # quatern_b..qoffset_z and the three srow rows

    @property
    def data_bytes(self) -> int:
        return math.prod(self.dims) * self.bitpix // 8


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_EXTENSIONS)


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def parse_header(raw: bytes) -> Optional[NiftiHeader]:
    """The header in ``raw`` (the file's first 540 bytes), or None if it is not a single-file NIfTI header."""
    for order in ("<", ">"):
        if len(raw) >= 348 and struct.unpack(order + "i", raw[:4])[0] == 348 and raw[344:348] == b"n+1\0":
            dim = struct.unpack(order + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(order + "2h", raw[70:74])
            pixdim = struct.unpack(order + "8f", raw[76:108])
            vox_offset, slope, inter = struct.unpack(order + "3f", raw[108:120])
            orientation = struct.unpack(order + "6f", raw[256:280]) + struct.unpack(order + "12f", raw[280:328])
            version = 1
        elif len(raw) >= 540 and struct.unpack(order + "i", raw[:4])[0] == 540 and raw[4:8] == b"n+2\0":
            datatype, bitpix = struct.unpack(order + "2h", raw[12:16])
            dim = struct.unpack(order + "8q", raw[16:80])
            pixdim = struct.unpack(order + "8d", raw[104:168])
            vox_offset = float(struct.unpack(order + "q", raw[168:176])[0])
            slope, inter = struct.unpack(order + "2d", raw[176:192])
            orientation = struct.unpack(order + "6d", raw[352:400]) + struct.unpack(order + "12d", raw[400:496])
            version = 2
        else:
            continue
        rank = dim[0] if 1 <= dim[0] <= 7 else 0
        return NiftiHeader(version, tuple(dim[1:rank + 1]), datatype, bitpix, tuple(pixdim[1:rank + 1]),
                           vox_offset, (slope, inter), tuple(orientation))
    return None


def header_problem(header: NiftiHeader) -> Optional[str]:
    """What is wrong with a parsed header, in words, or None when ITK can read it safely."""
    if not header.dims:
        return "its header's dim[0] (the number of dimensions) is not between 1 and 7"
    if any(d < 1 for d in header.dims):
        return f"its header gives the size {header.dims}, with a dimension below 1"
    if math.prod(header.dims) > MAX_VOXELS:
        return f"its header gives the impossible size {header.dims}"
    if header.datatype not in DATATYPE_BITS:
        return f"its header gives the unknown voxel type code {header.datatype}"
    if header.bitpix != DATATYPE_BITS[header.datatype]:
        return (f"its header gives {header.bitpix} bits per voxel for voxel type code {header.datatype}, "
                f"which has {DATATYPE_BITS[header.datatype]}")
    spatial = header.pixdim[:3]
    if not all(math.isfinite(p) and p != 0 for p in spatial):
        return f"its header gives the voxel spacing {spatial}; spacings must be finite and non-zero"
    minimum_offset = 352 if header.version == 1 else 544
    if not math.isfinite(header.vox_offset) or header.vox_offset < minimum_offset \
            or header.vox_offset != int(header.vox_offset):
        return f"its header gives the data offset {header.vox_offset}, not a whole number >= {minimum_offset}"
    if not all(math.isfinite(v) for v in header.orientation):
        return "its header holds a NaN or infinite value in its orientation (qform/sform)"
    slope, inter = header.scaling
    if math.isinf(slope) or math.isinf(inter) or (math.isfinite(slope) and slope != 0 and math.isnan(inter)):
        return f"its header gives the intensity scaling slope {slope}, intercept {inter}"
    return None


def check_nifti(path: Path) -> None:
    """Refuse a NIfTI file whose header is damaged or whose voxel data is shorter than the header announces.

    A .nii.gz is checked by its gzip trailer (uncompressed size mod 2**32) and, if that disagrees, by
    decompressing it to the end. Files that are not single-file NIfTI (``ni1`` pairs, other magic) are left to
    ITK, which refuses them with its own message.
    """
    try:
        with _open(path) as f:
            raw = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(path, f"cannot be read as an image: the file is truncated or corrupt ({e})") from None
    header = parse_header(raw)
    if header is None:
        return
    problem = header_problem(header)
    if problem:
        raise InputError(path, f"cannot be read as an image: {problem}")
    expected = int(header.vox_offset) + header.data_bytes
    try:
        have = _uncompressed_size(path, expected)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(path, f"cannot be read as an image: the file is truncated or corrupt ({e})") from None
    if have < expected:
        raise InputError(path, f"cannot be read as an image: the file is truncated (it holds {have} bytes of "
                               f"the {expected} its header announces)")


def _uncompressed_size(path: Path, expected: int) -> int:
    """The file's length after decompression; for .gz, ``expected`` when the gzip trailer agrees with it."""
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected % 2**32:
            return expected
    have = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            have += len(chunk)
    return have
