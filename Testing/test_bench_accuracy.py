"""``isdnet-bench accuracy``: run planning, the report, and the --quick path end to end on real hippocampus MRI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from isdnet.config import TrainConfig
from isdnet.dataset import Case
from isdnet.errors import InputError
from isdnet_bench import accuracy as bench_accuracy
from isdnet_bench import accuracy_plan as plan
from isdnet_bench import accuracy_report as report
from isdnet_bench import records
from isdnet_bench.cli import main

HIPPOCAMPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hippocampus"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_accuracy.add_arguments(parser)
    return parser.parse_args(["dataset", *argv])


def test_default_plan_pairs_five_seeds_of_baseline_and_isdnet_seed_major():
    runs = plan.plan_runs(parse())
    assert len(runs) == 3 * (3 * 5 + 1) + 2 * (3 * 2 + 1)
    assert len({r.name for r in runs}) == len(runs)
    assert [r.seed for r in runs[:16]] == [0] * 16, "every cell of seed 0 comes before seed 1"
    assert {r.key for r in runs} == {"1/2", "1/8", "1/16", "full"}
    assert all(r.method == "baseline" for r in runs if r.key == "full")
    by_method = {m: sorted({r.seed for r in runs if r.method == m}) for m in {r.method for r in runs}}
    assert by_method["baseline"] == by_method["isdnet"] == [0, 1, 2, 3, 4]
    assert by_method["hung"] == by_method["adv"] == by_method["adv-classifier"] == [0, 1, 2]


def test_a_named_variant_is_an_isdnet_row_of_its_own_with_its_options():
    args = parse("--methods", "baseline", "--fractions", "0.125", "--no-full", "--seeds", "0", "1",
                 "--variant", "unaug:pseudo_labels=unaugmented,lambda_semi=0.5")
    runs = [r for r in plan.plan_runs(args) if r.variant]
    assert [(r.label, r.seed, r.name) for r in runs] == [("isdnet [unaug]", 0, "isdnet-unaug_1of8_seed0"),
                                                         ("isdnet [unaug]", 1, "isdnet-unaug_1of8_seed1")]
    config = plan.train_config(args, runs[0])
    assert (config.method, config.pseudo_labels, config.lambda_semi) == ("isdnet", "unaugmented", 0.5)
    with pytest.raises(ValueError, match="NAME:OPTION=VALUE"):
        plan.variants(parse("--variant", "no-colon"))
    records = [dict(key="1/8", method=m, label=label, variant=v, seed=seed, overrides={"x": 1} if v else {},
                    metrics=dict(dice=d, dice_per_class={"1": d}, global_dice_mean=d, hd95={"1": 1.0}),
                    train_time_s=1.0, steps=1, labeled_cases=1, history=[])
               for (m, label, v), seed, d in [(("baseline", "baseline", ""), 0, 0.80),
                                              (("isdnet", "isdnet [unaug]", "unaug"), 0, 0.82)]]
    summary = report.summarise(records)
    assert report.rows_of(summary) == ["baseline", "isdnet [unaug]"]
    pair = next(p for p in report.paired(summary) if p["method"] == "isdnet [unaug]")
    assert pair["against"] == "baseline" and pair["differences"] == pytest.approx([2.0])


def test_a_variant_of_both_methods_pairs_isdnet_against_the_baseline_with_the_same_change():
    args = parse("--methods", "baseline", "isdnet", "--fractions", "0.015625", "--no-full", "--seeds", "0",
                 "--variant", "ce:cross_entropy=1", "--variant-methods", "baseline", "isdnet")
    runs = plan.plan_runs(args)
    assert [r.name for r in runs] == ["baseline_1of64_seed0", "isdnet_1of64_seed0", "baseline-ce_1of64_seed0",
                                      "isdnet-ce_1of64_seed0"]
    assert [plan.train_config(args, r).cross_entropy for r in runs] == [0, 0, 1, 1]
    records = [dict(key="1/64", method=r.method, label=r.label, variant=r.variant, seed=0, overrides=dict(r.overrides),
                    metrics=dict(dice=d, dice_per_class={"1": d}, global_dice_mean=d, hd95={"1": 1.0}),
                    train_time_s=1.0, steps=1, labeled_cases=2, history=[])
               for r, d in zip(runs, (0.78, 0.76, 0.80, 0.83))]
    pairs = {(p["method"], p["against"]): p["differences"] for p in report.paired(report.summarise(records))}
    assert pairs[("isdnet [ce]", "baseline [ce]")] == pytest.approx([3.0])
    assert pairs[("isdnet [ce]", "baseline")] == pytest.approx([5.0])
    assert pairs[("isdnet", "baseline")] == pytest.approx([-2.0])
    assert ("baseline [ce]", "baseline [ce]") not in pairs and ("baseline [ce]", "isdnet") not in pairs


def test_a_variant_of_both_methods_trains_no_baseline_that_another_run_already_trains():
    args = parse("--methods", "baseline", "isdnet", "--fractions", "0.015625", "--no-full", "--seeds", "0",
                 "--variant", "ce:cross_entropy=1", "ce-unaug:cross_entropy=1,pseudo_labels=unaugmented",
                 "unaug:pseudo_labels=unaugmented", "--variant-methods", "baseline", "isdnet")
    assert [r.label for r in plan.plan_runs(args)] == ["baseline", "isdnet", "baseline [ce]", "isdnet [ce]",
                                                       "isdnet [ce-unaug]", "isdnet [unaug]"]


def test_an_isdnet_variant_pairs_with_the_baseline_variant_that_makes_the_same_change_to_the_baseline():
    def record(label, overrides, dice):
        method, _, variant = label.partition(" [")
        return dict(key="1/64", method=method, label=label, variant=variant.rstrip("]"), seed=0, overrides=overrides,
                    metrics=dict(dice=dice, dice_per_class={"1": dice}, global_dice_mean=dice, hd95={"1": 1.0}),
                    train_time_s=1.0, steps=1, labeled_cases=2, history=[])

    records = [record("baseline", {}, 0.77), record("baseline [ce]", {"cross_entropy": 1}, 0.79),
               record("baseline [lr]", {"learning_rate": 0.01}, 0.70),
               record("isdnet [ce-unaug]", {"cross_entropy": 1, "pseudo_labels": "unaugmented"}, 0.815),
               record("isdnet [unaug]", {"pseudo_labels": "unaugmented"}, 0.76)]
    pairs = {(p["method"], p["against"]): p["differences"] for p in report.paired(report.summarise(records))}
    # pseudo_labels is read by the unlabeled terms only, so isdnet [ce-unaug] changes a baseline as [ce] does
    assert pairs[("isdnet [ce-unaug]", "baseline [ce]")] == pytest.approx([2.5])
    assert pairs[("isdnet [ce-unaug]", "baseline")] == pytest.approx([4.5])
    assert ("isdnet [ce-unaug]", "baseline [lr]") not in pairs and ("isdnet [unaug]", "baseline [ce]") not in pairs
    assert ("baseline [ce]", "baseline [lr]") not in pairs


def test_finished_runs_are_reused_only_with_the_same_settings():
    current = {"config": TrainConfig(seed=1).as_json(), "train": ["a", "b"], "test": ["c"]}
    older = {**current, "config": {k: v for k, v in current["config"].items() if k != "discriminator"}}
    assert records.same_settings(current, current)
    assert records.same_settings(older, current), "an option added since, at its default, changes nothing"
    assert not records.same_settings(older, {**current, "config": {**current["config"], "discriminator": "X"}})
    assert not records.same_settings(current, {**current, "config": TrainConfig(seed=2).as_json()})
    assert not records.same_settings(current, {**current, "test": ["d"]})
    assert not records.same_settings(None, current)


def test_grid_changes_one_hyperparameter_at_a_time():
    grid = [r for r in plan.plan_runs(parse("--grid", "--no-full")) if r.overrides]
    assert len(grid) == 2 + 2 + 3
    assert all(len(r.overrides) == 1 and r.method == "isdnet" for r in grid)


def test_every_run_gets_the_same_budget_and_keeps_its_final_model():
    args = parse("--steps", "100", "--set", "cross_entropy=0.5", "class_weights=[1,2,3]")
    configs = [plan.train_config(args, r) for r in plan.plan_runs(args)]
    assert {c.total_steps for c in configs} == {100}
    assert {c.model_selection for c in configs} == {"final"}
    assert {c.seed for c in configs} == {0, 1, 2, 3, 4}
    assert {c.cross_entropy for c in configs} == {0.5} and configs[0].class_weights == [1, 2, 3]
    with pytest.raises(ValueError, match="OPTION=VALUE"):
        plan.train_config(parse("--set", "no_such_option=1"), plan.plan_runs(args)[0])


def test_fraction_labels():
    assert [report.fraction_key(f) for f in (0.5, 0.125, 0.0625, 1.0)] == ["1/2", "1/8", "1/16", "full"]


def test_split_without_splits_file_is_fixed_and_disjoint(tmp_path):
    cases = [Case(f"c{i}", tmp_path / f"c{i}.nii.gz", tmp_path / f"l{i}.nii.gz") for i in range(10)]
    train, test = plan.split_cases(tmp_path, cases, 0.2)
    assert len(test) == 2 and not {c.name for c in train} & {c.name for c in test}
    assert plan.split_cases(tmp_path, cases, 0.2) == (train, test)


def test_paired_differences_and_targets():
    def cell(by_seed):
        return {"dice": report.mean_sd(list(by_seed.values())), "dice_by_seed": {str(k): v for k, v in by_seed.items()},
                "seeds": list(by_seed)}

    summary = {"1/8|baseline": cell({0: 0.70, 1: 0.72, 2: 0.74}),
               "1/8|isdnet": cell({0: 0.73, 1: 0.74, 2: 0.77, 3: 0.9}),
               "1/8|hung": cell({0: 0.74, 1: 0.75}), "full|baseline": cell({0: 0.85})}
    pairs = report.paired(summary)
    isdnet = next(p for p in pairs if (p["method"], p["against"]) == ("isdnet", "baseline"))
    # seeds 0-2 only (seed 3 has no baseline): differences +3, +2, +3 points; mean 8/3, SD 0.57735;
    # half-width t(0.975, 2) * 0.57735 / sqrt(3) = 4.303 * 0.33333
    assert isdnet["seeds"] == [0, 1, 2] and isdnet["differences"] == pytest.approx([3.0, 2.0, 3.0])
    assert isdnet["mean"] == pytest.approx(8 / 3) and isdnet["high"] - isdnet["mean"] == pytest.approx(4.303 / 3)
    lines = report.targets(summary, pairs)
    assert "full-label baseline >= 84: 85.0 **met**" in lines[0]
    assert "1/8: isdnet - baseline >= +1.8" in lines[1] and "**met**" in lines[1]
    assert "isdnet - hung > 0" in lines[2] and "**missed**" in lines[2]  # -1 and -1: the interval is below 0
    # seeds 0-1 against hung at +1 and -3 points: the interval holds 0, so neither met nor missed
    summary["1/8|hung"] = cell({0: 0.72, 1: 0.77})
    lines = report.targets(summary, report.paired(summary))
    assert "isdnet - hung > 0: -1.00 [" in lines[2] and "**undecided** (the interval holds +0.0)" in lines[2]
    assert report.mean_interval([1.0])[1] == float("inf")


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason=f"{HIPPOCAMPUS} is absent: the real-MRI benchmark test "
                    "needs the Decathlon hippocampus dataset there")
def test_quick_path_end_to_end_on_hippocampus(tmp_path, capsys):
    code = main(["accuracy", str(HIPPOCAMPUS), "--quick", "--out", str(tmp_path), "--cases", "6",
                 "--test-cases", "2", "--steps", "4", "--methods", "baseline", "isdnet",
                 "--fractions", "0.5", "--no-full", "--base-channels", "8", "--slice-size", "32", "32",
                 "--jobs", "2", "--threads", "1"])  # two runs at once, in two processes
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert set(report["summary"]) == {"1/2|baseline", "1/2|isdnet"}
    runs = {r["method"]: r for r in report["runs"]}
    # 3 labeled cases: 2 to train on, 1 to validate; the budget rounds to one pass over their slices
    assert runs["isdnet"]["labeled_cases"] == 2 and runs["isdnet"]["validation_cases"] == 1
    assert runs["isdnet"]["unlabeled_cases"] == 3
    assert runs["baseline"]["steps"] == runs["isdnet"]["steps"] >= 4 and runs["isdnet"]["epochs"] == 1
    assert runs["isdnet"]["metrics_best"]["dice"] >= 0 and 0 <= runs["isdnet"]["confidence"]["auroc_wrong"] <= 1
    assert len(runs["isdnet"]["metrics"]["cases"]) == 2
    assert "unlabeled" in runs["isdnet"]["importance"]
    assert (tmp_path / "results.png").stat().st_size > 0
    markdown = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| isdnet |" in markdown and "Targets" in markdown
    assert "| isdnet |" in capsys.readouterr().out
    # A second invocation, with no models or logs (another machine), resumes from the records: nothing to train.
    assert main(["accuracy", str(HIPPOCAMPUS), "--quick", "--out", str(tmp_path / "elsewhere"),
                 "--records", str(tmp_path / "runs"), "--report", str(tmp_path / "results"), "--cases", "6",
                 "--test-cases", "2", "--steps", "4", "--methods", "baseline", "isdnet",
                 "--fractions", "0.5", "--no-full", "--base-channels", "8", "--slice-size", "32", "32"]) == 0
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["meta"]["runs_reused"] == 2
    # --report-only reports the finished runs and trains none of the missing ones (here: adv).
    assert main(["accuracy", str(HIPPOCAMPUS), "--quick", "--out", str(tmp_path), "--cases", "6",
                 "--test-cases", "2", "--steps", "4", "--methods", "baseline", "adv", "isdnet",
                 "--fractions", "0.5", "--no-full", "--base-channels", "8", "--slice-size", "32", "32",
                 "--report-only"]) == 0
    partial = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert partial["meta"]["runs_done"] == 0 and set(partial["summary"]) == {"1/2|baseline", "1/2|isdnet"}
    assert not (tmp_path / "runs" / "adv_1of2_seed0.json").exists()


def test_a_run_stopped_before_its_budget_leaves_no_record_and_resumes_next_time(tmp_path, capsys):
    """SIGTERM at the end of a session stops a run through the same request as its stop file: its partly trained
    model must not be scored as the run's result. The next invocation resumes it from its checkpoint."""
    from isdnet.config import stop_path
    from isdnet.phantoms import write_phantom_dataset

    write_phantom_dataset(tmp_path / "data", 8, shape=(12, 48, 48))
    argv = ["accuracy", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--methods", "baseline",
            "--fractions", "0.5", "--no-full", "--seeds", "0", "--steps", "6", "--warmup-epochs", "1",
            "--base-channels", "4", "--slice-size", "32", "32", "--test-fraction", "0.25"]
    runs = tmp_path / "out" / "runs"
    runs.mkdir(parents=True)
    stop_path(runs / "baseline_1of2_seed0.safetensors").touch()  # Stop pressed as the run starts
    assert main(argv) == 2
    assert "baseline_1of2_seed0 was stopped" in capsys.readouterr().err
    assert not (runs / "baseline_1of2_seed0.json").exists()
    assert main(argv) == 0
    record = json.loads((runs / "baseline_1of2_seed0.json").read_text(encoding="utf-8"))
    assert record["resumed"] and record["steps"] >= 6


