"""Each loss of the paper as a table of tiny tensors with values computed by hand (in the comments), plus a test
per bad option, in the manner of MONAI's loss tests."""

import math

import pytest
import torch

from isdnet.losses import (
    AdversarialLoss,
    ConfidenceNetLoss,
    ImportanceNetLoss,
    SemiSupervisedLoss,
    WeightedDiceLoss,
    importance_weights,
)


def pixels(probabilities, classes=None):
    """(N=1, C, H=1, W=P) probabilities from per-pixel rows, and the one-hot target of per-pixel classes."""
    p = torch.tensor(probabilities, dtype=torch.float32).T[None, :, None, :]
    if classes is None:
        return p
    t = torch.nn.functional.one_hot(torch.tensor(classes), p.shape[1]).T[None, :, None, :].float()
    return p, t


# Two pixels, targets 0 and 1, probabilities (0.8, 0.2) and (0.4, 0.6):
# class 0: I = 0.8, U = 1.2 + 1 = 2.2; class 1: I = 0.6, U = 0.8 + 1 = 1.8.
TWO = ([[0.8, 0.2], [0.4, 0.6]], [0, 1])
# Three pixels, targets 0, 1, 2: I = (0.7, 0.6, 0.6), U = (2.0, 2.0, 2.0).
THREE = ([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], [0, 1, 2])

DICE_CASES = [
    # (options, pixels, pixel weights or None, expected loss)
    # per-class, plain: 1 - (1.6 / 2.2 + 1.2 / 1.8) / 2
    (dict(class_weights=(1, 1)), TWO, None, 1 - (1.6 / 2.2 + 1.2 / 1.8) / 2),
    # per-class, weights (1, 3): 1 - (1.6 / 2.2 + 3 * 1.2 / 1.8) / 4
    (dict(class_weights=(1, 3)), TWO, None, 1 - (1.6 / 2.2 + 3 * 1.2 / 1.8) / 4),
    # per-class, the paper's liver weights: 1 - (0.2 * 0.7 + 1.2 * 0.6 + 2.2 * 0.6) / 3.6
    (dict(class_weights=(0.2, 1.2, 2.2)), THREE, None, 1 - 2.18 / 3.6),
    # pooled, plain: 1 - 2 * 1.4 / 4.0
    (dict(class_weights=(1, 1), form="pooled"), TWO, None, 0.3),
    # pooled, weighted: 1 - 2 * (0.2 * 0.8 + 1.2 * 0.6) / (0.2 * 2.2 + 1.2 * 1.8)
    (dict(class_weights=(0.2, 1.2), form="pooled"), TWO, None, 1 - 1.76 / 2.6),
    # pooled, three classes: 1 - 2 * (0.14 + 0.72 + 1.32) / (0.4 + 2.4 + 4.4)
    (dict(class_weights=(0.2, 1.2, 2.2), form="pooled"), THREE, None, 1 - 4.36 / 7.2),
    # pixel weights (0.5, 1), pooled: I = 0.5 * 0.8 + 0.6 = 1.0; U = 0.5 * 1.8 + 0.4 + 0.5 * 0.2 + 1.6 = 3.0
    (dict(class_weights=(1, 1), form="pooled"), TWO, [0.5, 1.0], 1 - 2 * 1.0 / 3.0),
    # a 0/1 mask dropping pixel 3: I = (0.7, 0.6, 0), U = (1.8, 1.8, 0.4); class 2 Dice 0 (up to smoothing)
    (dict(class_weights=(1, 1, 1)), THREE, [1.0, 1.0, 0.0], 1 - (1.4 / 1.8 + 1.2 / 1.8) / 3),
]


@pytest.mark.parametrize("options, case, pixel_weights, expected", DICE_CASES)
def test_weighted_dice_matches_hand_computation(options, case, pixel_weights, expected):
    p, t = pixels(*case)
    weights = None if pixel_weights is None else torch.tensor(pixel_weights).view(1, 1, 1, -1)
    loss = WeightedDiceLoss(**options, smooth=1e-7)(p, t, weights)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_dice_defaults_to_the_per_class_form_that_training_uses():
    p, t = pixels(*TWO)
    assert WeightedDiceLoss((1, 1), smooth=0.0)(p, t).item() == pytest.approx(1 - (1.6 / 2.2 + 1.2 / 1.8) / 2)


def test_dice_is_zero_for_a_perfect_prediction_and_reductions_pool_or_keep_samples():
    _, t = pixels(*THREE)
    assert WeightedDiceLoss((0.2, 1.2, 2.2))(t, t).item() == pytest.approx(0.0, abs=1e-6)
    p, t = pixels(*TWO)
    both_p, both_t = torch.cat([p, t]), torch.cat([t, t])
    # batch: I = (1.8, 1.6), U = (4.2, 3.8) over both samples
    pooled = WeightedDiceLoss((1, 1), smooth=0.0)(both_p, both_t)
    assert pooled.item() == pytest.approx(1 - (3.6 / 4.2 + 3.2 / 3.8) / 2, abs=1e-6)
    per_sample = WeightedDiceLoss((1, 1), smooth=0.0, reduction="none")(both_p, both_t)
    assert per_sample.tolist() == pytest.approx([1 - (1.6 / 2.2 + 1.2 / 1.8) / 2, 0.0], abs=1e-6)


