"""``isdnet_bench/seed_workers.sh``, which the cpu_*.sh benchmarks source: every seed runs once, with its own
report, JOBS at once, each worker taking its seeds in order."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform == "win32" or shutil.which("bash") is None,
                    reason="the CPU benchmark scripts are bash scripts for the build machines")
def test_each_seed_runs_every_seed_once_with_its_report_two_at_once(tmp_path):
    script = f"""
set -euo pipefail
source {ROOT / "isdnet_bench" / "seed_workers.sh"}
OUT={tmp_path}
JOBS=2
SEEDS=(3 5 7 9 11)
fake() {{ echo "$BASHPID $*" >> {tmp_path / "calls.txt"}; sleep 0.2; }}
each_seed fake
echo done >> {tmp_path / "calls.txt"}
"""
    subprocess.run(["bash", "-c", script], check=True, timeout=60)
    lines = (tmp_path / "calls.txt").read_text().splitlines()
    assert lines[-1] == "done", "each_seed returns only when every worker is done"
    calls = [line.split(" ", 1) for line in lines[:-1]]
    assert sorted(args for _, args in calls) == sorted(f"--seeds {s} --report {tmp_path}/seed{s}"
                                                       for s in (3, 5, 7, 9, 11))
    by_worker: dict[str, list[int]] = {}
    for pid, args in calls:
        by_worker.setdefault(pid, []).append(int(args.split()[1]))
    assert sorted(by_worker.values()) == [[3, 7, 11], [5, 9]], "worker k takes seeds k, k + JOBS, ... in order"


@pytest.mark.skipif(sys.platform == "win32" or shutil.which("bash") is None,
                    reason="the CPU benchmark scripts are bash scripts for the build machines")
def test_cpu_convergence_runs_each_seed_in_float32_then_its_bf16_candidate_then_the_paired_report(tmp_path):
    calls = tmp_path / "calls.txt"
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    fake_python.chmod(0o755)
    environment = dict(PATH="/usr/bin:/bin", PYTHON=str(fake_python), SEEDS="0 1 2", JOBS="2",
                       OUT=str(tmp_path / "out"), RECORDS=str(tmp_path / "records"), REPORT=str(tmp_path / "report"))
    subprocess.run(["bash", str(ROOT / "isdnet_bench" / "cpu_convergence.sh")], check=True, timeout=60,
                   env=environment)
    lines = calls.read_text().splitlines()
    common = (f"-m isdnet_bench convergence ../shared/data/hippocampus --out {tmp_path / 'out'} --records "
              f"{tmp_path / 'records'} --threads 1 --steps 1200")
    fp32 = {f"{common} --seeds {s} --report {tmp_path / 'out'}/seed{s}" for s in range(3)}
    bf16 = {f"{common} --arms candidate --precision bf16 --seeds {s} --report {tmp_path / 'out'}/seed{s}"
            for s in range(3)}
    assert set(lines[:3]) == fp32 and set(lines[3:6]) == bf16, "every float32 seed before any bf16 candidate"
    assert lines[6:] == [f"{common} --seeds 0 1 2 --precision fp32 bf16 --report {tmp_path / 'report'} --report-only"]