def test_a_checkpoint_that_cannot_be_resumed_starts_the_run_over(tmp_path, capsys):
    """A checkpoint written by an older version (here: bytes that are no checkpoint) is no reason to stop the
    benchmark: the run starts over, and says so. Its errors cross the pool of runs intact (they pickle)."""
    import pickle

    from isdnet.config import checkpoint_path
    from isdnet.errors import InputError, ModelFileError
    from isdnet.phantoms import write_phantom_dataset

    error = pickle.loads(pickle.dumps(ModelFileError("m.safetensors", "is damaged")))
    assert isinstance(error, InputError) and (error.path, error.problem) == ("m.safetensors", "is damaged")
    write_phantom_dataset(tmp_path / "data", 8, shape=(12, 48, 48))
    runs = tmp_path / "out" / "runs"
    runs.mkdir(parents=True)
    checkpoint_path(runs / "baseline_1of2_seed0.safetensors").write_bytes(b"not a checkpoint" * 64)
    assert main(["accuracy", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--methods", "baseline",
                 "--fractions", "0.5", "--no-full", "--seeds", "0", "--steps", "6", "--warmup-epochs", "1",
                 "--base-channels", "4", "--slice-size", "32", "32", "--test-fraction", "0.25"]) == 0
    assert "its checkpoint cannot be resumed" in capsys.readouterr().err
    record = json.loads((runs / "baseline_1of2_seed0.json").read_text(encoding="utf-8"))
    assert record["steps"] >= 6 and not record["resumed"]  # started over, not continued


