"""``isdnet-bench active``: the picks of each strategy, the paired gains over random, and the --quick path end to
end on real hippocampus MRI (skipped where the dataset is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_bench_accuracy import HIPPOCAMPUS

from isdnet.config import RANK_STRATEGIES
from isdnet_bench import active, active_report
from isdnet_bench.active_report import summarise
from isdnet_bench.cli import main


def test_every_strategy_but_random_is_compared_and_importance_comes_from_the_benchmark():
    assert set(active.STRATEGIES) == (set(RANK_STRATEGIES) - {"random"}) | {"importance"}
    assert active.REFERENCE == "random" and "importance" not in RANK_STRATEGIES


def test_picks_follow_the_scores_and_random_is_seeded():
    start = dict(seed=3, pool=["a", "b", "c", "d"],
                 scores={"a": dict(entropy=0.1, importance=0.9), "b": dict(entropy=0.4, importance=0.2),
                         "c": dict(entropy=0.3, importance=0.5), "d": dict(entropy=0.2, importance=0.1)})
    assert active.picked(start, "entropy", 2) == ["b", "c"]
    assert active.picked(start, "importance", 1) == ["a"]
    assert active.picked(start, "random", 2) == active.picked(start, "random", 2)
    assert sorted(active.picked(start, "random", 4)) == ["a", "b", "c", "d"]


def test_gains_are_paired_by_seed_with_a_t_interval():
    records = [dict(round="added", strategy=s, seed=seed, metrics=dict(dice=d))
               for s, seed, d in (("random", 0, 0.70), ("random", 1, 0.60), ("entropy", 0, 0.72),
                                  ("entropy", 1, 0.63), ("flip", 0, 0.69))]
    records.append(dict(round="start", seed=0, metrics=dict(dice=0.5),
                        uncertainty=dict(entropy=dict(auroc_wrong=0.8, wrong_share=0.1, wrong_in_top=0.6))))
    report = summarise(records, "random")
    entropy = next(g for g in report["gains"] if g["strategy"] == "entropy")
    assert entropy["differences"] == pytest.approx([2.0, 3.0]) and entropy["mean"] == pytest.approx(2.5)
    assert entropy["high"] - entropy["mean"] == pytest.approx(12.706 * 0.5 ** 0.5 / 2 ** 0.5)  # t(1) SD / sqrt(n)
    flip = next(g for g in report["gains"] if g["strategy"] == "flip")
    assert flip["seeds"] == [0] and flip["mean"] == pytest.approx(-1.0)
    assert report["review"]["entropy"]["auroc_wrong"] == (0.8, 0.0)
    assert report["strategies"]["start"]["dice"] == (0.5, 0.0)


@pytest.mark.skipif(not (HIPPOCAMPUS / "dataset.json").is_file(), reason="the hippocampus dataset is not here")
def test_quick_path_end_to_end_on_hippocampus(tmp_path, capsys):
    argv = ["active", str(HIPPOCAMPUS), "--quick", "--out", str(tmp_path), "--cases", "6", "--test-cases", "1",
            "--steps", "2", "--add", "1", "--start-fraction", "0.34", "--base-channels", "8", "--slice-size", "32",
            "32", "--strategies", "entropy", "importance", "--threads", "1"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    runs = {(r["round"], r.get("strategy")): r for r in report["runs"]}
    assert set(runs) == {("start", None), ("added", "entropy"), ("added", "importance"), ("added", "random")}
    start = runs[("start", None)]
    assert len(start["labeled"]) == 2 and len(start["pool"]) == 4
    assert all(set(s) == {"confidence", "entropy", "flip", "importance"} for s in start["scores"].values())
    top = max(start["pool"], key=lambda n: (start["scores"][n]["entropy"], n))
    assert runs[("added", "entropy")]["added"] == [top]
    for kind in ("confidence", "entropy", "flip"):
        found = start["uncertainty"][kind]
        assert 0 <= found["auroc_wrong"] <= 1 and 0 <= found["wrong_in_top"] <= 1
    assert {g["strategy"] for g in report["gains"]} == {"entropy", "importance"}
    assert (tmp_path / "results.png").stat().st_size > 0
    assert "Gain over random" in capsys.readouterr().out
    # A second invocation with the same settings trains nothing: every record is reused.
    assert main(argv) == 0
    again = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert [r["train_time_s"] for r in again["runs"]] == [r["train_time_s"] for r in report["runs"]]
    # --report-only reports the finished records and trains nothing: a missing one is left out, not made.
    (tmp_path / "runs" / "importance_seed0.json").unlink()
    assert main([*argv, "--report-only", "--report", str(tmp_path / "partial")]) == 0
    partial = json.loads((tmp_path / "partial.json").read_text(encoding="utf-8"))
    assert [r.get("strategy") for r in partial["runs"]] == [None, "entropy", "random"]
    assert not (tmp_path / "runs" / "importance_seed0.json").exists()
    assert [g["strategy"] for g in partial["gains"]] == ["entropy"]
    capsys.readouterr()
    assert main([*argv, "--report-only", "--seeds", "7", "--report", str(tmp_path / "none")]) == 2
    assert "no finished record in" in capsys.readouterr().err and not (tmp_path / "none.json").exists()
    # --review scores the maps of a trained model and trains nothing.
    model = tmp_path / "runs" / "start_seed0.safetensors"
    assert main(["active", str(HIPPOCAMPUS), "--out", str(tmp_path / "review"), "--test-cases", "1",
                 "--review", str(model)]) == 0
    reviewed = json.loads((tmp_path / "review" / "results.json").read_text(encoding="utf-8"))
    assert [Path(r["model"]) for r in reviewed["models"]] == [model]
    assert reviewed["models"][0]["uncertainty"] == start["uncertainty"]  # the same test case, the same model
    assert not (tmp_path / "review" / "runs").exists() and "| start_seed0 |" in capsys.readouterr().out
    assert (tmp_path / "review" / "results.png").stat().st_size > 0, "the review's picture: its worst slice"


def test_the_review_picture_shows_the_slice_with_the_most_wrong_voxels(tmp_path):
    truth = np.zeros((4, 6, 6), dtype=np.uint8)
    predicted = truth.copy()
    predicted[1, :2, :2] = 1  # 4 wrong voxels
    predicted[2, :3, :3] = 2  # 9 wrong voxels: the worst slice
    predicted[3, 0, 0] = 1
    assert active_report.worst_slice(predicted != truth) == 2
    assert active_report.worst_slice(np.zeros((3, 2, 2), dtype=bool)) == 0, "no error: the first slice"
    path = tmp_path / "example.png"
    active_report.render_review_example(np.random.default_rng(0).random((6, 6)), truth[2], predicted[2],
                                        np.linspace(0, 1, 36).reshape(6, 6), "a title", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
