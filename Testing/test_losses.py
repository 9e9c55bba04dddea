"""Each loss of the paper against values computed by hand (in the comments), plus a test per bad option."""

import math

import pytest
import torch

from isdnet.losses import (
    AdversarialLoss,
    ConfidenceNetLoss,
    ImportanceNetLoss,
    SemiSupervisedLoss,
    WeightedDiceLoss,
    default_class_weights,
    importance_weights,
)


def probs_and_target(probabilities, classes):
    """(N=1, C, H=1, W=P) tensors from per-pixel probability rows and per-pixel target classes."""
    p = torch.tensor(probabilities, dtype=torch.float32).T[None, :, None, :]
    t = torch.nn.functional.one_hot(torch.tensor(classes), p.shape[1]).T[None, :, None, :].float()
    return p, t


# Two pixels, targets 0 and 1, probabilities (0.8, 0.2) and (0.4, 0.6):
# class 0: I = 0.8, U = 1.2 + 1 = 2.2; class 1: I = 0.6, U = 0.8 + 1 = 1.8.
TWO_PIXELS = ([[0.8, 0.2], [0.4, 0.6]], [0, 1])
# Three pixels, targets 0, 1, 2: I = (0.7, 0.6, 0.6), U = (2.0, 2.0, 2.0).
THREE_PIXELS = ([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], [0, 1, 2])

DICE_CASES = [
    # plain two-class Dice: 1 - 2 * 1.4 / 4.0
    (TWO_PIXELS, (1.0, 1.0), 0.3),
    # weighted: 1 - 2 * (0.2*0.8 + 1.2*0.6) / (0.2*2.2 + 1.2*1.8) = 1 - 1.76 / 2.6
    (TWO_PIXELS, (0.2, 1.2), 1 - 1.76 / 2.6),
    # the paper's three-class weights: 1 - 2 * (0.14 + 0.72 + 1.32) / (0.4 + 2.4 + 4.4) = 1 - 4.36 / 7.2
    (THREE_PIXELS, (0.2, 1.2, 2.2), 1 - 4.36 / 7.2),
]


