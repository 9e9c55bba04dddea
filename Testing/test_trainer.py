"""One ISDNet iteration: update order, where gradients go, importance weights, checkpoints of the state."""

import numpy as np
import pytest
import torch

from isdnet.config import TrainConfig
from isdnet.distributed import ProcessGroup
from isdnet.networks import ConfidenceNet, ImageClassifierDiscriminator, ImportanceNet, SUNet
from isdnet.slices import CachedVolume, SliceDataset, epoch_batches
from isdnet.trainer import Trainer

CPU = torch.device("cpu")


def make_trainer(method="isdnet", num_classes=3, **options):
    config = TrainConfig(method=method, base_channels=4, discriminator_channels=4, importance_channels=8,
                         seed=0, **options)
    return Trainer(config, num_classes, CPU, torch.float32)


def batch(n=2, size=(32, 32), num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *size, generator=g)
    y = torch.randint(0, num_classes, (n, *size), generator=g)
    return x, y


@pytest.mark.parametrize("num_classes", [2, 3, 4])
@pytest.mark.parametrize("size", [(35, 50), (32, 32), (17, 9)])
def test_networks_handle_odd_sizes_and_class_counts(num_classes, size):
    x = torch.randn(2, 1, *size)
    s = SUNet(1, num_classes, base_channels=4)
    logits, features = s.forward_features(x)
    assert logits.shape == (2, num_classes, *size)
    assert features.shape[:2] == (2, 64)
    probs = logits.softmax(1)
    assert ConfidenceNet(num_classes, 4)(probs).shape == (2, 1, *size)
    assert ImageClassifierDiscriminator(num_classes, 4)(probs).shape == (2, 1, 1, 1)
    assert ImportanceNet(64, 8)(features).shape == (2,)


