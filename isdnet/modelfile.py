"""The ISDNet model file: one ``.safetensors`` file holding the weights and a JSON header, never a pickle.

Tensors are named ``segmenter.<key>`` (the SU-Net's state dict, required) and ``confidence.<key>`` (the
confidence network, optional: it gives confidence maps). The safetensors metadata entry ``"isdnet"`` is a
JSON header with everything inference needs: the classes (label value, name, colour), the intensity
normalisation, the slice geometry, the architectures (``networks.architecture()``) and provenance. It is
validated against ``header_schema()`` (JSON Schema 2020-12) on saving and on reading.

Reading parses the safetensors layout itself before handing the file to ``safetensors``, so that any file
that is not a model (a pickle, a ``torch.save`` archive, random or truncated bytes) is refused with a plain
message, and nothing in a file can run code.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import jsonschema
import safetensors
import safetensors.torch
import torch
from torch import nn

from . import __version__
from .config import SLICE_AXES
from .errors import ModelFileError
from .files import write_atomically
from .geometry import MAX_SLICE_SIDE
from .images import MAX_SPACING_MM, MIN_SPACING_MM, check_memory
from .networks import MAX_CLASSES, architecture, build_network, network_class, registered

PathLike = Union[str, Path]
Weights = Union[nn.Module, dict[str, torch.Tensor]]

FORMAT = "isdnet-model"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
METADATA_KEY = "isdnet"
PARTS = ("segmenter", "confidence")
_MAX_TABLE_BYTES = 100_000_000  # the safetensors library's own limit on its JSON table
MAX_HEADER_DEPTH = 32  # nesting of the header's JSON; ours is 4 deep

_BYTE = {"type": "integer", "minimum": 0, "maximum": 255}
_RGB = {"type": "array", "items": _BYTE, "minItems": 3, "maxItems": 3}
_PAIR = {"type": "array", "minItems": 2, "maxItems": 2}


def _architecture_schema(role: str) -> dict[str, Any]:
    """A network description of ``role``: a registered name, and that network's options within their bounds."""
    names = registered(role)
    return {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"enum": names}},
        "allOf": [{"if": {"properties": {"name": {"const": name}}},
                   "then": {"required": list(network_class(name).options), "additionalProperties": False,
                            "properties": {"name": {"const": name}, **network_class(name).options}}}
                  for name in names],
    }


