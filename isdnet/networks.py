"""The three networks of ISDNet: the SU-Net segmenter S, the confidence network D and the importance network D0.

All take and return NCHW tensors and work in channels-last memory format. Every network class has a role and is
registered by name (``register``): the trainer builds S, D and D0 from the registry, the model file stores each
network as its ``architecture()`` (name and options) and ``build_network`` rebuilds it. Adding a discriminator is
one class with ``role``, ``options`` (the JSON Schema of each constructor option, bounded, which a model file's
header must meet) and ``from_config``, and one ``@register``.

Roles: ``segmenter`` (S), ``confidence`` (a D that gives a per-pixel confidence map: it is saved in the model file
and gives ``segment --confidence``), ``classifier`` (an image-level D, used in training only) and ``importance``
(D0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import DISCRIMINATOR_STRIDES
from .modelheader import MAX_CLASSES

ROLES = ("segmenter", "confidence", "classifier", "importance")
_REGISTRY: dict[str, type[nn.Module]] = {}


def _count(minimum: int, maximum: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


CLASSES_OPTION = _count(2, MAX_CLASSES)

LEAKY_SLOPE_SEGMENTER = 0.01
LEAKY_SLOPE_DISCRIMINATOR = 0.2


def register(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make a network class known by its name to the trainer and the model file."""
    if getattr(cls, "role", None) not in ROLES:
        raise ValueError(f"{cls.__name__} needs a class attribute role, one of {ROLES}")
    if not isinstance(getattr(cls, "options", None), dict):
        raise ValueError(f"{cls.__name__} needs a class attribute options: the JSON Schema of each constructor option")
    _REGISTRY[cls.__name__] = cls
    return cls


def registered(role: str) -> list[str]:
    """The names of the registered networks with this role."""
    return sorted(name for name, cls in _REGISTRY.items() if cls.role == role)


def network_class(name: str, roles: Sequence[str] = ROLES) -> type[nn.Module]:
    """The registered network class called ``name``, which must have one of ``roles``; ValueError otherwise."""
    cls = _REGISTRY.get(name)
    if cls is None or cls.role not in roles:
        known = sorted(n for n, c in _REGISTRY.items() if c.role in roles)
        raise ValueError(f"unknown network {name!r}; known: {known}")
    return cls


def role_of(network: nn.Module) -> str:
    """The role of a network instance (its class's)."""
    return type(network).role


