"""The losses of ISDNet, numbered as in the paper (Ning, Zhao, Qian).

Each is a small ``nn.Module`` whose options are checked in ``__init__``. Shapes: probabilities and one-hot
targets are (N, C, H, W); confidence logits are (N, 1, H, W); importance logits are (N,).

Where the paper is ambiguous the choice is stated here and pinned by a test:
- (2) has two readings, both implemented (``WeightedDiceLoss(form=...)``), with I_c = sum_p Y^c Yhat^c and
  U_c = sum_p (Y^c + Yhat^c) and a small smoothing term: "pooled", 1 - 2 sum_c w_c I_c / sum_c w_c U_c, and
  "per-class", 1 - sum_c w_c (2 I_c / U_c) / sum_c w_c. Training uses "per-class" by default. Measured on the
  demo phantoms (lesions 2% of the voxels, weights 0.2/1.2/2.2, 10 epochs): with "pooled" the lesion Dice
  stayed 0.0, because the classes share one denominator and the softmax gradient towards a small class
  vanishes once it is predicted nowhere; "per-class" learned the lesions within 3 epochs. The per-class
  reading is also the one in which the paper's weights can matter: a weight of 2.2 cannot offset a 40-fold
  volume ratio inside one pooled ratio. ``--dice-form pooled`` gives the other reading.
- Losses on unlabeled samples carry a per-sample importance weight w. (8) pools the unlabeled batch into one
  Dice, as (2) pools the labeled batch, and w scales each sample's pixels in its sums; a per-sample Dice would
  give a slice's pixels a gradient scaled by 1 / (its class sizes), so small spurious blobs on edge slices would
  count most. (9) averages w times each sample's mean BCE. L_wadv sums the mean over the labeled samples (w = 1)
  and the weighted mean over the unlabeled ones, so adding unlabeled slices to a batch leaves the labeled term's
  weight unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DICE_FORMS

# The paper's weights for background, liver and lesion (LiTS); its left-atrium model uses plain Dice, as training
# does unless class weights are given.
PAPER_LIVER_WEIGHTS = (0.2, 1.2, 2.2)


class WeightedDiceLoss(nn.Module):
    """(2) L_Dice: weighted multi-class Dice between probabilities and a one-hot target.

    ``form="pooled"`` is the usual weighted form 1 - 2 sum_c w_c I_c / sum_c w_c U_c (one shared ratio);
    ``form="per-class"`` is 1 - sum_c w_c Dice_c / sum_c w_c, each class with its own ratio.

    ``reduction="batch"`` pools all samples into one Dice; ``"none"`` returns one Dice loss per sample. Optional
    ``pixel_weights`` (N, 1, H, W) scale each pixel's share of the intersection and union sums: a 0/1 mask
    restricts the sums to the selected pixels (with none selected the loss is 0), and (8) puts each unlabeled
    sample's importance weight there.
    """

    def __init__(self, class_weights: Sequence[float], smooth: float = 1e-5, reduction: str = "batch",
                 form: str = "per-class"):
        super().__init__()
        weights = torch.as_tensor(list(class_weights), dtype=torch.float32)
        if weights.ndim != 1 or len(weights) < 2:
            raise ValueError(f"class_weights needs one weight per class (at least 2), got {list(class_weights)}")
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"class_weights must be finite, non-negative and not all zero, got {weights.tolist()}")
        if smooth < 0:
            raise ValueError(f"smooth must be non-negative, got {smooth}")
        if reduction not in ("batch", "none"):
            raise ValueError(f"reduction must be 'batch' or 'none', got {reduction!r}")
        if form not in DICE_FORMS:
            raise ValueError(f"form must be one of {DICE_FORMS}, got {form!r}")
        self.register_buffer("class_weights", weights)
        self.smooth = smooth
        self.reduction = reduction
        self.form = form

    def forward(self, probabilities: torch.Tensor, target: torch.Tensor,
                pixel_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if probabilities.shape != target.shape:
            raise ValueError(f"probabilities {tuple(probabilities.shape)} and target {tuple(target.shape)} differ")
        if probabilities.shape[1] != len(self.class_weights):
            raise ValueError(f"{probabilities.shape[1]} channels but {len(self.class_weights)} class weights")
        probabilities = probabilities.float()
        target = target.float()
        dims = (2, 3) if self.reduction == "none" else (0, 2, 3)
        products, sums = probabilities * target, probabilities + target
        if pixel_weights is not None:
            products, sums = products * pixel_weights, sums * pixel_weights
        intersection, union = products.sum(dims), sums.sum(dims)
        w = self.class_weights
        if self.form == "per-class":
            dice = (2 * intersection + self.smooth) / (union + self.smooth)
            return 1 - (dice * w).sum(-1) / w.sum()
        numerator = 2 * (intersection * w).sum(-1) + self.smooth
        denominator = (union * w).sum(-1) + self.smooth
        return 1 - numerator / denominator


def _bce_to(logits: torch.Tensor, value: float, per_sample: bool) -> torch.Tensor:
    """BCE of logits against a constant label, averaged over everything or per sample."""
    target = torch.full_like(logits, value)
    loss = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return loss.flatten(1).mean(1) if per_sample else loss.mean()


class ConfidenceNetLoss(nn.Module):
    """(3) L_D = BCE(D(Y), 1) + BCE(D(S(X)), 0), per pixel, on labeled data with S's output detached."""

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return _bce_to(real_logits, 1.0, False) + _bce_to(fake_logits, 0.0, False)