def header_schema() -> dict[str, Any]:
    """The JSON Schema of a model header: every number bounded; the allowed network names are the registered ones
    of each role, with the options each network class declares."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ISDNet model header",
        "type": "object",
        "required": ["format", "format_version", "classes", "normalisation", "geometry", "architecture",
                     "provenance"],
        "properties": {
            "format": {"const": FORMAT},
            "format_version": {"type": "integer"},
            "classes": {
                "type": "array",
                "minItems": 2,
                "maxItems": MAX_CLASSES,
                "items": {
                    "type": "object",
                    "required": ["value", "name", "color"],
                    "properties": {
                        "value": _BYTE,
                        "name": {"type": "string", "minLength": 1},
                        "color": _RGB,
                    },
                },
            },
            "normalisation": {"type": "object"},
            "geometry": {
                "type": "object",
                "required": ["slice_axis", "spacing", "size"],
                "properties": {
                    "slice_axis": {"enum": list(SLICE_AXES)},
                    "spacing": {**_PAIR, "items": {"type": "number", "minimum": MIN_SPACING_MM,
                                                   "maximum": MAX_SPACING_MM}},
                    "size": {**_PAIR, "items": {"type": "integer", "minimum": 1, "maximum": MAX_SLICE_SIDE}},
                },
            },
            "architecture": {
                "type": "object",
                "required": ["segmenter", "confidence"],
                "properties": {
                    "segmenter": _architecture_schema("segmenter"),
                    "confidence": {"oneOf": [{"type": "null"}, _architecture_schema("confidence")]},
                },
            },
            "provenance": {
                "type": "object",
                "required": ["method", "isdnet_version", "created"],
                "properties": {
                    "method": {"type": "string"},
                    "isdnet_version": {"type": "string"},
                    "created": {"type": "string"},
                },
            },
        },
    }

# Background black, then colours that are distinct on grey-scale images (anatomy-like first).
_PALETTE = [
    [221, 130, 101], [144, 238, 144], [111, 184, 210], [241, 214, 145], [216, 101, 79], [183, 156, 220],
    [230, 220, 70], [0, 151, 206], [255, 181, 158], [128, 174, 128], [250, 160, 40], [200, 90, 170],
]


def default_colors(n: int) -> list[list[int]]:
    """``n`` RGB colours for classes that have none: black for background, then a fixed palette.

    Past the palette, hues step by the golden angle so that neighbouring classes stay distinguishable.
    """
    colors = [[0, 0, 0]] + [list(c) for c in _PALETTE[: max(n - 1, 0)]]
    for i in range(len(colors), n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.6, 0.9)
        colors.append([round(r * 255), round(g * 255), round(b * 255)])
    return colors[:n]


def _describe(network: Union[nn.Module, dict[str, Any]]) -> dict[str, Any]:
    return architecture(network) if isinstance(network, nn.Module) else dict(network)


def make_header(class_names: list[str], normalisation: dict[str, Any], geometry: dict[str, Any],
                segmenter: Union[nn.Module, dict[str, Any]],
                confidence: Union[nn.Module, dict[str, Any], None] = None, *, method: str,
                colors: Optional[list[list[int]]] = None, **provenance: Any) -> dict[str, Any]:
    """A header for classes 0..n-1 named ``class_names``, stamped with this ISDNet version and the time.

    ``segmenter`` and ``confidence`` are networks or their ``architecture()`` descriptions; extra keyword
    arguments go into the free-form provenance.
    """
    colors = default_colors(len(class_names)) if colors is None else colors
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "classes": [{"value": i, "name": name, "color": list(color)}
                    for i, (name, color) in enumerate(zip(class_names, colors))],
        "normalisation": normalisation,
        "geometry": geometry,
        "architecture": {"segmenter": _describe(segmenter),
                         "confidence": None if confidence is None else _describe(confidence)},
        "provenance": {"method": method, "isdnet_version": __version__,
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **provenance},
    }


def _field(error: jsonschema.ValidationError) -> str:
    """A JSON path such as ``classes[2].color`` for the place of a schema violation."""
    text = ""
    for part in error.absolute_path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the header itself"


def check_header(header: Any, path: PathLike) -> None:
    """Raise ModelFileError naming ``path`` unless ``header`` is a valid model header of a known version."""
    if not isinstance(header, dict):
        raise ModelFileError(path, "its ISDNet header is not a JSON object")
    if _depth(header) > MAX_HEADER_DEPTH:
        raise ModelFileError(path, f"its ISDNet header is nested deeper than {MAX_HEADER_DEPTH} levels")
    if header.get("format") != FORMAT:
        raise ModelFileError(path, f"its header does not say format {FORMAT!r}; it is not an ISDNet model")
    version = header.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise ModelFileError(path, f"uses model format version {version!r}, but this version of ISDNet reads "
                                   f"format version {supported} only; update ISDNet or re-export the model")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(header_schema()).iter_errors(header))
    if error is not None:
        raise ModelFileError(path, f"its header field {_field(error)} is invalid: {error.message}")
    values = [c["value"] for c in header["classes"]]
    if len(set(values)) != len(values):
        raise ModelFileError(path, f"its header lists a class value twice: {values}")
    if 0 not in values:
        raise ModelFileError(path, "its header has no class with value 0 (background)")
    num_classes = header["architecture"]["segmenter"]["num_classes"]
    if len(values) != num_classes:
        raise ModelFileError(path, f"its header lists {len(values)} classes but the segmenter predicts "
                                   f"{num_classes} (architecture.segmenter.num_classes)")
    confidence = header["architecture"]["confidence"]
    if confidence is not None and confidence["num_classes"] != num_classes:
        raise ModelFileError(path, f"its confidence network reads {confidence['num_classes']} classes but "
                                   f"the segmenter predicts {num_classes}")
    try:
        datetime.fromisoformat(header["provenance"]["created"])
    except ValueError:
        raise ModelFileError(path, "its header field provenance.created is not an ISO-8601 date and time: "
                                   f"{header['provenance']['created']!r}") from None


def _describe_non_model(start: bytes) -> str:
    """Why a file is not a safetensors file, in words, guessing what it is from its first bytes."""
    if start.startswith(b"PK\x03\x04"):
        return ("is a zip archive (probably a PyTorch torch.save checkpoint), not an ISDNet model file; "
                "ISDNet loads only .safetensors model files, which cannot run code")
    if start[:1] == b"\x80":
        return ("is a Python pickle, not an ISDNet model file; ISDNet never loads pickles because they can "
                "run code")
    return "is not an ISDNet model file (not in the safetensors format)"


def _read_layout(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The metadata and tensor table of a safetensors file, after checking its layout spans the file."""
    if not path.exists():
        raise ModelFileError(path, "the model file does not exist")
    if not path.is_file():
        raise ModelFileError(path, "is not a file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            start = file.read(8)
            table_size = int.from_bytes(start, "little") if len(start) == 8 else -1
            if not 0 < table_size <= min(_MAX_TABLE_BYTES, size - 8):
                raise ModelFileError(path, _describe_non_model(start))
            raw = file.read(table_size)
    except OSError as error:
        raise ModelFileError(path, f"cannot be read ({error.strerror})") from None
    try:
        table = json.loads(raw.decode("utf-8"))
        metadata = table.pop("__metadata__", None) or {}
        end = 0
        for entry in table.values():
            if not isinstance(entry["dtype"], str) or not all(isinstance(n, int) for n in entry["shape"]):
                raise ValueError
            end = max(end, int(entry["data_offsets"][1]))
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise ModelFileError(path, _describe_non_model(start)) from None
    if size - 8 - table_size != end:
        raise ModelFileError(path, f"is damaged or incomplete: its weights should take {end} bytes but the "
                                   f"file holds {size - 8 - table_size}")
    return metadata, table


def _header_from_metadata(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    if METADATA_KEY not in metadata:
        raise ModelFileError(path, "is a safetensors file but not an ISDNet model: it has no ISDNet header "
                                   f"(metadata entry {METADATA_KEY!r})")
    try:
        header = json.loads(metadata[METADATA_KEY], parse_constant=_refuse_constant)
    except ValueError as error:
        raise ModelFileError(path, f"its ISDNet header is not valid JSON ({error})") from None
    except RecursionError:
        raise ModelFileError(path, f"its ISDNet header is nested deeper than {MAX_HEADER_DEPTH} levels") from None
    check_header(header, path)
    return header


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"it holds {name}, which is not a number JSON allows")


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a JSON value (counted without recursion)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            deepest = max(deepest, level)
            pending.append((child, level + 1))
    return deepest


def read_header(path: PathLike) -> dict[str, Any]:
    """The validated JSON header of a model file, without loading its weights (cheap, for showing a model)."""
    path = Path(path)
    metadata, _ = _read_layout(path)
    return _header_from_metadata(path, metadata)


def _expected_shapes(path: Path, header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The name and shape of every weight the header's networks have, found without allocating them."""
    expected: dict[str, tuple[int, ...]] = {}
    for part in PARTS:
        description = header["architecture"][part]
        if description is None:
            continue
        try:
            network = build_network(description, device="meta")
        except ValueError as error:
            raise ModelFileError(path, f"its header's architecture.{part} cannot be built: {error}") from None
        expected.update({f"{part}.{k}": tuple(v.shape) for k, v in network.state_dict().items()})
    return expected


def _check_shapes(path: Path, header: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> int:
    """Check that the weights ``shapes`` are exactly those of the header's networks; returns their bytes (float32)."""
    expected = _expected_shapes(path, header)
    mismatch = "its weights do not match the architecture in its header: "
    for name, shape in expected.items():
        if name not in shapes:
            raise ModelFileError(path, mismatch + f"tensor {name} is missing")
        if tuple(shapes[name]) != shape:
            raise ModelFileError(path, mismatch + f"tensor {name} has shape {tuple(shapes[name])} but "
                                                  f"the architecture needs {shape}")
    for name in shapes:
        if name not in expected:
            raise ModelFileError(path, mismatch + f"tensor {name} is not part of the architecture")
    return 4 * sum(math.prod(shape) for shape in expected.values())


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(path, f"tensor {name} contains NaN or infinite values; such weights cannot "
                                       "be used")


def _prepare_tensors(segmenter: Weights, confidence: Optional[Weights]) -> dict[str, torch.Tensor]:
    """Prefixed, detached, contiguous CPU tensors; floating-point ones as float32."""
    tensors = {}
    for part, weights in zip(PARTS, (segmenter, confidence)):
        if weights is None:
            continue
        state = weights.state_dict() if isinstance(weights, nn.Module) else weights
        for key, tensor in state.items():
            tensor = tensor.detach().to("cpu")
            tensors[f"{part}.{key}"] = (tensor.float() if tensor.is_floating_point() else tensor).contiguous()
    return tensors


def save_model(path: PathLike, header: dict[str, Any], segmenter: Weights,
               confidence: Optional[Weights] = None) -> Path:
    """Validate ``header`` and the weights against it, then write the model file atomically; returns its path.

    Weights are stored as contiguous float32 CPU tensors. Nothing is written (an existing file stays as it
    was) when the header is invalid, the weights do not fit the architecture, or a weight is NaN or infinite.
    """
    path = Path(path)
    try:
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the header of {path} cannot be written as JSON ({error})") from None
    header = json.loads(text)
    check_header(header, path)
    if (confidence is None) != (header["architecture"]["confidence"] is None):
        raise ValueError(f"{path}: confidence weights must be given exactly when the header's "
                         "architecture.confidence describes a network")
    tensors = _prepare_tensors(segmenter, confidence)
    _check_shapes(path, header, {name: tuple(tensor.shape) for name, tensor in tensors.items()})
    _check_finite(path, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, safetensors.torch.save(tensors, metadata={METADATA_KEY: text}))
    return path


@dataclass
class LoadedModel:
    """A model ready for inference: header, segmenter and (when the file has one) the confidence network."""

    header: dict[str, Any]
    segmenter: nn.Module
    confidence: Optional[nn.Module]


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu") -> LoadedModel:
    """Read a model file, rebuild its networks from the header, load the weights strictly, in eval mode.

    The weights' names and shapes are checked against the header, and the memory for them against the free
    memory, before any weight is read or network built.
    """
    path = Path(path)
    metadata, table = _read_layout(path)
    header = _header_from_metadata(path, metadata)
    weight_bytes = _check_shapes(path, header, {name: tuple(entry["shape"]) for name, entry in table.items()})
    check_memory(path, 2 * weight_bytes, "use a smaller model")  # the weights as read, and their networks
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(path, f"its weights cannot be read ({error})") from None
    _check_finite(path, tensors)
    networks = {}
    for part in PARTS:
        if header["architecture"][part] is None:
            continue
        network = build_network(header["architecture"][part])
        prefix = part + "."
        network.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                strict=True)
        networks[part] = network.to(device).eval()
    return LoadedModel(header, networks["segmenter"], networks.get("confidence"))
