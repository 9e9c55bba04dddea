"""``isdnet rank`` and the uncertainty maps: a model trained briefly on phantoms is unsure where a volume is
corrupted, ranks the corrupted volume first, writes a ranking that reads back, and refuses bad input in one line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_outputs import refused  # the command fails with status 2 and one line of error

from isdnet.cli import build_parser, main
from isdnet.config import DEFAULT_RANK_STRATEGY, RANK_STRATEGIES, TrainConfig
from isdnet.dataset import Case, load_dataset
from isdnet.errors import InputError
from isdnet.modelfile import load_model, save_model
from isdnet.phantoms import make_phantom, write_phantom_dataset
from isdnet.progress import Progress
from isdnet.rank import combined_scores, order, rank_inputs, rank_volumes
from isdnet.rankfile import read_ranking
from isdnet.train import train
from isdnet.uncertainty import analyse, entropy_map, flip_disagreement

SHAPE = (12, 32, 32)
CORRUPTED = (slice(None), slice(8, 24), slice(8, 24))  # a square through every slice, replaced by noise


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """isdnet (S and D) trained for 25 short epochs on three phantoms: about 10 s on one core."""
    folder = tmp_path_factory.mktemp("rank")
    spec = load_dataset(write_phantom_dataset(folder / "ds", 3, seed=0, shape=SHAPE))
    config = TrainConfig(method="isdnet", epochs=25, base_channels=8, batch_size=4, slice_size=[32, 32], seed=0,
                         precision="fp32", warmup_epochs=2, learning_rate=3e-3, discriminator_stride=4,
                         discriminator_channels=8, validation_fraction=0.0, device="cpu")
    train(spec.cases, [], spec.labels, folder / "model.safetensors", config,
          progress=Progress(json_lines=True, stream=io.StringIO()))
    return folder / "model.safetensors"


def corrupted(image: sitk.Image, seed: int = 0) -> sitk.Image:
    """``image`` with the ``CORRUPTED`` square replaced by uniform noise over its intensity range."""
    voxels = sitk.GetArrayFromImage(image)
    rng = np.random.default_rng(seed)
    voxels[CORRUPTED] = rng.uniform(voxels.min(), voxels.max(), voxels[CORRUPTED].shape)
    out = sitk.GetImageFromArray(voxels)
    out.CopyInformation(image)
    return out


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """A folder of three unseen phantoms and one corrupted phantom (``d_corrupted``)."""
    folder = tmp_path_factory.mktemp("unlabeled")
    for name, seed in (("a", 101), ("b", 102), ("c", 103)):
        sitk.WriteImage(make_phantom(seed, shape=SHAPE)[0], str(folder / f"{name}.nii.gz"))
    sitk.WriteImage(corrupted(make_phantom(105, shape=SHAPE)[0]), str(folder / "d_corrupted.nii.gz"))
    return folder


def test_entropy_and_flip_maps_of_known_probabilities():
    uniform = torch.full((1, 3, 2, 2), 1 / 3)
    certain = torch.zeros((1, 3, 2, 2))
    certain[:, 1] = 1
    assert torch.allclose(entropy_map(uniform), torch.ones(1, 1, 2, 2))
    assert torch.allclose(entropy_map(certain), torch.zeros(1, 1, 2, 2))
    half = torch.tensor([0.5, 0.5, 0.0]).view(1, 3, 1, 1)
    assert entropy_map(half).item() == pytest.approx(np.log(2) / np.log(3))
    other = torch.zeros((1, 3, 2, 2))
    other[:, 2] = 1
    assert torch.allclose(flip_disagreement(certain, certain), torch.zeros(1, 1, 2, 2))
    assert torch.allclose(flip_disagreement(certain, other), torch.ones(1, 1, 2, 2))
    assert flip_disagreement(half, certain[..., :1, :1]).item() == pytest.approx(0.5)


def test_uncertainty_is_higher_on_the_corrupted_region_and_on_the_input_grid(model):
    image = make_phantom(105, shape=SHAPE)[0]
    image.SetOrigin((3.0, -7.0, 11.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # not LPS: rows and columns swapped
    result = analyse(corrupted(image), model)
    assert not torch.is_inference_mode_enabled(), "the two suspended passes left inference mode on (training after "\
                                                  "this would fail)"
    assert set(result.maps) == {"confidence", "entropy", "flip"}
    inside = np.zeros(sitk.GetArrayViewFromImage(image).shape, dtype=bool)
    inside[CORRUPTED] = True
    for kind, uncertainty in result.maps.items():
        assert uncertainty.GetSize() == image.GetSize() and uncertainty.GetOrigin() == image.GetOrigin()
        assert np.allclose(uncertainty.GetDirection(), image.GetDirection())
        values = sitk.GetArrayFromImage(uncertainty)
        assert 0 <= values.min() and values.max() <= 1, kind
        if kind != "confidence":  # D is near chance after so short a training (docs/results.md)
            assert values[inside].mean() > 1.5 * values[~inside].mean(), kind
    clean = analyse(image, model, kinds=["entropy"], maps=False)
    assert clean.maps == {} and set(clean.scores) == {"entropy"}
    assert result.scores["entropy"] > clean.scores["entropy"]
    labels = sitk.GetArrayFromImage(result.labels)
    assert result.foreground_voxels == int((labels != 0).sum()) > 0


def test_rank_puts_the_corrupted_volume_first_and_its_json_reads_back(model, volumes, tmp_path, capsys):
    out = tmp_path / "ranking.json"
    assert main(["rank", "--model", str(model), str(volumes), "--json", str(out), "--device", "cpu", "--strategy",
                 "entropy"]) == 0
    table = capsys.readouterr().out
    strategy, ranking = read_ranking(out)
    assert strategy == "entropy"
    assert [v.rank for v in ranking] == [1, 2, 3, 4] and ranking[0].name == "d_corrupted"
    assert sorted(v.name for v in ranking) == ["a", "b", "c", "d_corrupted"]
    assert [v.score for v in ranking] == sorted((v.score for v in ranking), reverse=True)
    assert all(v.score == v.scores["entropy"] for v in ranking)
    assert table.splitlines()[1].split()[-1] == "d_corrupted"
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["volumes"][0]["path"] == str(volumes / "d_corrupted.nii.gz")
    flip = rank_volumes(rank_inputs([volumes]), model, "flip", device="cpu")
    assert flip[0].name == "d_corrupted" and set(flip[0].scores) == {"flip"}
    combined = rank_volumes(rank_inputs([volumes]), model, "combined", device="cpu")
    assert set(combined[0].scores) == {"confidence", "entropy", "flip"} and 0 <= combined[-1].score <= 1


def test_random_strategy_is_seeded_and_scores_nothing(model, volumes):
    cases = rank_inputs([volumes])
    first = [v.name for v in rank_volumes(cases, model, "random", seed=3)]
    assert first == [v.name for v in rank_volumes(cases, model, "random", seed=3)]
    orders = {tuple(v.name for v in rank_volumes(cases, model, "random", seed=s)) for s in range(6)}
    assert len(orders) > 1 and all(sorted(o) == ["a", "b", "c", "d_corrupted"] for o in orders)
    assert rank_volumes(cases, model, "random")[0].scores == {}
    assert "random" in RANK_STRATEGIES


def test_the_commands_default_strategy_is_the_configured_one():
    args = build_parser().parse_args(["rank", "--model", "m.safetensors", "volumes"])
    assert args.strategy == DEFAULT_RANK_STRATEGY in RANK_STRATEGIES


def test_combined_is_the_mean_rank_over_the_signals():
    scores = [dict(entropy=0.1, flip=0.9), dict(entropy=0.5, flip=0.5), dict(entropy=0.9, flip=0.5)]
    assert combined_scores(scores, ["entropy", "flip"]) == pytest.approx([0.5, 0.375, 0.625])
    assert [i for i, _ in order(["x", "y", "z"], scores, "combined", signals=["entropy", "flip"])] == [2, 0, 1]
    assert [i for i, _ in order(["x", "y", "z"], scores, "entropy")] == [2, 1, 0]


def test_bad_input_is_one_line_naming_the_file(model, volumes, tmp_path, capsys):
    missing = tmp_path / "nowhere.nii.gz"
    assert str(missing) in refused(capsys, "rank", "--model", str(model), str(missing))
    not_a_model = tmp_path / "notes.safetensors"
    not_a_model.write_text("not a model", encoding="utf-8")
    assert str(not_a_model) in refused(capsys, "rank", "--model", str(not_a_model), str(volumes))
    dataset = write_phantom_dataset(tmp_path / "labeled_only", 1, seed=0, shape=SHAPE)
    assert "lists no unlabeled cases" in refused(capsys, "rank", "--model", str(model), str(dataset))
    baseline_like = tmp_path / "s_only.safetensors"
    loaded = load_model(model)
    header = {**loaded.header, "architecture": {**loaded.header["architecture"], "confidence": None}}
    save_model(baseline_like, header, loaded.segmenter)
    err = refused(capsys, "rank", "--model", str(baseline_like), "--strategy", "confidence", str(volumes))
    assert str(baseline_like) in err and "no confidence network" in err
    broken = tmp_path / "ranking.json"
    broken.write_text("{}", encoding="utf-8")
    with pytest.raises(InputError, match="is not an ISDNet ranking"):
        read_ranking(broken)


def test_a_dataset_folder_ranks_its_unlabeled_cases(tmp_path):
    dataset = write_phantom_dataset(tmp_path / "ds", 2, seed=0, shape=SHAPE)
    document = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    document["unlabeled"] = ["imagesTr/" + Path(document["training"][1]["image"]).name]
    (dataset / "dataset.json").write_text(json.dumps(document), encoding="utf-8")
    cases = rank_inputs([dataset])
    assert [type(c) for c in cases] == [Case] and cases[0].label is None
    assert cases[0].image.name == Path(document["training"][1]["image"]).name
