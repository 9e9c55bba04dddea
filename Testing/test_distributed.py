"""Data-parallel training with 2 gloo processes on the CPU: identical weights on every rank, and a model as good
as a single-process run of the same length."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from isdnet.checkpoint import checksum
from isdnet.config import TrainConfig
from isdnet.distributed import ProcessGroup
from isdnet.infer import segment
from isdnet.phantoms import write_phantom_dataset
from isdnet.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(base_channels=4, discriminator_channels=4, importance_channels=8, precision="fp32", device="cpu",
            learning_rate=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps_on_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(100 + rank)  # different data per rank; the trainer seeds (and broadcasts) the weights
    trainer = Trainer(TrainConfig(method="isdnet", seed=rank, **TINY), 3, torch.device("cpu"), torch.float32,
                      ProcessGroup(rank, world_size))
    digests = []
    for _ in range(3):
        x = torch.randn(2, 1, 32, 32)
        y = torch.randint(0, 3, (2, 32, 32))
        trainer.train_step(x, y, torch.randn(2, 1, 32, 32))
        digests.append(checksum({k: v for k, v in trainer.state_tensors().items() if k.startswith("net.")}, ""))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(digests), encoding="utf-8")
    dist.destroy_process_group()


def test_weights_identical_across_ranks_after_every_step(tmp_path):
    mp.spawn(_steps_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text(encoding="utf-8"))
    rank1 = json.loads((tmp_path / "rank1.json").read_text(encoding="utf-8"))
    assert len(rank0) == 3 and rank0 == rank1
    assert len(set(rank0)) == 3  # the weights did change at every step


@pytest.mark.slow
def test_torchrun_two_processes_train_as_well_as_one(tmp_path):
    data = write_phantom_dataset(tmp_path / "data", 8, seed=11, shape=(12, 48, 48), spacing=(1.5, 1.5, 3.0))
    common = ["train", str(data), "--labeled-fraction", "0.5", "--epochs", "6", "--steps-per-epoch", "4",
              "--warmup-epochs", "2", "--base-channels", "8", "--batch-size", "4", "--learning-rate", "3e-3",
              "--precision", "fp32", "--device", "cpu", "--seed", "0", "--validation-fraction", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.safetensors"
    subprocess.run([sys.executable, "-m", "isdnet", *common, "--out", str(single)], env=env, check=True,
                   capture_output=True, timeout=900)
    double = tmp_path / "ddp.safetensors"
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "isdnet", *common, "--out", str(double), "--progress-json"],
        env=env, capture_output=True, text=True, timeout=900, encoding="utf-8")
    assert launched.returncode == 0, launched.stderr[-3000:]
    events = [json.loads(line) for line in launched.stdout.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events].count("done") == 1  # only rank 0 reports
    image = sitk.ReadImage(str(data / "imagesTr" / "phantom_007.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / "phantom_007.nii.gz")))

    def organ_dice(model):
        pred = sitk.GetArrayFromImage(segment(image, model, device="cpu", precision="fp32").labels)
        return 2 * np.sum((pred == 1) & (truth == 1)) / (np.sum(pred == 1) + np.sum(truth == 1))

    one, two = organ_dice(single), organ_dice(double)
    assert two > 0.5 and two >= one - 0.15, (one, two)
