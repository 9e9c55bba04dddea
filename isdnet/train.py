"""ISDNet training: S, D and D0 updated in that order each iteration, with checkpoints, validation and progress.

``Trainer`` holds the networks, losses and optimisers and does one iteration (``train_step``); ``train`` runs the
whole job from cases on disk to a model file. The method option selects the rows of the paper's Tables 1 and 3:

- ``baseline``: SU-Net on labeled data, L_Dice only.
- ``adv``: + the FCN confidence network's adversarial loss, labeled data only.
- ``adv-classifier``: + an image-level discriminator instead (Luc et al.), labeled data only.
- ``hung``: adversarial + confidence-masked self-training on unlabeled data, no importance weights (Hung et al.).
- ``isdnet``: the full method, with importance weights w = 1 - D0(Z(X)) on unlabeled samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .data import (
    NORMALISATION,
    Case,
    PreparedVolume,
    SliceDataset,
    SliceGeometry,
    augment,
    cache_volumes,
    plan_geometry,
    prepare_volume,
    read_image,
    read_label,
)
from .errors import InputError, TrainingError
from .infer import predict_slices
from .losses import (
    AdversarialLoss,
    ConfidenceNetLoss,
    ImportanceNetLoss,
    SemiSupervisedLoss,
    WeightedDiceLoss,
    default_class_weights,
    importance_weights,
)
from .metrics import dice_per_class
from .modelfile import default_colors, make_header, save_model
from .networks import ConfidenceNet, ImageClassifierDiscriminator, ImportanceNet, SUNet
from .progress import Progress
from .runtime import autocast, resolve_device, resolve_precision, to_device

METHODS = ("baseline", "adv", "adv-classifier", "hung", "isdnet")
CHECKPOINT_KEY = "isdnet-checkpoint"


@dataclass
class TrainConfig:
    """Every option of a training run; the defaults are the paper's."""

    method: str = "isdnet"
    epochs: int = 40
    steps_per_epoch: Optional[int] = None  # default: one pass over the labeled slices
    batch_size: int = 8
    learning_rate: float = 1e-4
    lambda_adv: float = 0.001
    lambda_semi: float = 1.0
    t_semi: float = 0.1
    warmup_epochs: int = 5
    class_weights: Optional[list[float]] = None  # default: losses.default_class_weights
    base_channels: int = 32
    discriminator_channels: int = 64
    importance_channels: int = 128
    slice_axis: str = "auto"
    slice_spacing: Optional[list[float]] = None
    slice_size: Optional[list[int]] = None
    validation_fraction: float = 0.2
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        positive = dict(epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                        base_channels=self.base_channels)
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {self.steps_per_epoch}")
        if self.lambda_adv < 0 or self.lambda_semi < 0:
            raise ValueError("lambda_adv and lambda_semi must be non-negative")
        if not 0 <= self.t_semi <= 1:
            raise ValueError(f"t_semi must lie in [0, 1], got {self.t_semi}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be non-negative, got {self.warmup_epochs}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}")

    @property
    def uses_discriminator(self) -> bool:
        return self.method != "baseline"

    @property
    def uses_unlabeled(self) -> bool:
        return self.method in ("hung", "isdnet")

    @property
    def uses_importance(self) -> bool:
        return self.method == "isdnet"


@dataclass
class SegmenterStep:
    """What S's update leaves for the D and D0 updates of the same iteration (all detached)."""

    losses: dict[str, float]
    target: torch.Tensor  # one-hot labels of the labeled samples
    probabilities: torch.Tensor  # S's softmax on the labeled samples
    features_labeled: torch.Tensor
    features_unlabeled: Optional[torch.Tensor]
    weights: torch.Tensor  # importance weight of every sample: 1 for labeled ones