class AdversarialLoss(nn.Module):
    """(4) and (9): L_adv = BCE(D(S(X)), 1) per pixel; with ``weights`` (N,), each sample's loss is scaled (L_wadv).

    Returns the mean over the batch of w_i * mean_p BCE_i; without weights, w = 1 (labeled samples).
    """

    def forward(self, fake_logits: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        per_sample = _bce_to(fake_logits, 1.0, True)
        if weights is not None:
            per_sample = per_sample * weights.detach().to(per_sample.dtype)
        return per_sample.mean()


class SemiSupervisedLoss(nn.Module):
    """(5) and (8): L_semi, the Dice of (2) between Yhat and its own argmax, at pixels whose confidence passes T_semi.

    The confidence is sigmoid(D(S(X))); only pixels with confidence strictly above ``threshold`` count. The
    pseudo-label and the mask carry no gradient. The Dice pools the unlabeled batch, as the labeled Dice does;
    with ``weights`` (N,), each sample's pixels count w times in the sums (L_wsemi).
    """

    def __init__(self, class_weights: Sequence[float], threshold: float = 0.1, smooth: float = 1e-5,
                 form: str = "per-class"):
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold (T_semi) must lie in [0, 1], got {threshold}")
        self.threshold = threshold
        self.dice = WeightedDiceLoss(class_weights, smooth=smooth, form=form)

    def confident_mask(self, confidence_logits: torch.Tensor) -> torch.Tensor:
        """1 where sigmoid(D(S(X))) > T_semi, else 0; (N, 1, H, W), no gradient."""
        return (torch.sigmoid(confidence_logits.detach().float()) > self.threshold).float()

    def forward(self, probabilities: torch.Tensor, confidence_logits: torch.Tensor,
                weights: Optional[torch.Tensor] = None, pseudo_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``pseudo_labels`` (N, H, W) replace the prediction's own argmax (the paper's Ybar) when given."""
        if pseudo_labels is None:
            pseudo_labels = probabilities.detach().argmax(1)
        pseudo = F.one_hot(pseudo_labels, probabilities.shape[1]).permute(0, 3, 1, 2)
        pixel_weights = self.confident_mask(confidence_logits)
        if weights is not None:
            pixel_weights = pixel_weights * weights.detach().float().view(-1, 1, 1, 1)
        return self.dice(probabilities, pseudo, pixel_weights)


class ImportanceNetLoss(nn.Module):
    """(6) BCE(D0(Z(X_l)), 1) + BCE(D0(Z(X_unl)), 0), on features the caller has detached from S."""

    def forward(self, labeled_logits: torch.Tensor, unlabeled_logits: torch.Tensor) -> torch.Tensor:
        return _bce_to(labeled_logits, 1.0, False) + _bce_to(unlabeled_logits, 0.0, False)


def importance_weights(importance_logits: torch.Tensor) -> torch.Tensor:
    """(7) w(z) = 1 - D0(z) for unlabeled samples, detached: high for samples unlike the labeled data."""
    return 1.0 - torch.sigmoid(importance_logits.detach().float())
