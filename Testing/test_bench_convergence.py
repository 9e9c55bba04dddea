"""``isdnet-bench convergence``: the arms' options, the study's cases, the report's arithmetic, and the --quick path
end to end on real hippocampus MRI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from isdnet.config import TrainConfig
from isdnet.dataset import Case
from isdnet_bench import convergence
from isdnet_bench import convergence_report as report
from isdnet_bench.cli import main

HIPPOCAMPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hippocampus"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    convergence.add_arguments(parser)
    return parser.parse_args(["dataset", *argv])


def test_arms_are_the_current_defaults_the_candidate_and_its_four_times_longer_reference():
    args = parse("--steps", "300", "--set", "slice_size=[32,32]")
    current, candidate, reference = (convergence.arm_config(args, arm, "fp32", 3) for arm in convergence.ARMS)
    defaults = TrainConfig()
    assert (current.learning_rate, current.epochs, current.discriminator_channels, current.patience) == (
        defaults.learning_rate, defaults.epochs, defaults.discriminator_channels, None)
    assert (candidate.learning_rate, candidate.lr_schedule, candidate.discriminator_stride) == (1e-3, "poly", 4)
    assert (candidate.total_steps, candidate.patience, candidate.foreground_fraction) == (300, 20, 0.5)
    assert (reference.total_steps, reference.patience, reference.max_minutes) == (1200, None, None)
    assert reference.foreground_fraction == 0.5 and reference.learning_rate == candidate.learning_rate
    assert {c.slice_size[0] for c in (current, candidate, reference)} == {32}
    assert {c.seed for c in (current, candidate, reference)} == {3}, "a seed initialises every arm alike"
    assert convergence.arm_config(args, "candidate", "bf16", 0).precision == "bf16"
    assert parse("--seeds", "0", "2").seeds == [0, 2] and parse().seeds == [0]
    with pytest.raises(ValueError, match="patience"):
        convergence.arm_config(parse("--patience", "0"), "candidate", "fp32", 0)


def test_study_cases_are_drawn_with_the_seed_and_disjoint(tmp_path):
    cases = [Case(f"c{i}", tmp_path / f"c{i}.nii.gz", tmp_path / f"l{i}.nii.gz") for i in range(20)]
    labeled, unlabeled = convergence.study_cases(cases, 4, 12, seed=0)
    assert len(labeled) == 4 and len(unlabeled) == 12 and not {c.name for c in labeled} & {c.name for c in unlabeled}
    assert convergence.study_cases(cases, 4, 12, seed=0) == (labeled, unlabeled)
    assert convergence.study_cases(cases, 4, 12, seed=1)[0] != labeled
    with pytest.raises(ValueError, match="at most 20"):
        convergence.study_cases(cases, 10, 12, seed=0)


def record(arm: str, dice: float, minutes: float, points, reason: str = "", seed: int = 0,
           precision: str = "fp32") -> dict:
    return dict(name=f"{arm}_{precision}_seed{seed}", arm=arm, precision=precision, seed=seed, config=dict(seed=seed),
                reason=reason, epochs=10, steps=100,
                train_minutes=minutes, test_dice=dice, best_val_dice=0.8, points=[
                    dict(epoch=e, minutes=m, val_dice=None, test_dice=d) for e, (m, d) in enumerate(points, 1)])


def test_report_times_each_run_to_within_a_point_of_the_reference_and_checks_the_target():
    records = [record("current", 0.60, 30.0, [(10, 0.5), (30, 0.6)]),
               record("candidate", 0.805, 12.0, [(3, 0.70), (6, 0.801), (12, 0.805)], "converged"),
               record("reference", 0.81, 48.0, [(12, 0.79), (48, 0.81)])]
    rows = {r["arm"]: r for r in report.summarise(records)}
    assert rows["candidate"]["minutes_to_within"] == 6 and rows["reference"]["minutes_to_within"] == 48
    assert rows["current"]["minutes_to_within"] is None and rows["current"]["reason"] == "planned epochs"
    assert rows["candidate"]["behind_reference"] == pytest.approx(0.005)
    target = report.target_lines(list(rows.values()))
    assert target == ["- fp32, seed 0: final model within 1 point of the reference (+0.5 behind) in 12.0 <= 15 min: "
                      "**met**; ended by itself: **yes** (converged)"]
    slow = report.summarise([record("candidate", 0.79, 20.0, [(20, 0.79)]), records[2]])
    assert "**missed**" in report.target_lines(slow)[0] and "**no**" in report.target_lines(slow)[0]
    markdown = report.render_markdown(dict(meta=dict(dataset="d", commit="c", date="now", machine="m", command="x",
                                                     labeled_cases=4, unlabeled_cases=12, test_cases=20, seeds=[0],
                                                     wall_time_s=60, runs_done=3, runs_reused=0),
                                           summary=report.summarise(records), runs=records))
    assert "| candidate | fp32 | 0 | converged | 10 | 100 | 12.0 | 80.5 | 80.0 | 6.0 |" in markdown
    assert "| current | fp32 | 0 | planned epochs | 10 | 100 | 30.0 | 60.0 | 80.0 | not reached |" in markdown
    assert "Paired over seeds" not in markdown, "one seed has no interval to show"


def seeds_of(reference, candidate, current, minutes=(12.0, 14.0, 16.0), converged=(True, True, False)):
    """Records of three paired seeds with the given final test Dice per arm."""
    return [r for s in range(3) for r in (
        record("reference", reference[s], 48.0, [(48, reference[s])], seed=s),
        record("candidate", candidate[s], minutes[s], [(minutes[s], candidate[s])],
               "converged" if converged[s] else "", seed=s),
        record("current", current[s], 30.0, [(30, current[s])], seed=s))]


def test_paired_seeds_give_the_candidates_differences_with_intervals_and_judge_the_target():
    # candidate - reference: -0.5, -2.0, 0.0 points: mean -0.833, sd 1.041, half 4.303 * 1.041 / sqrt(3) = 2.586
    # candidate - current: +1.5, +1.0, +1.0 points: mean +1.167, sd 0.289, half 4.303 * 0.289 / sqrt(3) = 0.717
    rows = report.summarise(seeds_of((0.80, 0.82, 0.81), (0.795, 0.80, 0.81), (0.78, 0.79, 0.80)))
    assert [r["reference_dice"] for r in rows if r["arm"] == "candidate"] == [0.80, 0.82, 0.81], "paired by seed"
    (pair,) = report.paired(rows)
    assert pair["seeds"] == [0, 1, 2] and pair["median_minutes"] == 14.0 and pair["converged"] == 2
    assert pair["against_reference"] == pytest.approx((-0.008333, 0.025858), abs=1e-5)
    assert pair["against_current"] == pytest.approx((0.011667, 0.007172), abs=1e-5)
    lines = report.paired_lines([pair])
    assert "| fp32 | 3 | -0.83 [-3.42, +1.75] | +1.17 [+0.45, +1.88] | 14.0 | 2 of 3 |" in lines
    assert lines[-1] == ("- fp32 over 3 seeds: within 1 point of the reference: **undecided** (the interval holds "
                         "-1.0); median 14.0 <= 15 min: **yes**; ended by itself in 2 of 3")
    close = report.paired(report.summarise(seeds_of((0.80, 0.82, 0.81), (0.798, 0.817, 0.8075), (0.7,) * 3)))
    assert report.within_verdict(*close[0]["against_reference"]) == "**met**"
    far = report.paired(report.summarise(seeds_of((0.80, 0.82, 0.81), (0.78, 0.798, 0.789), (0.7,) * 3)))
    assert report.within_verdict(*far[0]["against_reference"]) == "**missed**"
    slow = report.paired_lines(report.paired(report.summarise(seeds_of((0.8,) * 3, (0.8,) * 3, (0.7,) * 3,
                                                                        minutes=(20.0, 16.0, 14.0)))))
    assert "median 16.0 <= 15 min: **no**" in slow[-1]


def test_bf16_is_paired_with_float32_by_seed_and_judged_against_half_a_point():
    fp32 = seeds_of((0.80, 0.82, 0.81), (0.80, 0.82, 0.81), (0.7,) * 3)
    # bf16 - fp32 of the candidates: -0.2, -0.2, -0.1 points: mean -0.167, sd 0.0577, half 4.303 * 0.0577 / sqrt(3)
    # = 0.143; speed-ups 12 / 10, 14 / 10, 16 / 8: median 1.4
    bf16 = [record("candidate", dice, minutes, [(minutes, dice)], seed=s, precision="bf16")
            for s, (dice, minutes) in enumerate([(0.798, 10.0), (0.818, 10.0), (0.809, 8.0)])]
    rows = report.summarise(fp32 + bf16)
    (pair,) = report.precision_pairs(rows)
    assert pair["arm"] == "candidate" and pair["seeds"] == [0, 1, 2]
    assert pair["difference"] == pytest.approx((-0.001667, 0.001434), abs=1e-5)
    assert (pair["fp32_minutes"], pair["bf16_minutes"], pair["speedup"]) == pytest.approx((14.0, 10.0, 1.4))
    lines = report.precision_lines([pair])
    assert "| candidate | 3 | -0.17 [-0.31, -0.02] | 14.0 | 10.0 | 1.40x |" in lines
    assert lines[-1] == "- candidate over 3 seeds: bf16 within 0.5 point of float32: **met**"
    worse = [dict(r, test_dice=r["test_dice"] - 0.02 + 0.001 * r["seed"]) for r in bf16]
    (far,) = report.precision_pairs(report.summarise(fp32 + worse))
    assert report.precision_lines([far])[-1].endswith("**missed**")
    markdown = report.render_markdown(dict(meta=dict(dataset="d", commit="c", date="now", machine="m", command="x",
                                                     labeled_cases=4, unlabeled_cases=12, test_cases=20,
                                                     seeds=[0, 1, 2], wall_time_s=60, runs_done=12, runs_reused=0),
                                           summary=rows, runs=fp32 + bf16))
    assert "bf16 against float32, paired over seeds" in markdown
    assert report.precision_pairs(report.summarise(fp32)) == [], "no bf16 runs, no pairs"


def test_records_from_before_seeds_read_their_seed_from_the_config():
    old = record("candidate", 0.8, 10.0, [(10, 0.8)], seed=4)
    del old["seed"]
    assert report.summarise([old])[0]["seed"] == 4


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason=f"{HIPPOCAMPUS} is absent: the real-MRI benchmark test "
                    "needs the Decathlon hippocampus dataset there")
def test_quick_path_end_to_end_on_hippocampus(tmp_path, capsys):
    argv = ["convergence", str(HIPPOCAMPUS), "--quick", "--out", str(tmp_path), "--labeled", "2", "--unlabeled",
            "1", "--test-cases", "1", "--steps", "4", "--current-epochs", "1", "--score-every", "1", "--set",
            "base_channels=4", "discriminator_channels=4", "importance_channels=8", "slice_size=[32,32]"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    runs = {r["arm"]: r for r in result["runs"]}
    assert set(runs) == set(convergence.ARMS) and result["meta"]["runs_done"] == 3
    assert runs["reference"]["epochs"] == 2 * runs["candidate"]["epochs"], "--quick: a reference twice as long"
    assert [p["epoch"] for p in runs["reference"]["points"]] == list(range(1, runs["reference"]["epochs"] + 1))
    assert all(0 <= p["test_dice"] <= 1 and p["minutes"] > 0 for r in runs.values() for p in r["points"])
    assert runs["reference"]["points"][-1]["minutes"] == pytest.approx(runs["reference"]["train_minutes"], rel=0.2)
    assert runs["candidate"]["config"]["patience"] == 3 and len(runs["current"]["metrics"]["cases"]) == 1
    assert (tmp_path / "results.png").stat().st_size > 0
    markdown = capsys.readouterr().out
    assert "| candidate | fp32 |" in markdown and "Targets (from issue 16)" in markdown
    assert main(argv) == 0, "a second invocation reuses the records"
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["meta"]["runs_reused"] == 3