def _group_count(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` not above ``groups``, so narrow test networks still normalise."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by group normalisation and leaky ReLU (the SU-Net's unit)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [
                nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False),
                nn.GroupNorm(_group_count(out_channels, groups), out_channels),
                nn.LeakyReLU(LEAKY_SLOPE_SEGMENTER, inplace=True),
            ]
        super().__init__(*layers)


@register
class SUNet(nn.Module):
    """S: Ronneberger's 2D U-Net with halved widths (32..512), group norm and leaky ReLU.

    Any input size works: the input is padded up to a multiple of 2**(depth-1) and the output cropped back.
    ``forward`` returns class logits; ``forward_features`` also returns Z(X), the bottleneck output that the
    importance network D0 reads.
    """

    role = "segmenter"
    options = {"in_channels": {"const": 1}, "num_classes": CLASSES_OPTION, "base_channels": _count(1, 256),
               "depth": _count(2, 7), "groups": _count(1, 256)}

    @classmethod
    def from_config(cls, config: Any, channels: int) -> SUNet:
        """S for a TrainConfig and ``channels`` classes."""
        return cls(1, channels, config.base_channels)

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 32, depth: int = 5,
                 groups: int = 8):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background and one structure), got {num_classes}")
        if depth < 2:
            raise ValueError(f"depth must be at least 2, got {depth}")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, base_channels=base_channels,
                           depth=depth, groups=groups)
        widths = [base_channels * 2**i for i in range(depth)]
        self.encoders = nn.ModuleList()
        c_in = in_channels
        for w in widths:
            self.encoders.append(ConvBlock(c_in, w, groups))
            c_in = w
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.upsamplers.append(nn.ConvTranspose2d(w * 2, w, 2, stride=2))
            self.decoders.append(ConvBlock(w * 2, w, groups))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.feature_channels = widths[-1]
        self.multiple = 2 ** (depth - 1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, C, H, W) and bottleneck features Z(X) (N, 512, H/16, W/16 for the default depth)."""
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.multiple, (-w) % self.multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        features = x
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips[:-1])):
            x = decoder(torch.cat([skip, upsample(x)], dim=1))
        logits = self.head(x)[..., :h, :w]
        return logits, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


@register
class ConfidenceNet(nn.Module):
    """D: Hung et al.'s fully convolutional discriminator, returning a per-pixel confidence logit map.

    Five 4x4 convolutions (widths base, 2*base, 4*base, 8*base, then 1) with leaky ReLU 0.2 between them, and
    bilinear upsampling of the logit map back to the input's size. Input: C-channel class probabilities (S's
    softmax or a one-hot ground truth). Output: logits; sigmoid gives P(ground truth).

    ``output_stride`` is the map's downsampling: Hung's 32 (every layer strided) suits their 321-pixel crops, but
    on a 48-pixel slice it leaves a single value, so the "map" is an image-level score. A smaller power of two
    keeps the first log2(output_stride) layers strided and the rest at stride 1 (padded to keep the size), so the map
    stays spatial; the layers, kernels and widths are unchanged.
    """

    role = "confidence"
    image_channels = 0  # image channels D sees beside the probabilities (see discriminator_input)
    options = {"num_classes": CLASSES_OPTION, "base_channels": _count(1, 512),
               "output_stride": {"enum": list(DISCRIMINATOR_STRIDES)},
               "temperature": {"type": "number", "exclusiveMinimum": 0, "maximum": 100, "default": 1.0}}

    @classmethod
    def from_config(cls, config: Any, channels: int) -> ConfidenceNet:
        """D for a TrainConfig and ``channels`` classes."""
        return cls(channels, config.discriminator_channels, config.discriminator_stride,
                   config.discriminator_temperature)

    def __init__(self, num_classes: int = 2, base_channels: int = 64, output_stride: int = 32,
                 temperature: float = 1.0):
        super().__init__()
        if output_stride not in DISCRIMINATOR_STRIDES:
            raise ValueError(f"output_stride must be a power of two from 1 to 32, got {output_stride}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.config = dict(num_classes=num_classes, base_channels=base_channels, output_stride=output_stride,
                           temperature=temperature)
        self.num_classes, self.temperature = num_classes, temperature
        strided = output_stride.bit_length() - 1
        widths = [base_channels * 2**i for i in range(4)] + [1]
        layers: list[nn.Module] = []
        c_in = num_classes + self.image_channels
        for i, w in enumerate(widths):
            if i < strided:
                layers.append(nn.Conv2d(c_in, w, 4, stride=2, padding=1))
            else:  # "same" padding for an even kernel: one pixel before, two after
                layers += [nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(c_in, w, 4)]
            if i < len(widths) - 1:
                layers.append(nn.LeakyReLU(LEAKY_SLOPE_DISCRIMINATOR, True))
            c_in = w
        self.body = nn.Sequential(*layers)
        self.multiple = output_stride

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            probabilities = self._at_temperature(probabilities)
        h, w = probabilities.shape[-2:]
        # The strided layers need at least output_stride pixels a side; smaller slices are padded.
        pad_h, pad_w = max(0, self.multiple - h), max(0, self.multiple - w)
        x = F.pad(probabilities, (0, pad_w, 0, pad_h)) if pad_h or pad_w else probabilities
        logits = self.body(x)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)  # as Hung et al.
        return logits[..., :h, :w]

    def _at_temperature(self, x: torch.Tensor) -> torch.Tensor:
        """The class channels as softmax(logits / T): p ** (1 / T), renormalised, which needs only S's softmax, so
        S's training and ``segment --confidence`` feed D the same. A one-hot ground truth stays one-hot (and so
        does a probability that underflowed to 0, which a logit gap over about 87 gives in float32)."""
        tempered = x[:, :self.num_classes].pow(1.0 / self.temperature)
        tempered = tempered / tempered.sum(dim=1, keepdim=True)
        return torch.cat([tempered, x[:, self.num_classes:]], dim=1)


@register
class ImageConditionedConfidenceNet(ConfidenceNet):
    """D conditioned on the image, a choice the paper leaves open (not its method): it sees the slice beside the
    class probabilities, so it can judge a prediction against the anatomy, not by its shape alone."""

    image_channels = 1


def discriminator_input(discriminator: nn.Module, probabilities: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """What D sees: the class probabilities (N, C, H, W), and the images (N, 1, H, W) beside them when D is
    conditioned on the image."""
    if getattr(discriminator, "image_channels", 0):
        return torch.cat([probabilities, images.to(probabilities.dtype)], dim=1)
    return probabilities


@register
class ImageClassifierDiscriminator(nn.Module):
    """The image-level discriminator of Luc et al. (the ``adv-classifier`` ablation): one logit per image.

    The same strided convolutions as ``ConfidenceNet``, then global average pooling instead of a map.
    """

    role = "classifier"
    options = {"num_classes": CLASSES_OPTION, "base_channels": _count(1, 512)}

    @classmethod
    def from_config(cls, config: Any, channels: int) -> ImageClassifierDiscriminator:
        """The image-level D for a TrainConfig and ``channels`` classes."""
        return cls(channels, config.discriminator_channels)

    def __init__(self, num_classes: int = 2, base_channels: int = 64):
        super().__init__()
        self.config = dict(num_classes=num_classes, base_channels=base_channels)
        self.fcn = ConfidenceNet(num_classes, base_channels)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        h, w = probabilities.shape[-2:]
        x = probabilities
        if h < 32 or w < 32:
            x = F.pad(x, (0, max(0, 32 - w), 0, max(0, 32 - h)))
        return self.fcn.body(x).mean(dim=(2, 3), keepdim=True)


@register
class ImportanceNet(nn.Module):
    """D0: an image-level classifier on Z(X): logit of "this sample comes from the labeled data".

    Two 3x3 convolutions with leaky ReLU 0.2, global average pooling and a linear layer.
    """

    role = "importance"
    options = {"in_channels": _count(1, 2**16), "width": _count(2, 4096)}

    @classmethod
    def from_config(cls, config: Any, channels: int) -> ImportanceNet:
        """D0 for a TrainConfig, reading ``channels`` feature channels of S."""
        return cls(channels, config.importance_channels)

    def __init__(self, in_channels: int = 512, width: int = 128):
        super().__init__()
        self.config = dict(in_channels=in_channels, width=width)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE_DISCRIMINATOR, True),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE_DISCRIMINATOR, True),
        )
        self.linear = nn.Linear(width // 2, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N,)."""
        return self.linear(self.body(features).mean(dim=(2, 3))).squeeze(1)


def architecture(network: nn.Module) -> dict[str, Any]:
    """A JSON-ready description of ``network`` from which ``build_network`` rebuilds it."""
    return {"name": type(network).__name__, **network.config}


def build_network(description: dict[str, Any], device: Union[str, torch.device, None] = None) -> nn.Module:
    """Rebuild a network from ``architecture()``'s description, on ``device`` (``"meta"``: shapes only, no
    memory); unknown names or options raise ValueError."""
    options = dict(description)
    cls = network_class(str(options.pop("name", None)))
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(**options)
    except TypeError as error:
        raise ValueError(f"bad options for {cls.__name__}: {error}") from None
