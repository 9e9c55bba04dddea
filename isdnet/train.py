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

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import load_latest, save_checkpoint
from .config import TrainConfig, checkpoint_path
from .dataset import Case
from .distributed import ProcessGroup, init_from_environment, shutdown
from .errors import InputError, TrainingError
from .files import OutputLock
from .geometry import NORMALISATION, ImageGrid, PreparedVolume, SliceGeometry, plan_geometry, prepare_volume
from .images import read_image, read_label
from .infer import predict_slices
from .losses import (
    AdversarialLoss,
    ConfidenceNetLoss,
    ImportanceNetLoss,
    SemiSupervisedLoss,
    WeightedDiceLoss,
    importance_weights,
)
from .metrics import dice_per_class
from .modelfile import default_colors, make_header, save_model
from .networks import ImportanceNet, SUNet, network_class, role_of
from .progress import Progress
from .runtime import autocast, resolve_device, resolve_precision, to_device
from .slices import Augmentation, SliceDataset, augment, cache_volumes, draw_augmentation

POLY_POWER = 0.9  # Hung et al.'s poly decay
RESUMABLE_CHANGES = ("epochs", "device", "precision")  # options a resumed run may change


@dataclass
class SegmenterStep:
    """What S's update leaves for the D and D0 updates of the same iteration (all detached)."""

    losses: dict[str, torch.Tensor]  # detached scalars, read back once per iteration
    target: torch.Tensor  # one-hot labels of the labeled samples
    probabilities: torch.Tensor  # S's softmax on the labeled samples
    probabilities_unlabeled: Optional[torch.Tensor]  # and on the unlabeled ones, when D also learns from them
    features_labeled: torch.Tensor
    features_unlabeled: Optional[torch.Tensor]
    weights: torch.Tensor  # importance weight of every sample: 1 for labeled ones