class Trainer:
    """The three networks, their losses and Adam optimisers, and one iteration of the paper's schedule."""

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device, dtype: torch.dtype):
        config.validate()
        self.config = config
        self.num_classes = num_classes
        self.device = device
        self.dtype = dtype
        weights = config.class_weights or default_class_weights(num_classes)
        if len(weights) != num_classes:
            raise ValueError(f"{len(weights)} class weights given for {num_classes} classes")
        torch.manual_seed(config.seed)
        self.segmenter = SUNet(1, num_classes, config.base_channels).to(device, memory_format=torch.channels_last)
        self.discriminator: Optional[torch.nn.Module] = None
        self.importance: Optional[ImportanceNet] = None
        if config.uses_discriminator:
            kind = ImageClassifierDiscriminator if config.method == "adv-classifier" else ConfidenceNet
            self.discriminator = kind(num_classes, config.discriminator_channels).to(device)
        if config.uses_importance:
            self.importance = ImportanceNet(self.segmenter.feature_channels, config.importance_channels).to(device)
        self.optimisers = {name: torch.optim.Adam(net.parameters(), lr=config.learning_rate)
                           for name, net in self.networks().items()}
        self.dice = WeightedDiceLoss(weights).to(device)
        self.semi = SemiSupervisedLoss(weights, threshold=config.t_semi).to(device)
        self.adversarial = AdversarialLoss()
        self.confidence_loss = ConfidenceNetLoss()
        self.importance_loss = ImportanceNetLoss()

    def networks(self) -> dict[str, torch.nn.Module]:
        """The networks in update order: S, then D, then D0 (absent ones left out)."""
        nets: dict[str, torch.nn.Module] = {"S": self.segmenter}
        if self.discriminator is not None:
            nets["D"] = self.discriminator
        if self.importance is not None:
            nets["D0"] = self.importance
        return nets

    def train_step(self, x_labeled: torch.Tensor, y_labeled: torch.Tensor,
                   x_unlabeled: Optional[torch.Tensor] = None) -> dict[str, float]:
        """One iteration: update S, then D (labeled data only), then D0 (labeled and unlabeled features)."""
        step = self.step_segmenter(x_labeled, y_labeled, x_unlabeled)
        losses = dict(step.losses)
        if self.discriminator is not None:
            losses["d"] = self.step_confidence(step.target, step.probabilities)
        if self.importance is not None and step.features_unlabeled is not None:
            losses["d0"] = self.step_importance(step.features_labeled, step.features_unlabeled)
            losses["w_mean"] = float(step.weights[len(x_labeled):].mean())
        return losses

    def step_segmenter(self, x_labeled: torch.Tensor, y_labeled: torch.Tensor,
                       x_unlabeled: Optional[torch.Tensor] = None) -> SegmenterStep:
        """(1) L_seg = L_Dice + lambda_adv L_wadv + lambda_semi L_wsemi; D and D0 are frozen here.

        Labeled and unlabeled slices go through S as one batch (group norm is per sample, so this equals two
        passes). Unlabeled slices are only used when the method has a discriminator.
        """
        cfg = self.config
        n_labeled = len(x_labeled)
        semi = x_unlabeled is not None and self.discriminator is not None
        x = torch.cat([x_labeled, x_unlabeled]) if semi else x_labeled
        for net in (self.discriminator, self.importance):
            if net is not None:
                net.requires_grad_(False)
        with autocast(self.device, self.dtype):
            logits, features = self.segmenter.forward_features(x)
        probabilities = torch.softmax(logits.float(), dim=1)
        target = F.one_hot(y_labeled, self.num_classes).permute(0, 3, 1, 2).float()
        loss_dice = self.dice(probabilities[:n_labeled], target)
        total = loss_dice
        losses = {"dice": loss_dice.item()}
        weights = torch.ones(len(x), device=self.device)
        if self.discriminator is not None:
            with autocast(self.device, self.dtype):
                confidence_logits = self.discriminator(probabilities).float()
            if semi and self.importance is not None:
                with torch.no_grad(), autocast(self.device, self.dtype):
                    weights[n_labeled:] = importance_weights(self.importance(features[n_labeled:].detach()))
            loss_adv = self.adversarial(confidence_logits, weights)
            total = total + cfg.lambda_adv * loss_adv
            losses["adv"] = loss_adv.item()
            if semi:
                loss_semi = self.semi(probabilities[n_labeled:], confidence_logits[n_labeled:], weights[n_labeled:])
                total = total + cfg.lambda_semi * loss_semi
                losses["semi"] = loss_semi.item()
                confident = self.semi.confident_mask(confidence_logits[n_labeled:]).mean()
                losses["confident_fraction"] = confident.item()
        self._update("S", total)
        for net in (self.discriminator, self.importance):
            if net is not None:
                net.requires_grad_(True)
        return SegmenterStep(
            losses=losses, target=target, probabilities=probabilities[:n_labeled].detach(),
            features_labeled=features[:n_labeled].detach(),
            features_unlabeled=features[n_labeled:].detach() if semi else None, weights=weights)

    def step_confidence(self, target: torch.Tensor, probabilities: torch.Tensor) -> float:
        """(3) L_D on labeled data: ground truth -> 1, S's (detached) prediction -> 0."""
        assert self.discriminator is not None
        with autocast(self.device, self.dtype):
            real = self.discriminator(target).float()
            fake = self.discriminator(probabilities.detach()).float()
        loss = self.confidence_loss(real, fake)
        self._update("D", loss)
        return loss.item()

    def step_importance(self, features_labeled: torch.Tensor, features_unlabeled: torch.Tensor) -> float:
        """(6) D0 learns labeled (1) vs unlabeled (0) from detached features: no gradient reaches S."""
        assert self.importance is not None
        with autocast(self.device, self.dtype):
            labeled = self.importance(features_labeled.detach()).float()
            unlabeled = self.importance(features_unlabeled.detach()).float()
        loss = self.importance_loss(labeled, unlabeled)
        self._update("D0", loss)
        return loss.item()

    def _update(self, name: str, loss: torch.Tensor) -> None:
        optimiser = self.optimisers[name]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every network's weights and every optimiser's state, as flat named tensors for a checkpoint."""
        tensors: dict[str, torch.Tensor] = {}
        for name, net in self.networks().items():
            for key, value in net.state_dict().items():
                tensors[f"net.{name}.{key}"] = value
            for index, slots in self.optimisers[name].state_dict()["state"].items():
                for slot, value in slots.items():
                    tensors[f"opt.{name}.{index}.{slot}"] = torch.as_tensor(value)
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` saved (strict: every network and optimiser must match)."""
        for name, net in self.networks().items():
            prefix = f"net.{name}."
            net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            optimiser = self.optimisers[name]
            state: dict[int, dict[str, torch.Tensor]] = {}
            prefix = f"opt.{name}."
            for key, value in tensors.items():
                if key.startswith(prefix):
                    index, slot = key[len(prefix):].split(".", 1)
                    state.setdefault(int(index), {})[slot] = value
            saved = optimiser.state_dict()
            optimiser.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


