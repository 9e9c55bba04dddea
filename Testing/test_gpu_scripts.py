"""The GPU speed script and ``isdnet-bench speed --device cuda``, as far as a CPU-only machine can check them:
the script runs the same sections on the CPU and writes the JSON; asking for CUDA without one is a one-line
error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from isdnet_bench.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_speed_on_cuda_without_a_gpu_is_one_line_naming_it(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["speed", "--quick", "--device", "cuda", "--only", "training", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "isdnet-bench speed: error: device 'cuda' was asked for, but this PyTorch sees no CUDA GPU"
    assert not out.exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="the GPU scripts are bash scripts")
def test_gpu_speed_script_writes_the_inference_and_training_json_on_the_cpu(tmp_path):
    out = tmp_path / "speed-gpu.json"
    environment = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "isdnet_bench/gpu_speed.sh", "--quick"], cwd=ROOT, env=environment,
                          capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["device"] == "cpu" and "memory" not in results and "agreement" not in results
    assert [row["volume"] for row in results["inference"]] == ["LASC", "CT"]
    assert all(row["fast"]["slices_per_s"] > 0 and row["speedup"] > 0 for row in results["inference"])
    assert {row["dtype"] for row in results["training"]} >= {"fp32", "bf16"}
    assert all(row["isdnet_over_baseline"] > 0 for row in results["training"])