class Trainer:
    """The three networks, their losses and Adam optimisers, and one iteration of the paper's schedule."""

    def __init__(self, config: TrainConfig, num_classes: int, device: torch.device, dtype: torch.dtype,
                 group: Optional[ProcessGroup] = None):
        config.validate()
        self.config = config
        self.group = group or ProcessGroup()
        self.num_classes = num_classes
        self.device = device
        self.dtype = dtype
        weights = config.class_weights or [1.0] * num_classes  # plain Dice unless weights are given
        if len(weights) != num_classes:
            raise ValueError(f"{len(weights)} class weights given for {num_classes} classes")
        torch.manual_seed(config.seed)
        self.segmenter = SUNet.from_config(config, num_classes).to(device, memory_format=torch.channels_last)
        self.discriminator: Optional[torch.nn.Module] = None
        self.importance: Optional[torch.nn.Module] = None
        if config.uses_discriminator:
            roles = ("classifier",) if config.method == "adv-classifier" else ("confidence",)
            discriminator = network_class(config.discriminator_name, roles)
            self.discriminator = discriminator.from_config(config, num_classes).to(device)
        if config.uses_importance:
            self.importance = ImportanceNet.from_config(config, self.segmenter.feature_channels).to(device)
        for net in self.networks().values():
            self.group.broadcast_parameters(net)
        critic_rate = config.discriminator_learning_rate or config.learning_rate
        betas = tuple(config.discriminator_betas)
        self.optimisers = {name: torch.optim.Adam(net.parameters(), lr=config.learning_rate) if name == "S" else
                           torch.optim.Adam(net.parameters(), lr=critic_rate, betas=betas)
                           for name, net in self.networks().items()}
        self.base_rates = {name: opt.param_groups[0]["lr"] for name, opt in self.optimisers.items()}
        self.semi_scale = 1.0  # the share of lambda_semi in force (the loop ramps it up after the warm-up)
        self.discarded: list[str] = []  # networks whose update was discarded for a non-finite loss or gradient
        self.dice = WeightedDiceLoss(weights, form=config.dice_form).to(device)
        self.semi = SemiSupervisedLoss(weights, threshold=config.t_semi, form=config.dice_form).to(device)
        self.adversarial = AdversarialLoss()
        self.confidence_loss = ConfidenceNetLoss()
        self.importance_loss = ImportanceNetLoss()

    @property
    def confidence_net(self) -> Optional[torch.nn.Module]:
        """D when it gives a per-pixel confidence map (its role is "confidence"): the part the model file keeps."""
        d = self.discriminator
        return d if d is not None and role_of(d) == "confidence" else None

    def networks(self) -> dict[str, torch.nn.Module]:
        """The networks in update order: S, then D, then D0 (absent ones left out)."""
        nets: dict[str, torch.nn.Module] = {"S": self.segmenter}
        if self.discriminator is not None:
            nets["D"] = self.discriminator
        if self.importance is not None:
            nets["D0"] = self.importance
        return nets

    def set_progress(self, done: float) -> None:
        """Set every learning rate for the share ``done`` (0..1) of the run's steps already taken."""
        factor = (1.0 - min(max(done, 0.0), 1.0)) ** POLY_POWER if self.config.lr_schedule == "poly" else 1.0
        for name, optimiser in self.optimisers.items():
            for group in optimiser.param_groups:
                group["lr"] = self.base_rates[name] * factor

    def train_step(self, x_labeled: torch.Tensor, y_labeled: torch.Tensor, x_unlabeled: Optional[torch.Tensor] = None,
                   augmentation: Optional[Augmentation] = None) -> dict[str, float]:
        """One iteration: update S, then D (labeled data only), then D0 (labeled and unlabeled features).

        ``augmentation``, when given, is applied to the unlabeled slices here (see ``step_segmenter``). An update
        whose loss or gradient is not finite is skipped; ``losses["discarded"]`` then counts them.
        """
        self.discarded = []
        step = self.step_segmenter(x_labeled, y_labeled, x_unlabeled, augmentation)
        losses = dict(step.losses)
        if self.discriminator is not None:
            losses["d"] = self.step_confidence(step.target, step.probabilities, step.probabilities_unlabeled)
        if self.importance is not None and step.features_unlabeled is not None:
            losses["d0"] = self.step_importance(step.features_labeled, step.features_unlabeled)
            losses["w_mean"] = step.weights[len(x_labeled):].mean()
        values = dict(zip(losses, torch.stack([v.float() for v in losses.values()]).tolist()))  # one sync
        if self.discarded:
            values["discarded"] = float(len(self.discarded))
        return values

    def step_segmenter(self, x_labeled: torch.Tensor, y_labeled: torch.Tensor,
                       x_unlabeled: Optional[torch.Tensor] = None,
                       augmentation: Optional[Augmentation] = None) -> SegmenterStep:
        """(1) L_seg = L_Dice + lambda_adv L_wadv + lambda_semi L_wsemi; D and D0 are frozen here.

        Labeled and unlabeled slices go through S as one batch (group norm is per sample, so this equals two
        passes). Unlabeled slices are only used when the method has a discriminator. They are augmented here
        with ``augmentation``; with ``pseudo_labels="unaugmented"`` the pseudo-labels of L_semi are S's argmax on
        the slices before augmentation, warped alike (no gradient), instead of the prediction's own argmax.
        """
        cfg = self.config
        n_labeled = len(x_labeled)
        semi = x_unlabeled is not None and self.discriminator is not None
        pseudo = None
        if semi:
            if cfg.pseudo_labels == "unaugmented":
                with torch.no_grad(), autocast(self.device, self.dtype):
                    pseudo = self.segmenter(x_unlabeled).argmax(1)
            if augmentation is not None:
                x_unlabeled, pseudo = augmentation.apply(x_unlabeled, pseudo)
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
        losses = {"dice": loss_dice.detach()}
        if cfg.cross_entropy:
            loss_ce = F.cross_entropy(logits[:n_labeled].float(), y_labeled)
            total = total + cfg.cross_entropy * loss_ce
            losses["ce"] = loss_ce.detach()
        weights = torch.ones(len(x), device=self.device)
        if self.discriminator is not None:
            with autocast(self.device, self.dtype):
                confidence_logits = self.discriminator(probabilities).float()
            if semi and self.importance is not None:
                with torch.no_grad(), autocast(self.device, self.dtype):
                    weights[n_labeled:] = importance_weights(self.importance(features[n_labeled:].detach()))
            loss_adv = self.adversarial(confidence_logits[:n_labeled])
            if semi:
                loss_adv = loss_adv + self.adversarial(confidence_logits[n_labeled:], weights[n_labeled:])
            total = total + cfg.lambda_adv * loss_adv
            losses["adv"] = loss_adv.detach()
            if semi:
                loss_semi = self.semi(probabilities[n_labeled:], confidence_logits[n_labeled:], weights[n_labeled:],
                                      pseudo)
                total = total + cfg.lambda_semi * self.semi_scale * loss_semi
                losses["semi"] = loss_semi.detach()
                confident = self.semi.confident_mask(confidence_logits[n_labeled:]).mean()
                losses["confident_fraction"] = confident.detach()
        self._update("S", total)
        for net in (self.discriminator, self.importance):
            if net is not None:
                net.requires_grad_(True)
        return SegmenterStep(
            losses=losses, target=target, probabilities=probabilities[:n_labeled].detach(),
            probabilities_unlabeled=probabilities[n_labeled:].detach() if semi and cfg.confidence_on_unlabeled
            else None,
            features_labeled=features[:n_labeled].detach(),
            features_unlabeled=features[n_labeled:].detach() if semi else None, weights=weights)

    def step_confidence(self, target: torch.Tensor, probabilities: torch.Tensor,
                        probabilities_unlabeled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(3) L_D on labeled data: ground truth -> 1, S's (detached) prediction -> 0; returns the loss. With
        ``probabilities_unlabeled`` (the ``confidence_on_unlabeled`` variant), S's unlabeled predictions are fakes too.

        All go through D as one batch: D has no normalisation layer, so this equals separate passes.
        """
        assert self.discriminator is not None
        fakes = probabilities if probabilities_unlabeled is None else torch.cat([probabilities,
                                                                                probabilities_unlabeled])
        with autocast(self.device, self.dtype):
            logits = self.discriminator(torch.cat([target, fakes.detach()])).float()
        loss = self.confidence_loss(logits[:len(target)], logits[len(target):])
        self._update("D", loss)
        return loss.detach()

    def step_importance(self, features_labeled: torch.Tensor, features_unlabeled: torch.Tensor) -> torch.Tensor:
        """(6) D0 learns labeled (1) vs unlabeled (0) from detached features: no gradient reaches S. Returns the
        loss. One batch through D0, which has no normalisation layer (so it equals two passes)."""
        assert self.importance is not None
        n = len(features_labeled)
        with autocast(self.device, self.dtype):
            logits = self.importance(torch.cat([features_labeled, features_unlabeled]).detach()).float()
        loss = self.importance_loss(logits[:n], logits[n:])
        self._update("D0", loss)
        return loss.detach()

    def _update(self, name: str, loss: torch.Tensor) -> None:
        """Back-propagate, average gradients over ranks and step; a non-finite loss or gradient on any rank
        discards the step on every rank, so the networks stay identical everywhere."""
        optimiser = self.optimisers[name]
        optimiser.zero_grad(set_to_none=True)
        if self.group.any(not bool(torch.isfinite(loss)), self.device):
            self.discarded.append(name)
            return
        loss.backward()
        params = [p for group in optimiser.param_groups for p in group["params"] if p.grad is not None]
        self.group.average_gradients(params)
        if not torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])):
            optimiser.zero_grad(set_to_none=True)
            self.discarded.append(name)
            return
        optimiser.step()

    def weights_are_finite(self) -> bool:
        """True when no network holds a NaN or infinite weight."""
        return all(torch.isfinite(p).all() for net in self.networks().values() for p in net.parameters())

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
    stopped: bool = False
    steps_per_epoch: int = 0


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


def _shuffled_batches(dataset: SliceDataset, batch_size: int, seed: int, group: ProcessGroup,
                      pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled batches, the shuffle fixed by ``seed`` so a resumed epoch sees the same batches.

    In a distributed run each rank draws from its own shard of the slices (a DistributedSampler). No worker
    processes: a batch is a crop of slices already in memory (0.8 ms for 8 of 128 x 128 here), and workers would
    take cores from the step. ``pin_memory`` (for CUDA) makes the copy to the GPU asynchronous.
    """
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
    come after the warm-up epochs only.
    """
    seed = config.seed * 100_003 + epoch
    pin = device.type == "cuda"
    labeled_set.reseed(seed)
    labeled = _shuffled_batches(labeled_set, config.batch_size, seed, group, pin)
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


def validation_dice(segmenter: torch.nn.Module, volumes: Sequence[PreparedVolume], num_classes: int,
                    device: torch.device, dtype: torch.dtype, batch_size: int, slice_size: tuple[int, int]) -> float:
    """Mean over volumes of the mean foreground Dice, on the model's slice grid, slices padded as in training."""
    scores = []
    for volume in volumes:
        prediction = np.empty(volume.image.shape, dtype=np.uint8)
        for start, probs, _ in predict_slices(segmenter, volume.image, batch_size=batch_size, device=device,
                                              dtype=dtype, slice_size=slice_size, fill=volume.minimum):
            prediction[start:start + len(probs)] = probs.argmax(1).cpu().numpy()
        per_class = dice_per_class(prediction, np.asarray(volume.label), range(1, num_classes))
        scores.append(float(np.mean(list(per_class.values()))))
    return float(np.mean(scores))


def _label_indices(label: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Map label values (which need not be 0..C-1) to class indices."""
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[list(values)] = np.arange(len(values), dtype=np.uint8)
    return lookup[label]


class StopRequest:
    """Turns SIGTERM and SIGINT into a request that the loop honours between iterations (main thread only).

    The Slicer module's Stop sends SIGTERM: training then writes a checkpoint at the iteration it reached and
    exits cleanly, so Resume loses nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(labeled: Sequence[Case], unlabeled: Sequence[Case], labels: dict[int, str], out: Path,
          config: TrainConfig, *, colors: Optional[dict[int, list[int]]] = None, progress: Optional[Progress] = None,
          resume: bool = False, cache_dir: Optional[Path] = None, best_out: Optional[Path] = None) -> TrainResult:
    """Train on labeled and unlabeled cases and write the best model to ``out`` (safetensors + JSON header).

    A checkpoint is written atomically after every epoch and when a stop is requested (SIGTERM/SIGINT);
    ``resume`` continues from it, mid-epoch included, and gives the same run as an uninterrupted one.
    """
    config.validate()
    progress = progress or Progress(json_lines=False)
    out = Path(out)
    if not labeled:
        raise TrainingError("no labeled case: ISDNet needs at least one annotated volume")
    if not out.parent.is_dir():
        raise InputError(out.parent, "the output folder does not exist")
    if sorted(labels)[0] != 0:
        raise TrainingError(f"the labels must include 0 (background), got {sorted(labels)}")
    group = init_from_environment(config.device)
    if not group.is_main:
        progress = Progress(json_lines=True, stream=open(os.devnull, "w"))  # noqa: SIM115 - rank 0 reports
    try:
        with OutputLock(out) if group.is_main else contextlib.nullcontext(), StopRequest() as stop, \
                tempfile.TemporaryDirectory(prefix="isdnet-cache-", dir=cache_dir) as cache:
            run = _TrainingRun(labeled, unlabeled, labels, out, config, colors, progress, Path(cache), group)
            run.best_out = best_out
            return run.run(resume, stop)
    finally:
        shutdown(group)


class _TrainingRun:
    """One training job: the data prepared once, then epochs of iterations with validation and checkpoints."""

    def __init__(self, labeled: Sequence[Case], unlabeled: Sequence[Case], labels: dict[int, str], out: Path,
                 config: TrainConfig, colors: Optional[dict[int, list[int]]], progress: Progress, cache: Path,
                 group: ProcessGroup):
        self.started = time.monotonic()
        self.group = group
        self.config, self.out, self.progress = config, out, progress
        self.best_out: Optional[Path] = None  # where the best epoch on validation also goes, if anywhere
        self.values = sorted(labels)
        self.device = resolve_device(config.device)
        self.dtype = resolve_precision(config.precision, self.device, training=True)
        unlabeled = list(unlabeled) if config.uses_unlabeled else []
        train_cases, val_cases = split_validation(labeled, config.validation_fraction, config.seed)
        # Two passes, one volume in memory at a time: grids to plan the slice geometry, then slices to the cache.
        grids = [ImageGrid.of(read_image(case.image)) for case in [*train_cases, *unlabeled]]
        self.geometry = plan_geometry(grids, config.slice_axis, spacing=config.slice_spacing,
                                      size=config.slice_size)
        self.labeled_set = SliceDataset(cache_volumes(self._prepared(train_cases), cache / "labeled"),
                                        self.geometry.size, labeled=True, random_crop=True, seed=config.seed)
        unlabeled_volumes = cache_volumes(self._prepared(unlabeled), cache / "unlabeled")
        self.unlabeled_set = (SliceDataset(unlabeled_volumes, self.geometry.size, labeled=False, random_crop=True,
                                           seed=config.seed) if unlabeled_volumes else None)
        self.val_volumes = list(self._prepared(val_cases))
        self.trainer = Trainer(config, len(self.values), self.device, self.dtype, group)
        self.steps = config.steps_per_epoch or max(1, math.ceil(len(self.labeled_set) / config.batch_size))
        self.epochs = max(1, round(config.total_steps / self.steps)) if config.total_steps else config.epochs
        self.header = _model_header(config, labels, colors, self.geometry, self.trainer, dict(
            labeled_cases=len(train_cases), validation_cases=len(val_cases), unlabeled_cases=len(unlabeled),
            labeled_slices=len(self.labeled_set),
            unlabeled_slices=len(self.unlabeled_set) if self.unlabeled_set else 0))
        # epoch: last complete epoch; iteration/sums: progress inside the next one (after a stop)
        self.state: dict[str, Any] = dict(epoch=0, iteration=0, sums={}, best_val_dice=None, best_epoch=0,
                                          history=[])

    def _prepared(self, cases: Sequence[Case]) -> Iterator[PreparedVolume]:
        """Each case read, checked and cut into model slices, one at a time."""
        for case in cases:
            image = read_image(case.image)
            label = read_label(case.label, image, self.values) if case.label is not None else None
            volume = prepare_volume(image, self.geometry, label, source=case.image)
            if volume.label is not None:
                volume.label = _label_indices(volume.label, self.values)
            yield volume

    def run(self, resume: bool, stop: StopRequest) -> TrainResult:
        if resume:
            self._resume()
        config, state = self.config, self.state
        self.progress.emit(
            "start", epochs=self.epochs, iterations_per_epoch=self.steps, start_epoch=state["epoch"] + 1,
            start_iteration=state["iteration"] + 1, labeled_slices=len(self.labeled_set),
            unlabeled_slices=self.header["provenance"]["unlabeled_slices"], validation_cases=len(self.val_volumes),
            device=str(self.device), precision=str(self.dtype).split(".")[-1], method=config.method,
            setup_s=round(time.monotonic() - self.started, 2))
        good = {k: v.clone() for k, v in self.trainer.state_tensors().items()}
        run_started, run_steps = time.monotonic(), 0
        total_steps = (self.epochs - state["epoch"]) * self.steps - state["iteration"]
        for epoch in range(state["epoch"] + 1, self.epochs + 1):
            batches = epoch_batches(self.labeled_set, self.unlabeled_set, config, epoch, self.device, self.group)
            for iteration in range(1, self.steps + 1):
                x_l, y_l, x_u, augmentation_u = next(batches)
                if iteration <= state["iteration"]:
                    continue  # replayed to restore the data order of a stopped epoch; no compute
                self.trainer.set_progress(((epoch - 1) * self.steps + iteration - 1) / (self.epochs * self.steps))
                if config.semi_rampup_epochs:
                    ramp = (epoch - 1 - config.warmup_epochs + (iteration - 1) / self.steps) / config.semi_rampup_epochs
                    self.trainer.semi_scale = min(1.0, max(0.0, ramp))
                losses = self.trainer.train_step(x_l, y_l, x_u, augmentation_u)
                if "discarded" in losses:
                    self.progress.emit("nonfinite", epoch=epoch, iteration=iteration,
                                       message=f"non-finite loss or gradient at epoch {epoch}, iteration "
                                               f"{iteration}: that update was discarded")
                for key, value in losses.items():
                    if math.isfinite(value):
                        state["sums"][key] = state["sums"].get(key, 0.0) + value
                state["iteration"] = iteration
                run_steps += 1
                eta = (time.monotonic() - run_started) / run_steps * (total_steps - run_steps)
                self.progress.emit("iteration", epoch=epoch, iteration=iteration, iterations=self.steps,
                                   losses=_rounded(losses), eta_s=round(eta, 1))
                if self.group.any(stop.requested, self.device) and iteration < self.steps:
                    self._checkpoint(epoch - 1)
                    self.progress.emit("stopped", epoch=epoch, iteration=iteration,
                                       message="training stopped; resume continues from here")
                    return self._result(stopped=True)
            if not self.trainer.weights_are_finite():
                self.trainer.load_state_tensors({k: v.clone() for k, v in good.items()})
                self.progress.emit("rollback", epoch=epoch, message=f"non-finite weights after epoch {epoch}: "
                                   "rolled back to the last good state")
            good = {k: v.clone() for k, v in self.trainer.state_tensors().items()}
            self._end_epoch(epoch, run_started, run_steps, total_steps)
            if self.group.any(stop.requested, self.device) and epoch < self.epochs:
                self.progress.emit("stopped", epoch=epoch, iteration=self.steps,
                                   message="training stopped; resume continues from here")
                return self._result(stopped=True)
        self.progress.emit("done", model=str(self.out), best_val_dice=state["best_val_dice"],
                           best_epoch=state["best_epoch"])
        return self._result(stopped=False)

    def _end_epoch(self, epoch: int, run_started: float, run_steps: int, total_steps: int) -> None:
        """Validate, keep the best model, checkpoint, report."""
        state, config = self.state, self.config
        means = {k: v / self.steps for k, v in state["sums"].items()}
        val = None
        if self.val_volumes and self.group.is_main:
            val = validation_dice(self.trainer.segmenter, self.val_volumes, len(self.values), self.device,
                                  self.dtype, config.batch_size, self.geometry.size)
        best = val is None or state["best_val_dice"] is None or val > state["best_val_dice"]
        if best:
            state["best_val_dice"], state["best_epoch"] = val, epoch
        if self.group.is_main:
            self.header["provenance"]["validation"] = {"dice": val, "epoch": epoch}
            self.header["provenance"]["training_time_s"] = round(time.monotonic() - self.started, 1)
            confidence = self.trainer.confidence_net
            if best and self.best_out is not None:
                save_model(self.best_out, self.header, self.trainer.segmenter, confidence)
            if best or config.model_selection == "final":
                save_model(self.out, self.header, self.trainer.segmenter, confidence)
        state["history"].append({"epoch": epoch, "losses": _rounded(means), "val_dice": val,
                                 "semi": self.unlabeled_set is not None and epoch > config.warmup_epochs})
        state["iteration"], state["sums"] = 0, {}
        path = self._checkpoint(epoch)
        self.progress.emit("checkpoint", epoch=epoch, path=str(path))
        elapsed = time.monotonic() - run_started
        self.progress.emit("epoch", epoch=epoch, epochs=self.epochs, losses=_rounded(means), val_dice=val,
                           best_val_dice=state["best_val_dice"], elapsed_s=round(time.monotonic() - self.started, 1),
                           eta_s=round(elapsed / max(run_steps, 1) * (total_steps - run_steps), 1))

    def _checkpoint(self, epoch: int) -> Path:
        """Write the checkpoint (rank 0 only; the others wait so that none runs ahead of a stop)."""
        self.state["epoch"] = epoch
        path = checkpoint_path(self.out)
        if self.group.is_main:
            meta = {"config": dataclasses.asdict(self.config), "header": self.header, "state": self.state}
            save_checkpoint(path, self.trainer.state_tensors(), meta)
        self.group.barrier()
        return path

    def _resume(self) -> None:
        """Restore the newest sound checkpoint; it must come from a run with the same options and data."""
        tensors, meta, path = load_latest(checkpoint_path(self.out),
                                          report=lambda text: self.progress.emit("message", message=text))
        saved, current = meta["config"], json.loads(json.dumps(dataclasses.asdict(self.config)))  # as saved
        changed = [k for k in current if k not in RESUMABLE_CHANGES and k in saved and saved[k] != current[k]]
        if changed:
            raise InputError(path, f"the checkpoint was made with other options ({', '.join(changed)}); "
                                   "resume with the same options or start a new training")
        if meta["header"]["geometry"] != self.header["geometry"] or \
                meta["header"]["classes"] != self.header["classes"]:
            raise InputError(path, "the checkpoint was made on other data (slice geometry or classes differ)")
        self.trainer.load_state_tensors({k: v.to(self.device) for k, v in tensors.items()})
        self.state = meta["state"]
        if "validation" in meta["header"]["provenance"]:
            self.header["provenance"]["validation"] = meta["header"]["provenance"]["validation"]

    def _result(self, stopped: bool) -> TrainResult:
        s = self.state
        return TrainResult(self.out, s["best_val_dice"], s["best_epoch"], s["epoch"], s["history"], stopped,
                           self.steps)


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in values.items()}


def _model_header(config: TrainConfig, labels: dict[int, str], colors: Optional[dict[int, list[int]]],
                  geometry: SliceGeometry, trainer: Trainer, counts: dict[str, int]) -> dict[str, Any]:
    """The model file's JSON header: everything inference and a reader of provenance need."""
    values = sorted(labels)
    palette = default_colors(len(values))
    confidence = trainer.confidence_net
    header = make_header([labels[v] for v in values], dict(NORMALISATION), geometry.to_dict(), trainer.segmenter,
                         confidence, method=config.method,
                         colors=[list((colors or {}).get(v, palette[i])) for i, v in enumerate(values)],
                         hyperparameters=dataclasses.asdict(config), **counts)
    for cls, value in zip(header["classes"], values):
        cls["value"] = value
    return header