@pytest.mark.parametrize("options", [dict(class_weights=[1.0]), dict(class_weights=[1.0, -1.0]),
                                     dict(class_weights=[0.0, 0.0]), dict(class_weights=[1.0, float("nan")]),
                                     dict(class_weights=[1, 1], smooth=-1.0),
                                     dict(class_weights=[1, 1], reduction="mean"),
                                     dict(class_weights=[1, 1], form="generalised")])
def test_dice_rejects_bad_options(options):
    with pytest.raises(ValueError):
        WeightedDiceLoss(**options)


def test_dice_rejects_mismatched_shapes():
    p, t = pixels(*TWO)
    with pytest.raises(ValueError, match="differ"):
        WeightedDiceLoss((1.0, 1.0))(p, t[:, :, :, :1])
    with pytest.raises(ValueError, match="class weights"):
        WeightedDiceLoss((1.0, 1.0, 1.0))(p, t)


SEMI_CASES = [
    # (probabilities per sample, confidence logits per sample, sample weights, threshold, expected)
    # pseudo-labels (0, 1, 2); confidences 0.5, 0.5, 0.047: pixel 3 is below T_semi = 0.1, so as the masked
    # Dice case above: 1 - (1.4 / 1.8 + 1.2 / 1.8 + 0) / 3
    ([THREE[0]], [[0.0, 0.0, -3.0]], None, 0.1, 1 - (1.4 / 1.8 + 1.2 / 1.8) / 3),
    # every pixel confident: the pseudo-labels equal THREE's targets, so 1 - (0.7 + 0.6 + 0.6) / 3
    ([THREE[0]], [[5.0, 5.0, 5.0]], None, 0.1, 1 - 1.9 / 3),
    # (8) pools the batch, each sample's pixels weighted by its w: sample A (0.8, 0.2) -> class 0, w 0.5;
    # sample B (0.3, 0.7) -> class 1, w 1. Class 0: I = 0.4, U = 0.5 * 1.8 + 0.3 = 1.2;
    # class 1: I = 0.7, U = 0.5 * 0.2 + 1.7 = 1.8. Loss 1 - (0.8 / 1.2 + 1.4 / 1.8) / 2
    ([[[0.8, 0.2]], [[0.3, 0.7]]], [[5.0], [5.0]], [0.5, 1.0], 0.1, 1 - (0.8 / 1.2 + 1.4 / 1.8) / 2),
    # the same pair with equal weights is the unweighted pooled Dice: class 0 I = 0.8, U = 2.1; class 1
    # I = 0.7, U = 1.9
    ([[[0.8, 0.2]], [[0.3, 0.7]]], [[5.0], [5.0]], [1.0, 1.0], 0.1, 1 - (1.6 / 2.1 + 1.4 / 1.9) / 2),
    # no pixel strictly above the threshold (sigmoid(0) = 0.5 = T_semi): nothing to learn, loss 0
    ([THREE[0]], [[0.0, 0.0, 0.0]], None, 0.5, 0.0),
]


@pytest.mark.parametrize("samples, confidences, weights, threshold, expected", SEMI_CASES)
def test_semi_loss_matches_hand_computation(samples, confidences, weights, threshold, expected):
    p = torch.cat([pixels(s) for s in samples])
    confidence = torch.tensor(confidences).view(len(samples), 1, 1, -1)
    w = None if weights is None else torch.tensor(weights)
    loss = SemiSupervisedLoss([1.0] * p.shape[1], threshold=threshold, smooth=1e-7)(p, confidence, w)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_semi_loss_gradient_reaches_probabilities_only():
    p = pixels(THREE[0])
    p.requires_grad_(True)
    confidence = torch.zeros(1, 1, 1, 3, requires_grad=True)
    SemiSupervisedLoss((1.0, 1.0, 1.0), threshold=0.1)(p, confidence, torch.tensor([0.5])).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert confidence.grad is None


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_semi_loss_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="T_semi"):
        SemiSupervisedLoss((1.0, 1.0), threshold=threshold)


BCE_CASES = [
    # (loss, inputs, expected): BCE(2, 1) = ln(1 + e^-2) = 0.126928; BCE(-1, 0) = ln(1 + e^-1) = 0.313262
    (ConfidenceNetLoss(), (torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -1.0)), 0.126928 + 0.313262),
    (ConfidenceNetLoss(), (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)), 2 * math.log(2)),
    # ln 3 gives sigmoid 0.75: BCE(ln 3, 1) = ln(4/3) = 0.287682; BCE(ln 3, 0) = ln 4 = 1.386294
    (ImportanceNetLoss(), (torch.tensor([math.log(3.0)]), torch.tensor([math.log(3.0)])), 0.287682 + 1.386294),
    # sample 1: logits 0 -> ln 2 = 0.693147, sample 2: logits 1 -> 0.313262; mean over samples
    (AdversarialLoss(), (torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]),), (0.693147 + 0.313262) / 2),
    # (9): each sample's mean BCE times its w, then the mean
    (AdversarialLoss(), (torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]), torch.tensor([0.5, 1.0])),
     (0.5 * 0.693147 + 0.313262) / 2),
]


@pytest.mark.parametrize("loss, inputs, expected", BCE_CASES)
def test_bce_losses_match_hand_computation(loss, inputs, expected):
    assert loss(*inputs).item() == pytest.approx(expected, abs=1e-5)


def test_importance_weights_are_one_minus_d0_and_carry_no_gradient():
    weights = importance_weights(torch.tensor([0.0, math.log(3.0)], requires_grad=True))
    assert weights.tolist() == pytest.approx([0.5, 0.25], abs=1e-6)
    assert not weights.requires_grad
