"""The ISDNet model file: one ``.safetensors`` file holding the weights and a JSON header, never a pickle.

Tensors are named ``segmenter.<key>`` (the SU-Net's state dict, required) and ``confidence.<key>`` (the
confidence network, optional: it gives confidence maps). The JSON header (``modelheader``) holds everything
inference needs; here it is checked against the registered networks of each role and the bounds of their options,
and the weights' names and shapes against the architectures it describes (``networks.architecture()``), before
any weight is read or network built, on saving and on loading.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import safetensors
import safetensors.torch
import torch
from torch import nn

from . import __version__
from .errors import ModelFileError
from .files import write_atomically
from .images import check_memory
from .modelheader import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_KEY,
    NetworkOptions,
    check_header,
    header_from_metadata,
    read_layout,
)
from .networks import architecture, build_network, network_class, registered

PathLike = Union[str, Path]
Weights = Union[nn.Module, dict[str, torch.Tensor]]

PARTS = ("segmenter", "confidence")


def registered_options() -> NetworkOptions:
    """The networks a model file may hold, by part: those registered with the part's role, each with the JSON
    Schema of its options."""
    return {part: {name: network_class(name).options for name in registered(part)} for part in PARTS}


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
    check_header(header, path, registered_options())
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
    metadata, table = read_layout(path)
    header = header_from_metadata(path, metadata, registered_options())
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