def test_the_headline_of_a_doc_is_rewritten_from_the_report_and_the_prose_around_it_is_kept(tmp_path):
    records = [dict(key="1/8", method=m, label=m, variant="", seed=seed, overrides={},
                    metrics=dict(dice=d, dice_per_class={"1": d}, global_dice_mean=d, hd95={"1": 1.0}),
                    train_time_s=1.0, steps=1, labeled_cases=1, history=[])
               for m, seed, d in [("baseline", 0, 0.80), ("baseline", 1, 0.82), ("isdnet", 0, 0.83),
                                  ("isdnet", 1, 0.84)]]
    summary = report.summarise(records)
    start, end = report.headline_markers()
    table3 = "\n".join(report.headline_markers("table3"))
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\nintro\n\n{start}\nold numbers\n{end}\n\nafter\n{table3}\n", encoding="utf-8")
    report.write_headline(dict(summary=summary, paired=report.paired(summary)), doc)
    text = doc.read_text(encoding="utf-8")
    assert text.startswith(f"# Results\n\nintro\n\n{start}\n") and text.endswith(f"\n{end}\n\nafter\n{table3}\n")
    assert "old numbers" not in text
    report.write_headline(dict(summary=summary, paired=report.paired(summary)), doc, "table3")  # a second block
    second = doc.read_text(encoding="utf-8")
    assert second.startswith(text[:-len(table3) - 1]) and second.count("| isdnet | 83.5 ± 0.7 (n=2) |") == 2
    assert "| baseline | 81.0 ± 1.4 (n=2) |" in text and "| isdnet | 83.5 ± 0.7 (n=2) |" in text
    assert "| 1/8 | isdnet - baseline | [0, 1] | +3.0, +2.0 | +2.50 [" in text
    broken = tmp_path / "no-markers.md"
    broken.write_text("prose only\n", encoding="utf-8")
    with pytest.raises(InputError, match="no-markers.md"):
        report.write_headline(dict(summary=summary, paired=report.paired(summary)), broken)
    assert broken.read_text(encoding="utf-8") == "prose only\n"