@dataclass
class TrainResult:
    """Where the model went and how the run went."""

    model: Path
    best_val_dice: Optional[float]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)


def checkpoint_path(model_path: Path) -> Path:
    """The resumable checkpoint written beside the model: ``name.checkpoint.safetensors``."""
    return model_path.with_name(model_path.name.removesuffix(".safetensors") + ".checkpoint.safetensors")


def split_validation(cases: Sequence[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Hold out ``fraction`` of the labeled cases (at least one when there are two or more) to pick the best epoch.

    With a single labeled case, or fraction 0, nothing is held out and the last epoch's model is kept.
    """
    cases = list(cases)
    if fraction == 0 or len(cases) < 2:
        return cases, []
    order = list(range(len(cases)))
    random.Random(seed + 1).shuffle(order)
    n_val = min(len(cases) - 1, max(1, round(fraction * len(cases))))
    held = set(order[:n_val])
    return [c for i, c in enumerate(cases) if i not in held], [c for i, c in enumerate(cases) if i in held]


def _epoch_batches(dataset: SliceDataset, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled batches, the shuffle fixed by ``seed`` so a resumed epoch sees the same batches."""
    generator = torch.Generator().manual_seed(seed)
    drop_last = len(dataset) >= batch_size
    while True:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=drop_last)


def validation_dice(segmenter: torch.nn.Module, volumes: Sequence[PreparedVolume], num_classes: int,
                    device: torch.device, dtype: torch.dtype, batch_size: int) -> float:
    """Mean over volumes of the mean foreground Dice, on the model's slice grid."""
    scores = []
    for volume in volumes:
        prediction = np.empty(volume.image.shape, dtype=np.uint8)
        for start, probs, _ in predict_slices(segmenter, volume.image, batch_size=batch_size, device=device,
                                              dtype=dtype):
            prediction[start:start + len(probs)] = probs.argmax(1).cpu().numpy()
        per_class = dice_per_class(prediction, np.asarray(volume.label), range(1, num_classes))
        scores.append(float(np.mean(list(per_class.values()))))
    return float(np.mean(scores))


def _read_volumes(cases: Sequence[Case], label_values: Sequence[int]) -> list[tuple[Any, Any]]:
    """(image, label or None) for each case, read and checked."""
    pairs = []
    for case in cases:
        image = read_image(case.image)
        label = read_label(case.label, image, label_values) if case.label is not None else None
        pairs.append((image, label))
    return pairs


def _label_indices(label: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Map label values (which need not be 0..C-1) to class indices."""
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[list(values)] = np.arange(len(values), dtype=np.uint8)
    return lookup[label]


def train(labeled: Sequence[Case], unlabeled: Sequence[Case], labels: dict[int, str], out: Path,
          config: TrainConfig, *, colors: Optional[dict[int, list[int]]] = None, progress: Optional[Progress] = None,
          resume: bool = False, cache_dir: Optional[Path] = None) -> TrainResult:
    """Train on labeled and unlabeled cases and write the best model to ``out`` (safetensors + JSON header)."""
    config.validate()
    progress = progress or Progress(json_lines=False)
    out = Path(out)
    if not labeled:
        raise TrainingError("no labeled case: ISDNet needs at least one annotated volume")
    if not out.parent.is_dir():
        raise InputError(out.parent, "the output folder does not exist")
    values = sorted(labels)
    if values[0] != 0:
        raise TrainingError(f"the labels must include 0 (background), got {values}")
    num_classes = len(values)
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    unlabeled = list(unlabeled) if config.uses_unlabeled else []

    train_cases, val_cases = split_validation(labeled, config.validation_fraction, config.seed)
    started = time.monotonic()
    train_pairs = _read_volumes(train_cases, values)
    val_pairs = _read_volumes(val_cases, values)
    unlabeled_pairs = _read_volumes(unlabeled, values)
    geometry = plan_geometry([image for image, _ in train_pairs + unlabeled_pairs], config.slice_axis,
                             spacing=config.slice_spacing, size=config.slice_size)

    def prepared(pairs):
        for image, label in pairs:
            volume = prepare_volume(image, geometry, label)
            if volume.label is not None:
                volume.label = _label_indices(volume.label, values)
            yield volume

    with tempfile.TemporaryDirectory(prefix="isdnet-cache-", dir=cache_dir) as cache:
        labeled_volumes = cache_volumes(prepared(train_pairs), Path(cache) / "labeled")
        unlabeled_volumes = cache_volumes(prepared(unlabeled_pairs), Path(cache) / "unlabeled")
        val_volumes = list(prepared(val_pairs))
        del train_pairs, unlabeled_pairs, val_pairs
        labeled_set = SliceDataset(labeled_volumes, geometry.size, labeled=True, random_crop=True, seed=config.seed)
        unlabeled_set = (SliceDataset(unlabeled_volumes, geometry.size, labeled=False, random_crop=True,
                                      seed=config.seed) if unlabeled_volumes else None)
        trainer = Trainer(config, num_classes, device, dtype)
        steps = config.steps_per_epoch or max(1, math.ceil(len(labeled_set) / config.batch_size))
        header = _model_header(config, labels, colors, geometry, trainer,
                               dict(labeled_cases=len(train_cases), validation_cases=len(val_cases),
                                    unlabeled_cases=len(unlabeled), labeled_slices=len(labeled_set),
                                    unlabeled_slices=len(unlabeled_set) if unlabeled_set else 0))
        state = dict(epoch=0, best_val_dice=None, best_epoch=0, history=[])
        if resume:
            state = _load_checkpoint(checkpoint_path(out), trainer, config, header)
        progress.emit("start", epochs=config.epochs, iterations_per_epoch=steps, start_epoch=state["epoch"] + 1,
                      labeled_slices=len(labeled_set), unlabeled_slices=header["provenance"]["unlabeled_slices"],
                      validation_cases=len(val_cases), device=str(device), precision=str(dtype).split(".")[-1],
                      method=config.method, setup_s=round(time.monotonic() - started, 2))
        run_started, run_steps = time.monotonic(), 0
        total_steps = (config.epochs - state["epoch"]) * steps
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            semi = unlabeled_set is not None and epoch > config.warmup_epochs
            epoch_seed = config.seed * 100_003 + epoch
            labeled_batches = _epoch_batches(labeled_set, config.batch_size, epoch_seed)
            unlabeled_batches = _epoch_batches(unlabeled_set, config.batch_size, epoch_seed + 7) if semi else None
            augmenter = torch.Generator().manual_seed(epoch_seed + 13)
            sums: dict[str, float] = {}
            for iteration in range(1, steps + 1):
                x_l, y_l = next(labeled_batches)
                x_u = next(unlabeled_batches)[0] if unlabeled_batches is not None else None
                if config.augment:
                    x_l, y_l = augment(x_l, y_l, augmenter)
                    if x_u is not None:
                        x_u, _ = augment(x_u, None, augmenter)
                losses = trainer.train_step(to_device(x_l, device), y_l.to(device),
                                            None if x_u is None else to_device(x_u, device))
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + value
                run_steps += 1
                eta = (time.monotonic() - run_started) / run_steps * (total_steps - run_steps)
                progress.emit("iteration", epoch=epoch, iteration=iteration, iterations=steps,
                              losses=_rounded(losses), eta_s=round(eta, 1))
            means = {k: v / steps for k, v in sums.items()}
            val = (validation_dice(trainer.segmenter, val_volumes, num_classes, device, dtype, config.batch_size)
                   if val_volumes else None)
            improved = val is None or state["best_val_dice"] is None or val > state["best_val_dice"]
            if improved:
                state["best_val_dice"], state["best_epoch"] = val, epoch
                header["provenance"]["validation"] = {"dice": val, "epoch": epoch}
                header["provenance"]["training_time_s"] = round(time.monotonic() - started, 1)
                save_model(out, header, trainer.segmenter,
                           trainer.discriminator if isinstance(trainer.discriminator, ConfidenceNet) else None)
            state["epoch"] = epoch
            state["history"].append({"epoch": epoch, "losses": _rounded(means), "val_dice": val, "semi": semi})
            _save_checkpoint(checkpoint_path(out), trainer, config, header, state)
            progress.emit("checkpoint", epoch=epoch, path=str(checkpoint_path(out)))
            progress.emit("epoch", epoch=epoch, epochs=config.epochs, losses=_rounded(means), val_dice=val,
                          best_val_dice=state["best_val_dice"], elapsed_s=round(time.monotonic() - started, 1),
                          eta_s=round((time.monotonic() - run_started) / run_steps * (total_steps - run_steps), 1))
    progress.emit("done", model=str(out), best_val_dice=state["best_val_dice"], best_epoch=state["best_epoch"])
    return TrainResult(out, state["best_val_dice"], state["best_epoch"], state["epoch"], state["history"])


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in values.items()}


def _model_header(config: TrainConfig, labels: dict[int, str], colors: Optional[dict[int, list[int]]],
                  geometry: SliceGeometry, trainer: Trainer, counts: dict[str, int]) -> dict[str, Any]:
    """The model file's JSON header: everything inference and a reader of provenance need."""
    values = sorted(labels)
    palette = default_colors(len(values))
    confidence = trainer.discriminator if isinstance(trainer.discriminator, ConfidenceNet) else None
    header = make_header([labels[v] for v in values], dict(NORMALISATION), geometry.to_dict(), trainer.segmenter,
                         confidence, method=config.method,
                         colors=[list((colors or {}).get(v, palette[i])) for i, v in enumerate(values)],
                         hyperparameters=dataclasses.asdict(config), **counts)
    for cls, value in zip(header["classes"], values):
        cls["value"] = value
    return header


def _save_checkpoint(path: Path, trainer: Trainer, config: TrainConfig, header: dict[str, Any],
                     state: dict[str, Any]) -> None:
    """Everything a resumed run needs, as safetensors (never a pickle), written to a temporary file then renamed."""
    meta = {"config": dataclasses.asdict(config), "header": header, "state": state}
    tmp = path.with_name(path.name + ".tmp")
    save_file(trainer.state_tensors(), str(tmp), metadata={CHECKPOINT_KEY: json.dumps(meta)})
    tmp.replace(path)


def _load_checkpoint(path: Path, trainer: Trainer, config: TrainConfig, header: dict[str, Any]) -> dict[str, Any]:
    """Restore a checkpoint into ``trainer``; it must come from a run with the same options and data."""
    from safetensors import safe_open

    if not path.exists():
        raise InputError(path, "there is no checkpoint to resume from (train without --resume first)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[CHECKPOINT_KEY])
        tensors = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - any failure to parse means the checkpoint is unusable
        raise InputError(path, f"the checkpoint cannot be read ({error})") from None
    saved = dict(meta["config"])
    current = dataclasses.asdict(config)
    changed = [k for k in current if k not in ("epochs", "device", "precision") and saved.get(k) != current[k]]
    if changed:
        raise InputError(path, f"the checkpoint was made with other options ({', '.join(changed)}); "
                               "resume with the same options or start a new training")
    if meta["header"]["geometry"] != header["geometry"] or meta["header"]["classes"] != header["classes"]:
        raise InputError(path, "the checkpoint was made on other data (slice geometry or classes differ)")
    trainer.load_state_tensors({k: v.to(trainer.device) for k, v in tensors.items()})
    return meta["state"]