@pytest.mark.parametrize("stride", [1, 4, 8, 32])
@pytest.mark.parametrize("size", [(35, 50), (48, 48), (9, 17)])
def test_confidence_map_stride_keeps_layers_and_gives_a_map_of_the_input_size(stride, size):
    d = ConfidenceNet(3, 4, output_stride=stride)
    probs = torch.rand(2, 3, *size).softmax(1)
    assert d(probs).shape == (2, 1, *size)
    # the map's own resolution before upsampling: 48 pixels give 12 x 12 values at stride 4, 1 at Hung's 32
    if size == (48, 48):
        assert d.body(probs).shape[-1] == max(1, 48 // stride)
    with pytest.raises(ValueError, match="power of two"):
        ConfidenceNet(3, 4, output_stride=6)


def test_discriminator_learning_rate_sets_d_and_d0_only():
    trainer = make_trainer(learning_rate=1e-3, discriminator_learning_rate=1e-4)
    rates = {name: opt.param_groups[0]["lr"] for name, opt in trainer.optimisers.items()}
    assert rates == {"S": 1e-3, "D": 1e-4, "D0": 1e-4}
    assert {opt.param_groups[0]["lr"] for opt in make_trainer(learning_rate=3e-4).optimisers.values()} == {3e-4}


@pytest.mark.parametrize("schedule, done, factor", [("poly", 0.0, 1.0), ("poly", 0.5, 0.5 ** 0.9),
                                                     ("poly", 1.0, 0.0), ("constant", 0.7, 1.0)])
def test_learning_rate_schedule_scales_every_network(schedule, done, factor):
    trainer = make_trainer(learning_rate=1e-3, discriminator_learning_rate=1e-4, lr_schedule=schedule)
    trainer.set_progress(done)
    rates = {name: opt.param_groups[0]["lr"] for name, opt in trainer.optimisers.items()}
    assert rates == pytest.approx({"S": 1e-3 * factor, "D": 1e-4 * factor, "D0": 1e-4 * factor})


def test_discriminator_betas_apply_to_d_and_d0():
    trainer = make_trainer(discriminator_betas=(0.9, 0.99))
    betas = {name: opt.param_groups[0]["betas"] for name, opt in trainer.optimisers.items()}
    assert betas == {"S": (0.9, 0.999), "D": (0.9, 0.99), "D0": (0.9, 0.99)}


def test_cross_entropy_is_added_to_the_labeled_loss_unless_set_to_zero_for_the_papers_loss():
    x, y = batch()
    assert "ce" not in make_trainer("baseline", cross_entropy=0.0).train_step(x, y)
    assert "ce" in make_trainer("baseline").train_step(x, y), "on by default"
    trainer = make_trainer("baseline", cross_entropy=0.5)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(trainer.segmenter(x), y).item()
    assert trainer.train_step(x, y)["ce"] == pytest.approx(expected, rel=1e-5)


def test_adversarial_loss_sums_the_labeled_mean_and_the_weighted_unlabeled_mean():
    trainer = make_trainer()
    x, y = batch(n=3)
    xu, _ = batch(n=2, seed=1)
    with torch.no_grad():
        logits, features = trainer.segmenter.forward_features(torch.cat([x, xu]))
        confidence = trainer.discriminator(logits.softmax(1))
        w = 1 - torch.sigmoid(trainer.importance(features[3:]))
        expected = trainer.adversarial(confidence[:3]) + trainer.adversarial(confidence[3:], w)
    assert trainer.step_segmenter(x, y, xu).losses["adv"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_confidence_on_unlabeled_makes_unlabeled_predictions_fakes_for_d():
    trainer = make_trainer(confidence_on_unlabeled=True)
    x, y = batch()
    xu, _ = batch(seed=1)
    step = trainer.step_segmenter(x, y, xu)
    assert step.probabilities_unlabeled is not None and len(step.probabilities_unlabeled) == 2
    with torch.no_grad():
        real = trainer.discriminator(step.target)
        fake = trainer.discriminator(torch.cat([step.probabilities, step.probabilities_unlabeled]))
        expected = trainer.confidence_loss(real, fake)
    loss = trainer.step_confidence(step.target, step.probabilities, step.probabilities_unlabeled)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert make_trainer().step_segmenter(x, y, xu).probabilities_unlabeled is None


def test_a_d_conditioned_on_the_image_sees_each_slice_beside_its_probabilities():
    trainer = make_trainer(discriminator="ImageConditionedConfidenceNet", confidence_on_unlabeled=True)
    x, y = batch()
    xu, _ = batch(seed=1)
    with torch.no_grad():
        logits = trainer.segmenter(torch.cat([x, xu]))
        seen = torch.cat([logits.softmax(1), torch.cat([x, xu])], dim=1)
        expected_adv = trainer.adversarial(trainer.discriminator(seen)[:2]) + trainer.adversarial(
            trainer.discriminator(seen)[2:], 1 - torch.sigmoid(trainer.importance(
                trainer.segmenter.forward_features(xu)[1])))
    step = trainer.step_segmenter(x, y, xu)
    assert step.losses["adv"].item() == pytest.approx(expected_adv.item(), rel=1e-5)
    with torch.no_grad():
        real = trainer.discriminator(torch.cat([step.target, x], dim=1))
        fake = trainer.discriminator(torch.cat([torch.cat([step.probabilities, step.probabilities_unlabeled]),
                                                torch.cat([x, xu])], dim=1))
        expected_d = trainer.confidence_loss(real, fake)
    loss = trainer.step_confidence(step.target, step.probabilities, step.probabilities_unlabeled, step.images)
    assert loss.item() == pytest.approx(expected_d.item(), rel=1e-5)



def test_a_temperature_on_what_d_sees_is_softmax_of_the_logits_over_t():
    """D at temperature T sees softmax(logits / T) of S (hand-computed from the logits here), in S's step and in
    its own; the ground truth stays one-hot; L_dice still uses S's own softmax."""
    hot, plain = make_trainer(discriminator_temperature=4.0), make_trainer()
    assert hot.discriminator.temperature == 4.0
    x, y = batch()
    with torch.no_grad():
        logits = hot.segmenter(x)
        tempered = torch.softmax(logits / 4.0, 1)
        plain.discriminator.load_state_dict(hot.discriminator.state_dict())
        assert torch.allclose(hot.discriminator(logits.softmax(1)), plain.discriminator(tempered), atol=1e-5)
        expected_adv = hot.adversarial(plain.discriminator(tempered))
        one_hot = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float()
        assert torch.allclose(hot.discriminator(one_hot), plain.discriminator(one_hot), atol=1e-6)
    step = hot.step_segmenter(x, y)
    assert step.losses["adv"].item() == pytest.approx(expected_adv.item(), rel=1e-4)
    assert step.losses["dice"].item() == pytest.approx(hot.dice(logits.softmax(1), one_hot).item(), rel=1e-5)
    with pytest.raises(ValueError, match="discriminator_temperature"):
        TrainConfig(discriminator_temperature=0).validate()

def test_update_order_is_s_then_d_then_d0():
    trainer = make_trainer()
    order = []
    for name, optimiser in trainer.optimisers.items():
        original = optimiser.step
        optimiser.step = lambda *a, _name=name, _orig=original, **k: (order.append(_name), _orig(*a, **k))[1]
    x, y = batch()
    xu, _ = batch(seed=1)
    losses = trainer.train_step(x, y, xu)
    assert order == ["S", "D", "D0"]
    assert {"dice", "adv", "semi", "d", "d0", "w_mean"} <= set(losses)


def test_importance_net_gradient_never_reaches_the_encoder():
    trainer = make_trainer()
    x, y = batch()
    xu, _ = batch(seed=1)
    step = trainer.step_segmenter(x, y, xu)
    for p in trainer.segmenter.parameters():
        p.grad = None
    trainer.step_importance(step.features_labeled, step.features_unlabeled)
    assert all(p.grad is None for p in trainer.segmenter.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.importance.parameters())


def test_segmenter_step_leaves_discriminators_untouched_and_weights_labeled_samples_by_one():
    trainer = make_trainer()
    before_d = [p.clone() for p in trainer.discriminator.parameters()]
    before_d0 = [p.clone() for p in trainer.importance.parameters()]
    x, y = batch(n=3)
    xu, _ = batch(n=2, seed=1)
    step = trainer.step_segmenter(x, y, xu)
    assert all(torch.equal(a, b) for a, b in zip(before_d, trainer.discriminator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_d0, trainer.importance.parameters()))
    assert step.weights[:3].tolist() == [1.0, 1.0, 1.0]
    # unlabeled weights are 1 - sigmoid(D0(z)), strictly between 0 and 1
    expected = 1 - torch.sigmoid(trainer.importance(step.features_unlabeled)).detach()
    assert torch.allclose(step.weights[3:], expected, atol=1e-5)


def test_hung_uses_unit_weights_and_baseline_has_no_discriminator():
    hung = make_trainer("hung")
    x, y = batch()
    xu, _ = batch(seed=1)
    step = hung.step_segmenter(x, y, xu)
    assert step.weights.tolist() == [1.0] * 4
    assert hung.importance is None
    baseline = make_trainer("baseline")
    assert list(baseline.networks()) == ["S"]
    assert set(baseline.train_step(x, y, xu)) == {"dice", "ce"}


def test_adv_classifier_uses_an_image_level_discriminator():
    trainer = make_trainer("adv-classifier")
    assert isinstance(trainer.discriminator, ImageClassifierDiscriminator)
    x, y = batch()
    assert {"dice", "ce", "adv", "d"} == set(trainer.train_step(x, y))


def test_training_steps_reduce_the_dice_loss_on_a_fixed_batch():
    trainer = make_trainer("isdnet", num_classes=2, learning_rate=1e-2)
    x, y = batch(n=4, size=(32, 32))
    y = (x[:, 0] > 0.5).long()  # a learnable target: bright pixels are class 1
    xu, _ = batch(seed=2)
    first = trainer.train_step(x, y, xu)["dice"]
    for _ in range(30):
        last = trainer.train_step(x, y, xu)["dice"]
    assert last < first - 0.2


def test_state_tensors_round_trip_restores_weights_and_optimisers():
    trainer = make_trainer()
    x, y = batch()
    xu, _ = batch(seed=1)
    trainer.train_step(x, y, xu)
    saved = {k: v.clone() for k, v in trainer.state_tensors().items()}
    other = make_trainer()
    other.load_state_tensors(saved)
    for name in ("S", "D", "D0"):
        a = trainer.networks()[name].state_dict()
        b = other.networks()[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the next step is identical on both, which needs the Adam moments restored too
    la = trainer.train_step(x, y, xu)
    lb = other.train_step(x, y, xu)
    assert la == pytest.approx(lb, rel=1e-5)


@pytest.mark.parametrize("options", [dict(method="mean-teacher"), dict(epochs=0), dict(t_semi=2.0),
                                     dict(lambda_adv=-1.0), dict(validation_fraction=1.0), dict(total_steps=0),
                                     dict(lr_schedule="cosine"), dict(model_selection="last"),
                                     dict(cross_entropy=-1.0), dict(semi_rampup_epochs=-1)])
def test_config_rejects_bad_options(options):
    with pytest.raises(ValueError):
        TrainConfig(**options).validate()


def test_batched_d_and_d0_updates_equal_separate_passes():
    trainer = make_trainer()
    x, y = batch()
    xu, _ = batch(seed=1)
    step = trainer.step_segmenter(x, y, xu)
    with torch.no_grad():
        expected_d = trainer.confidence_loss(trainer.discriminator(step.target),
                                             trainer.discriminator(step.probabilities))
        expected_d0 = trainer.importance_loss(trainer.importance(step.features_labeled),
                                              trainer.importance(step.features_unlabeled))
    assert torch.allclose(trainer.step_confidence(step.target, step.probabilities), expected_d, atol=1e-6)
    assert torch.allclose(trainer.step_importance(step.features_labeled, step.features_unlabeled), expected_d0,
                          atol=1e-6)


def _slice_set(labeled: bool, seed: int) -> SliceDataset:
    images = np.random.default_rng(seed).normal(size=(2, 6, 20, 24)).astype(np.float16)
    return SliceDataset([CachedVolume(image=im, label=(im > 0).astype(np.uint8) if labeled else None,
                                      minimum=float(im.min())) for im in images], (16, 16), labeled, random_crop=True)


def test_epoch_batches_warm_up_device_and_replay():
    config = TrainConfig(method="isdnet", batch_size=4, warmup_epochs=1, seed=3)
    cpu, group = torch.device("cpu"), ProcessGroup()

    def first_batches(epoch: int, count: int) -> list:
        batches = epoch_batches(_slice_set(True, 0), _slice_set(False, 1), config, epoch, cpu, group)
        return [next(batches) for _ in range(count)]

    warm = first_batches(1, 2)
    assert all(x_u is None and a is None for _, _, x_u, a in warm)  # the warm-up epoch sees labeled slices only
    x_l, y_l, x_u, augmentation = first_batches(2, 1)[0]
    assert x_l.shape == (4, 1, 16, 16) and y_l.shape == (4, 16, 16) and x_u.shape == (4, 1, 16, 16)
    assert augmentation.theta.shape == (4, 2, 3), "unlabeled slices come with their augmentation, unapplied"
    assert x_l.dtype == torch.float32 and y_l.dtype == torch.long and x_l.device == cpu
    assert set(y_l.unique().tolist()) <= {0, 1}
    again = first_batches(2, 3)  # a resumed epoch replays the same augmented batches
    for a, b in zip(first_batches(2, 3), again):
        assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3])) and torch.equal(a[3].theta, b[3].theta)
    assert not torch.equal(first_batches(3, 1)[0][0], x_l)  # another epoch, other batches
