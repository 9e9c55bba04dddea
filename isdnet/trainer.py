"""One ISDNet iteration: S, then D, then D0, each with its losses (numbered as in the paper) and Adam.

The method option selects the rows of the paper's Tables 1 and 3:

- ``baseline``: SU-Net on labeled data, trained with L_Dice; by default every method adds a cross-entropy term
  to it (``cross_entropy``; 0 gives the paper's loss).
- ``adv``: + the FCN confidence network's adversarial loss, labeled data only.
- ``adv-classifier``: + an image-level discriminator instead (Luc et al.), labeled data only.
- ``hung``: adversarial + confidence-masked self-training on unlabeled data, no importance weights (Hung et al.).
- ``isdnet``: the full method, with importance weights w = 1 - D0(Z(X)) on unlabeled samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .distributed import ProcessGroup
from .errors import ModelFileError
from .losses import (
    AdversarialLoss,
    ConfidenceNetLoss,
    ImportanceNetLoss,
    SemiSupervisedLoss,
    WeightedDiceLoss,
    importance_weights,
)
from .modelfile import LoadedModel
from .networks import ImportanceNet, SUNet, architecture, discriminator_input, network_class, role_of
from .runtime import autocast
from .slices import Augmentation

POLY_POWER = 0.9  # Hung et al.'s poly decay


@dataclass
class SegmenterStep:
    """What S's update leaves for the D and D0 updates of the same iteration (all detached)."""

    losses: dict[str, torch.Tensor]  # detached scalars, read back once per iteration
    target: torch.Tensor  # one-hot labels of the labeled samples
    probabilities: torch.Tensor  # S's softmax on the labeled samples
    probabilities_unlabeled: Optional[torch.Tensor]  # and on the unlabeled ones, when D also learns from them
    images: torch.Tensor  # the slices of those predictions, for a D conditioned on the image
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

    def start_from(self, model: LoadedModel, path: Path) -> None:
        """Fine-tuning: S (and D, when the model has a confidence network of D's architecture) start from a
        trained model's weights; D0 and the optimisers start afresh. ModelFileError if S's architecture differs."""
        if architecture(model.segmenter) != architecture(self.segmenter):
            raise ModelFileError(path, f"its segmenter is {architecture(model.segmenter)}, but this training builds "
                                       f"{architecture(self.segmenter)}; train with the model's options "
                                       "(e.g. --base-channels)")
        self.segmenter.load_state_dict(model.segmenter.state_dict())
        d = self.confidence_net
        if model.confidence is not None and d is not None and architecture(model.confidence) == architecture(d):
            d.load_state_dict(model.confidence.state_dict())
        for net in self.networks().values():
            self.group.broadcast_parameters(net)

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
            losses["d"] = self.step_confidence(step.target, step.probabilities, step.probabilities_unlabeled,
                                               step.images)
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
                confidence_logits = self.discriminator(discriminator_input(self.discriminator, probabilities,
                                                                           x)).float()
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
        with_unlabeled = semi and cfg.confidence_on_unlabeled
        return SegmenterStep(
            losses=losses, target=target, probabilities=probabilities[:n_labeled].detach(),
            probabilities_unlabeled=probabilities[n_labeled:].detach() if with_unlabeled else None,
            images=(x if with_unlabeled else x[:n_labeled]).detach(),
            features_labeled=features[:n_labeled].detach(),
            features_unlabeled=features[n_labeled:].detach() if semi else None, weights=weights)

    def step_confidence(self, target: torch.Tensor, probabilities: torch.Tensor,
                        probabilities_unlabeled: Optional[torch.Tensor] = None,
                        images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(3) L_D on labeled data: ground truth -> 1, S's (detached) prediction -> 0; returns the loss. With
        ``probabilities_unlabeled`` (the ``confidence_on_unlabeled`` variant), S's unlabeled predictions are fakes too.
        ``images`` are the slices of all the predictions (labeled first), needed by a D conditioned on the image.

        All go through D as one batch: D has no normalisation layer, so this equals separate passes.
        """
        assert self.discriminator is not None
        fakes = probabilities if probabilities_unlabeled is None else torch.cat([probabilities,
                                                                                probabilities_unlabeled])
        seen = torch.cat([target, fakes.detach()])
        if images is not None:
            seen = discriminator_input(self.discriminator, seen, torch.cat([images[:len(target)], images]))
        with autocast(self.device, self.dtype):
            logits = self.discriminator(seen).float()
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

    def check_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raise ValueError naming the first tensor that ``load_state_tensors`` could not restore: a missing or
        extra network weight, or one of another shape; an optimiser slot of no parameter or of another shape."""
        expected = {f"net.{name}.{key}": tuple(value.shape) for name, net in self.networks().items()
                    for key, value in net.state_dict().items()}
        for name, optimiser in self.optimisers.items():
            parameters = [p for group in optimiser.param_groups for p in group["params"]]
            for index, parameter in enumerate(parameters):
                expected.update({f"opt.{name}.{index}.step": (), f"opt.{name}.{index}.exp_avg": tuple(parameter.shape),
                                 f"opt.{name}.{index}.exp_avg_sq": tuple(parameter.shape)})
        for key, tensor in tensors.items():
            if key not in expected:
                raise ValueError(f"tensor {key} belongs to no network or optimiser of this training")
            if tuple(tensor.shape) != expected[key]:
                raise ValueError(f"tensor {key} has shape {tuple(tensor.shape)}, not {expected[key]}")
        slots = {key.rsplit(".", 1)[0] for key in tensors if key.startswith("opt.")}  # the parameters Adam has seen
        missing = [key for key in expected if key not in tensors and (key.startswith("net.")
                                                                     or key.rsplit(".", 1)[0] in slots)]
        if missing:
            raise ValueError(f"tensor {missing[0]} is missing")

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