def test_a_worker_that_was_stopped_or_lost_its_benchmark_starts_no_queued_run(monkeypatch, tmp_path):
    import threading

    class Parent:
        alive = True

        def is_alive(self):
            return self.alive

    parent = Parent()
    monkeypatch.setattr(bench_accuracy.multiprocessing, "parent_process", lambda: parent)  # as in a pool worker
    started = []

    def execute(planned, *args):
        started.append(planned.name)
        if planned.name.startswith("baseline"):
            raise records.RunStopped(f"{planned.name} was stopped at epoch 3")
        return dict(metrics=dict(dice=0.5), train_time_s=1.0, eval_time_s=1.0)

    monkeypatch.setattr(bench_accuracy, "execute", execute)
    stopping = threading.Event()  # the pool's event; the same interface
    bench_accuracy._join_pool(stopping)
    monkeypatch.setattr(bench_accuracy, "_stopping", stopping)
    first, queued = plan.Run("baseline", 0.125, 0), plan.Run("isdnet", 0.125, 0)
    work = ([], [], {}, tmp_path, {}, tmp_path / "record.json", 1)
    path = bench_accuracy._execute_and_save(queued, None, *work)
    assert json.loads(path.read_text(encoding="utf-8"))["metrics"]["dice"] == 0.5
    assert started == ["isdnet_1of8_seed0"]
    with pytest.raises(records.RunStopped, match="stopped at epoch 3"):
        bench_accuracy._execute_and_save(first, None, *work)
    assert stopping.is_set(), "a stopped run tells the other workers"
    with pytest.raises(records.RunStopped, match="isdnet_1of8_seed0 was not started"):
        bench_accuracy._execute_and_save(queued, None, *work)
    assert started == ["isdnet_1of8_seed0", "baseline_1of8_seed0"], "the queued run after the stop never started"

    stopping.clear()
    parent.alive = False
    with pytest.raises(records.RunStopped, match="not started"):
        bench_accuracy._execute_and_save(queued, None, *work)
    assert len(started) == 2


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM to them are POSIX; on Windows "
                    "the pool's workers end with the console's Ctrl-C")
