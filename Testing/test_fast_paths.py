"""The fast inference and training paths give the same answers as plain float32 PyTorch.

Speed itself is measured by ``isdnet-bench speed``, never asserted here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from isdnet import runtime
from isdnet.config import TrainConfig
from isdnet.geometry import NORMALISATION, SliceGeometry, prepare_volume
from isdnet.infer import batch_size_for, class_indices, predict_slices, segment
from isdnet.metrics import dice_per_class
from isdnet.modelfile import LoadedModel, make_header
from isdnet.networks import SUNet
from isdnet.phantoms import make_phantom
from isdnet.trainer import Trainer
from isdnet_bench.cli import main

CPU = torch.device("cpu")
GEOMETRY = SliceGeometry("z", (1.0, 1.0), (64, 64))


@pytest.fixture(scope="module")
def trained() -> tuple[LoadedModel, sitk.Image]:
    """A small SU-Net trained briefly (float32) on one phantom, and another phantom to segment."""
    image, label = make_phantom(0, shape=(12, 64, 64), num_classes=2)
    prepared = prepare_volume(image, GEOMETRY, label)
    trainer = Trainer(TrainConfig(method="baseline", base_channels=8, learning_rate=1e-2, seed=0), 2, CPU,
                      torch.float32)
    x = torch.from_numpy(prepared.image[:, None])
    y = torch.from_numpy(prepared.label.astype(np.int64))
    for step in range(40):
        pick = torch.arange(step % 3, len(x), 3)
        trainer.train_step(runtime.to_device(x[pick], CPU), y[pick])
    header = make_header(["background", "organ"], dict(NORMALISATION), GEOMETRY.to_dict(), trainer.segmenter,
                         method="baseline")
    model = LoadedModel(header=header, segmenter=trainer.segmenter.eval(), confidence=None)
    return model, make_phantom(1, shape=(10, 64, 64), num_classes=2)[0]


def test_bf16_segmentation_agrees_with_float32(trained):
    model, image = trained
    fp32 = sitk.GetArrayFromImage(segment(image, model, device="cpu", precision="fp32").labels)
    bf16 = sitk.GetArrayFromImage(segment(image, model, device="cpu", precision="bf16").labels)
    assert fp32.dtype == np.uint8 and fp32.any(), "the briefly trained network must find the organ"
    assert dice_per_class(bf16, fp32, [1])[1] >= 0.99


def test_bf16_probabilities_close_to_float32(trained):
    model, image = trained
    slices = prepare_volume(image, GEOMETRY).image
    runs = {dtype: torch.cat([p for _, p, _ in predict_slices(model.segmenter, slices, batch_size=4, device=CPU,
                                                              dtype=dtype)])
            for dtype in (torch.float32, torch.bfloat16)}
    assert (runs[torch.bfloat16] - runs[torch.float32]).abs().mean() < 0.01


def test_batched_prediction_equals_unbatched():
    torch.manual_seed(0)
    net = SUNet(1, 3, 8)
    slices = np.random.default_rng(0).normal(size=(5, 40, 48)).astype(np.float32)
    batched = [p for _, p, _ in predict_slices(net, slices, batch_size=4, device=CPU, dtype=torch.float32)]
    single = [p for _, p, _ in predict_slices(net, slices, batch_size=1, device=CPU, dtype=torch.float32)]
    batched, single = torch.cat(batched), torch.cat(single)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    assert torch.equal(batched.argmax(1), single.argmax(1))


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_class_indices_equal_argmax_with_ties(classes):
    maps = torch.from_numpy(np.random.default_rng(classes).integers(0, 3, size=(4, classes, 9, 11))).float()
    assert (maps.amax(1, keepdim=True) == maps).sum(1).max() > 1  # ties present: the lower class must win
    assert torch.equal(class_indices(maps), maps.argmax(1))
    assert torch.equal(class_indices(maps.contiguous(memory_format=torch.channels_last)), maps.argmax(1))


def test_batch_size_follows_the_device_pixel_budget():
    cuda = torch.device("cuda")
    assert [batch_size_for(side * side, CPU, 16) for side in (48, 128, 320, 512, 1024)] == [16, 16, 2, 1, 1]
    assert [batch_size_for(side * side, cuda, 16) for side in (128, 320, 512)] == [16, 16, 8]
    assert batch_size_for(320 * 320, CPU, 1) == 1


def test_channels_last_equals_contiguous():
    torch.manual_seed(0)
    net = SUNet(1, 2, 8).eval()
    x = torch.randn(3, 1, 48, 64)
    with torch.inference_mode():
        plain = net(x)
        fast = net.to(memory_format=torch.channels_last)(runtime.to_device(x, CPU))
    assert runtime.to_device(x, CPU).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)


def test_streaming_segmentation_matches_whole_volume_prediction(trained):
    model, image = trained
    labels = sitk.GetArrayFromImage(segment(image, model, device="cpu", precision="fp32", batch_size=3).labels)
    slices = prepare_volume(image, GEOMETRY).image
    with torch.inference_mode():
        whole = model.segmenter(torch.from_numpy(slices[:, None])).argmax(1).numpy()
    assert np.array_equal(labels, whole.astype(np.uint8))


@pytest.mark.parametrize("name, probe", [("cuda", "cuda"), ("mps", "mps")])
def test_unavailable_device_is_an_error(monkeypatch, name, probe):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=probe):
        runtime.resolve_device(name)
    assert runtime.resolve_device("auto") == CPU


def test_auto_device_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.resolve_device("auto").type == "mps"
    with pytest.raises(ValueError, match="device must be one of"):
        runtime.resolve_device("tpu")


def test_precision_policy(monkeypatch):
    assert runtime.resolve_precision("fp32", CPU) == torch.float32
    assert runtime.resolve_precision("bf16", CPU, training=True) == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.resolve_precision("auto", CPU) == torch.bfloat16
    assert runtime.resolve_precision("auto", CPU, training=True) == torch.float32
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert runtime.resolve_precision("auto", CPU) == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.resolve_precision("fp16", CPU)


def test_bench_speed_quick_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["speed", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text(encoding="utf-8"))
    assert {"matmul_peak_gflops", "inference", "memory", "training", "agreement", "machine"} <= set(results)
    assert [row["volume"] for row in results["inference"]] == ["LASC", "CT"]
    for row in results["inference"]:
        assert row["fast"]["slices_per_s"] > 0 and row["plain_fp32"]["slices_per_s"] > 0 and row["speedup"] > 0
    assert {row["dtype"] for row in results["training"]} >= {"fp32"}
    assert all(row["data_ms"] > 0 and 0 < row["data_share_of_isdnet_step"] for row in results["training"])
    assert results["agreement"][0]["data"] == "phantom"
    rank = results["rank"]
    assert rank["data"] == "phantom" and rank["volumes"] == 3 and rank["seconds"] > 0
    assert rank["signals"] == ["confidence", "entropy", "flip"]  # an isdnet model: D's signal is timed too
    assert rank["target_s"] == pytest.approx(60.0 * 3 / 50)
    table = capsys.readouterr().out
    assert "segment()" in table and "plain fp32 batch-1" in table and "isdnet/baseline" in table
    assert "batch making" in table and "rank: 3 phantom volumes, strategy combined" in table