@pytest.mark.parametrize("case, weights, expected", DICE_CASES)
def test_weighted_dice_matches_hand_computation(case, weights, expected):
    p, t = probs_and_target(*case)
    loss = WeightedDiceLoss(weights, smooth=0.0)(p, t)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_per_class_form_averages_each_class_dice():
    p, t = probs_and_target(*TWO_PIXELS)
    # class Dice 2*0.8/2.2 and 2*0.6/1.8; weights (1, 3): 1 - (0.727273 + 3 * 0.666667) / 4
    loss = WeightedDiceLoss((1.0, 3.0), smooth=0.0, form="per-class")(p, t)
    assert loss.item() == pytest.approx(1 - (1.6 / 2.2 + 3 * 1.2 / 1.8) / 4, abs=1e-6)
    # a class absent from prediction and target counts as perfect (smoothing), so an empty mask costs nothing
    semi = SemiSupervisedLoss((1.0, 1.0, 1.0), threshold=0.5, form="per-class")
    p3, _ = probs_and_target(*THREE_PIXELS)
    assert semi(p3, torch.zeros(1, 1, 1, 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_is_zero_for_a_perfect_prediction_and_batch_pools_samples():
    _, t = probs_and_target(*THREE_PIXELS)
    assert WeightedDiceLoss((0.2, 1.2, 2.2))(t, t).item() == pytest.approx(0.0, abs=1e-6)
    p, t = probs_and_target(*TWO_PIXELS)
    pooled = WeightedDiceLoss((1.0, 1.0), smooth=0.0)(torch.cat([p, t]), torch.cat([t, t]))
    # pooled sums: I = (0.8 + 1, 0.6 + 1), U = (2.2 + 2, 1.8 + 2): 1 - 2 * 3.4 / 8
    assert pooled.item() == pytest.approx(1 - 6.8 / 8.0, abs=1e-6)
    per_sample = WeightedDiceLoss((1.0, 1.0), smooth=0.0, reduction="none")(torch.cat([p, t]), torch.cat([t, t]))
    assert per_sample.tolist() == pytest.approx([0.3, 0.0], abs=1e-6)


def test_default_class_weights_follow_the_paper():
    assert default_class_weights(2) == (1.0, 1.0)
    assert default_class_weights(3) == (0.2, 1.2, 2.2)
    assert default_class_weights(5) == (1.0,) * 5


@pytest.mark.parametrize("options", [dict(class_weights=[1.0]), dict(class_weights=[1.0, -1.0]),
                                     dict(class_weights=[0.0, 0.0]), dict(class_weights=[1.0, float("nan")]),
                                     dict(class_weights=[1, 1], smooth=-1.0),
                                     dict(class_weights=[1, 1], reduction="mean"),
                                     dict(class_weights=[1, 1], form="generalised")])
def test_dice_rejects_bad_options(options):
    with pytest.raises(ValueError):
        WeightedDiceLoss(**options)


def test_dice_rejects_mismatched_shapes():
    p, t = probs_and_target(*TWO_PIXELS)
    with pytest.raises(ValueError, match="differ"):
        WeightedDiceLoss((1.0, 1.0))(p, t[:, :, :, :1])
    with pytest.raises(ValueError, match="class weights"):
        WeightedDiceLoss((1.0, 1.0, 1.0))(p, t)


def test_semi_loss_counts_only_pixels_above_threshold():
    p, _ = probs_and_target(*THREE_PIXELS)
    # confidences sigmoid(0) = 0.5, 0.5 and sigmoid(-3) = 0.047: pixel 3 is below T_semi = 0.1.
    confidence = torch.tensor([0.0, 0.0, -3.0]).view(1, 1, 1, 3)
    # pseudo-labels = argmax = (0, 1, 2); over pixels 1-2: I = (0.7, 0.6, 0), U = (1.8, 1.8, 0.4)
    # 1 - 2 * (0.2*0.7 + 1.2*0.6) / (0.2*1.8 + 1.2*1.8 + 2.2*0.4) = 1 - 1.72 / 3.4
    loss = SemiSupervisedLoss((0.2, 1.2, 2.2), threshold=0.1, smooth=0.0)(p, confidence)
    assert loss.item() == pytest.approx(1 - 1.72 / 3.4, abs=1e-6)


def test_semi_loss_excludes_pixels_at_the_threshold_and_is_zero_without_any():
    p, _ = probs_and_target(*THREE_PIXELS)
    at_threshold = torch.zeros(1, 1, 1, 3)  # sigmoid(0) = 0.5, not strictly above 0.5
    semi = SemiSupervisedLoss((1.0, 1.0, 1.0), threshold=0.5)
    assert semi.confident_mask(at_threshold).sum().item() == 0
    assert semi(p, at_threshold).item() == pytest.approx(0.0, abs=1e-6)


def test_semi_loss_gradient_reaches_probabilities_only():
    p, _ = probs_and_target(*THREE_PIXELS)
    p.requires_grad_(True)
    confidence = torch.zeros(1, 1, 1, 3, requires_grad=True)
    SemiSupervisedLoss((1.0, 1.0, 1.0), threshold=0.1)(p, confidence).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert confidence.grad is None


def test_semi_loss_weights_scale_each_sample():
    p, _ = probs_and_target(*THREE_PIXELS)
    confidence = torch.zeros(1, 1, 1, 3)
    semi = SemiSupervisedLoss((1.0, 1.0, 1.0), threshold=0.1)
    single = semi(p, confidence).item()
    weighted = semi(torch.cat([p, p]), torch.cat([confidence, confidence]), torch.tensor([0.25, 0.75]))
    assert weighted.item() == pytest.approx(0.5 * single, abs=1e-6)


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_semi_loss_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="T_semi"):
        SemiSupervisedLoss((1.0, 1.0), threshold=threshold)


def test_confidence_net_loss_hand_value():
    # BCE(2, 1) = ln(1 + e^-2) = 0.126928; BCE(-1, 0) = ln(1 + e^-1) = 0.313262
    real = torch.full((1, 1, 2, 2), 2.0)
    fake = torch.full((1, 1, 2, 2), -1.0)
    assert ConfidenceNetLoss()(real, fake).item() == pytest.approx(0.126928 + 0.313262, abs=1e-5)
    assert ConfidenceNetLoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == pytest.approx(
        2 * math.log(2), abs=1e-6)


def test_adversarial_loss_per_sample_weights():
    # sample 1: logits 0 -> ln 2 = 0.693147, sample 2: logits 1 -> ln(1 + e^-1) = 0.313262
    fake = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    adv = AdversarialLoss()
    assert adv(fake).item() == pytest.approx((0.693147 + 0.313262) / 2, abs=1e-5)
    weighted = adv(fake, torch.tensor([0.5, 1.0]))
    assert weighted.item() == pytest.approx((0.5 * 0.693147 + 0.313262) / 2, abs=1e-5)


def test_importance_loss_and_weights_hand_values():
    ln3 = torch.tensor([math.log(3.0)])  # sigmoid = 0.75
    # BCE(ln3, 1) = ln(4/3) = 0.287682; BCE(ln3, 0) = ln 4 = 1.386294
    assert ImportanceNetLoss()(ln3, ln3).item() == pytest.approx(0.287682 + 1.386294, abs=1e-5)
    weights = importance_weights(torch.tensor([0.0, math.log(3.0)], requires_grad=True))
    assert weights.tolist() == pytest.approx([0.5, 0.25], abs=1e-6)
    assert not weights.requires_grad