def test_sigterm_to_the_benchmarks_process_group_leaves_no_process_and_every_started_run_resumable(tmp_path):
    """What cpu_table.sh's header tells a user to do: two runs at once, a third queued, SIGTERM to the group. The
    started runs checkpoint, the queued one never starts, and no worker stays behind waiting on its queue."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    from isdnet.config import checkpoint_path
    from isdnet.phantoms import write_phantom_dataset

    write_phantom_dataset(tmp_path / "data", 8, shape=(12, 48, 48))
    runs = tmp_path / "out" / "runs"
    err = tmp_path / "stderr.txt"
    root = Path(__file__).resolve().parents[1]
    with err.open("wb") as stderr:
        bench = subprocess.Popen(
            [sys.executable, "-m", "isdnet_bench", "accuracy", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
             "--methods", "baseline", "--fractions", "0.5", "--no-full", "--seeds", "0", "1", "2",
             "--steps", "100000", "--warmup-epochs", "1", "--base-channels", "4", "--slice-size", "32", "32",
             "--test-fraction", "0.25", "--jobs", "2", "--threads", "1"],
            cwd=root, stderr=stderr, stdout=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(root)})
    models = [runs / f"baseline_1of2_seed{seed}.safetensors" for seed in (0, 1, 2)]
    started = [records.run_log_path(model) for model in models[:2]]
    deadline = time.monotonic() + 240
    while not all(p.is_file() and '"iteration"' in p.read_text(encoding="utf-8") for p in started):
        assert bench.poll() is None and time.monotonic() < deadline, err.read_text(encoding="utf-8")
        time.sleep(0.5)
    family = [psutil.Process(bench.pid), *psutil.Process(bench.pid).children(recursive=True)]
    assert len(family) >= 3, "the benchmark and its two workers"
    os.killpg(bench.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=120)
    left = [process.pid for process in alive]
    for process in alive:
        process.kill()
    assert not left, f"processes {left} still ran 2 min after SIGTERM; {err.read_text(encoding='utf-8')}"
    for model, log in zip(models, started):
        events = [json.loads(line)["event"] for line in log.read_text(encoding="utf-8").splitlines()]
        assert events[-1] == "stopped" and checkpoint_path(model).is_file()
    assert not records.run_log_path(models[2]).exists(), "the queued run never started"
    assert not list(runs.glob("*.json")), "no stopped run left a record"
