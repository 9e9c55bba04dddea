"""The header of an ISDNet model file, read and checked without torch: so the Slicer modules can show a model's
classes before torch is installed, and so nothing in a file runs code.

A model file is a ``.safetensors`` file (see ``modelfile``); its metadata entry ``"isdnet"`` holds this JSON header:
the classes (label value, name, colour), the intensity normalisation, the slice geometry, the architectures and
provenance, validated against ``header_schema()`` (JSON Schema 2020-12). Reading parses the safetensors layout
itself, so that any file that is not a model (a pickle, a ``torch.save`` archive, random or truncated bytes) is
refused with a plain message.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import jsonschema

from .config import SLICE_AXES
from .errors import ModelFileError, PathLike
from .geometry import MAX_SLICE_SIDE
from .images import MAX_SPACING_MM, MIN_SPACING_MM

FORMAT = "isdnet-model"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
METADATA_KEY = "isdnet"
MAX_CLASSES = 256  # label maps are uint8
MAX_HEADER_DEPTH = 32  # nesting of the header's JSON; ours is 4 deep
_MAX_TABLE_BYTES = 100_000_000  # the safetensors library's own limit on its JSON table

_BYTE = {"type": "integer", "minimum": 0, "maximum": 255}
_RGB = {"type": "array", "items": _BYTE, "minItems": 3, "maxItems": 3}
_PAIR = {"type": "array", "minItems": 2, "maxItems": 2}


NetworkOptions = dict[str, dict[str, dict[str, Any]]]  # role -> network name -> JSON Schema of each option


def _architecture_schema(networks: Optional[NetworkOptions], role: str) -> dict[str, Any]:
    """A network description of ``role``. With ``networks``: a registered name, and that network's options within
    the bounds its class declares (an option with a default may be absent: files written before it existed);
    without: any name with a class count (the torch-free reading)."""
    if not networks:
        return {"type": "object", "required": ["name", "num_classes"],
                "properties": {"name": {"type": "string"}, "num_classes": {"type": "integer", "minimum": 2}}}
    return {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"enum": list(networks[role])}},
        "allOf": [{"if": {"properties": {"name": {"const": name}}},
                   "then": {"required": [k for k, v in options.items() if "default" not in v],
                            "additionalProperties": False,
                            "properties": {"name": {"const": name}, **options}}}
                  for name, options in networks[role].items()],
    }


def header_schema(networks: Optional[NetworkOptions] = None) -> dict[str, Any]:
    """The JSON Schema of a model header, every number bounded. ``networks`` (from ``modelfile.registered_options``)
    restricts the networks to the registered ones of each role, with the options each class declares."""
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
                        "terminology": {"type": "string", "minLength": 1},
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
                    "segmenter": _architecture_schema(networks, "segmenter"),
                    "confidence": {"oneOf": [{"type": "null"}, _architecture_schema(networks, "confidence")]},
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

def _field(error: jsonschema.ValidationError) -> str:
    """A JSON path such as ``classes[2].color`` for the place of a schema violation."""
    text = ""
    for part in error.absolute_path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the header itself"


def check_header(header: Any, path: PathLike, networks: Optional[NetworkOptions] = None) -> None:
    """Raise ModelFileError naming ``path`` unless ``header`` is a valid model header of a known version (with
    ``networks``, naming only registered networks with options in their bounds; see ``header_schema``)."""
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
    validator = jsonschema.Draft202012Validator(header_schema(networks))
    error = jsonschema.exceptions.best_match(validator.iter_errors(header))
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


def read_layout(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
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


def header_from_metadata(path: Path, metadata: dict[str, str], networks: Optional[NetworkOptions] = None
                         ) -> dict[str, Any]:
    """The validated header held in a safetensors file's metadata."""
    if METADATA_KEY not in metadata:
        raise ModelFileError(path, "is a safetensors file but not an ISDNet model: it has no ISDNet header "
                                   f"(metadata entry {METADATA_KEY!r})")
    try:
        header = json.loads(metadata[METADATA_KEY], parse_constant=_refuse_constant)
    except ValueError as error:
        raise ModelFileError(path, f"its ISDNet header is not valid JSON ({error})") from None
    except RecursionError:
        raise ModelFileError(path, f"its ISDNet header is nested deeper than {MAX_HEADER_DEPTH} levels") from None
    check_header(header, path, networks)
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
    """The validated JSON header of a model file, without its weights and without torch: cheap, for showing a
    model before anything is installed. ``modelfile.load_model`` checks the rest."""
    path = Path(path)
    metadata, _ = read_layout(path)
    return header_from_metadata(path, metadata)


