"""Tests of isdnet.modelfile: round trip, every refusal, and atomic writing."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from isdnet.errors import InputError, ModelFileError
from isdnet.modelfile import default_colors, load_model, make_header, save_model
from isdnet.modelheader import METADATA_KEY, read_header
from isdnet.networks import ConfidenceNet, SUNet


def _networks(num_classes: int = 3) -> tuple[SUNet, ConfidenceNet]:
    torch.manual_seed(0)
    return (SUNet(num_classes=num_classes, base_channels=4, depth=2, groups=2),
            ConfidenceNet(num_classes=num_classes, base_channels=4))


def _header(segmenter, confidence=None) -> dict:
    return make_header(["background", "liver", "lesion"], {"method": "zscore", "mean": 100.0, "std": 50.0},
                       {"slice_axis": "z", "spacing": [0.8, 0.8], "size": [64, 64]}, segmenter, confidence,
                       method="isdnet", dataset="phantoms")


@pytest.fixture
def saved(tmp_path):
    segmenter, confidence = _networks()
    header = _header(segmenter, confidence)
    path = save_model(tmp_path / "model.safetensors", header, segmenter, confidence)
    return path, header, segmenter, confidence


def test_round_trip_gives_identical_outputs_and_header(saved):
    path, header, segmenter, confidence = saved
    loaded = load_model(path)
    assert loaded.header == header
    assert read_header(path) == header
    assert not loaded.segmenter.training and not loaded.confidence.training
    segmenter.eval()
    confidence.eval()
    x = torch.randn(2, 1, 20, 24)
    with torch.no_grad():
        assert torch.equal(loaded.segmenter(x), segmenter(x))
        probabilities = torch.softmax(segmenter(x), 1)
        assert torch.equal(loaded.confidence(probabilities), confidence(probabilities))



def test_a_model_written_before_d_had_a_temperature_loads_at_temperature_one(saved):
    """An option added to a network later has a default, so the model files written before it still load."""
    header = copy.deepcopy(saved[1])
    del header["architecture"]["confidence"]["temperature"]
    loaded = load_model(_rewrite(saved[0], header=header))
    assert loaded.confidence.temperature == 1.0

def test_segmenter_only_and_state_dict_input(tmp_path):
    segmenter, _ = _networks()
    state = {k: v.to(torch.float64) for k, v in segmenter.state_dict().items()}
    path = save_model(tmp_path / "s.safetensors", _header(segmenter), state)
    loaded = load_model(path)
    assert loaded.confidence is None
    tensors = safetensors.torch.load_file(path)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())
    assert all(name.startswith("segmenter.") for name in tensors)


def test_header_follows_the_schema_and_defaults(saved):
    path, header, _, _ = saved
    assert header["classes"][0] == {"value": 0, "name": "background", "color": [0, 0, 0]}
    assert header["provenance"]["dataset"] == "phantoms"
    assert header["architecture"]["segmenter"]["name"] == "SUNet"


def test_default_colors():
    colors = default_colors(30)
    assert colors[0] == [0, 0, 0]
    assert len({tuple(c) for c in colors}) == 30
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colors)
    assert default_colors(3) == colors[:3]
    assert default_colors(0) == []


def _expect_refusal(path, match, header_too=True):
    """load_model refuses ``path`` naming it; so does read_header unless only the weights are wrong."""
    with pytest.raises(ModelFileError, match=match) as info:
        load_model(path)
    assert str(path) in str(info.value)
    if header_too:
        with pytest.raises(ModelFileError, match=match):
            read_header(path)


def test_refuses_a_missing_file(tmp_path):
    _expect_refusal(tmp_path / "nothing.safetensors", "does not exist")


def test_refuses_a_device_or_a_pipe_without_reading_it(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.safetensors")  # reading it would block for ever
    for path in (tmp_path / "pipe.safetensors", Path("/dev/zero"), tmp_path):
        _expect_refusal(path, "is not a file")


def test_refuses_a_pickle_without_unpickling_it(tmp_path):
    path = tmp_path / "model.safetensors"

    class Bomb:
        def __reduce__(self):
            return (pytest.fail, ("the pickle was loaded",))

    with open(path, "wb") as file:
        pickle.dump({"weights": Bomb()}, file)
    _expect_refusal(path, "pickle")


def test_refuses_a_torch_save_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(_networks()[0].state_dict(), path)
    _expect_refusal(path, "torch.save")


RANDOM = np.random.default_rng(0).bytes(4096)


@pytest.mark.parametrize("data", [b"", b"abc", RANDOM, b"\x08" + b"\0" * 7 + b"{}"])
def test_refuses_random_bytes(tmp_path, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    _expect_refusal(path, "not an ISDNet model file")


def test_refuses_a_truncated_file(saved, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(saved[0].read_bytes()[:-100])
    _expect_refusal(path, "damaged or incomplete")


def _rewrite(path, header=None, tensors=None, metadata=None):
    """A copy of ``path`` at ``path.with_suffix('.bad')`` with a replaced header, tensors or raw metadata."""
    original = safetensors.torch.load_file(path)
    if metadata is None:
        metadata = {METADATA_KEY: json.dumps(header if header is not None else read_header(path))}
    out = path.with_suffix(".bad")
    out.write_bytes(safetensors.torch.save(tensors if tensors is not None else original, metadata=metadata))
    return out


def test_refuses_a_safetensors_file_without_isdnet_header(saved):
    _expect_refusal(_rewrite(saved[0], metadata={"other": "x"}), "no ISDNet header")


def test_refuses_invalid_header_json(saved):
    _expect_refusal(_rewrite(saved[0], metadata={METADATA_KEY: "{not json"}), "not valid JSON")


@pytest.mark.parametrize("field, value, match", [
    (("classes", 1, "color"), [300, 0, 0], r"classes\[1\]\.color"),
    (("geometry", "slice_axis"), "diagonal", r"geometry\.slice_axis"),
    (("provenance",), {"method": "x"}, "provenance"),
    (("provenance", "created"), "yesterday", "ISO-8601"),
    (("classes", 2, "value"), 1, "class value twice"),
    (("architecture", "segmenter", "num_classes"), 4, "lists 3 classes but the segmenter predicts 4"),
])
def test_refuses_header_schema_violations_naming_the_field(saved, field, value, match):
    header = copy.deepcopy(saved[1])
    target = header
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    _expect_refusal(_rewrite(saved[0], header=header), match)
    with pytest.raises(ModelFileError, match=match):
        save_model(saved[0].parent / "other.safetensors", header, saved[2], saved[3])


@pytest.mark.parametrize("part, option, value, match", [
    ("segmenter", "groups", 0, r"architecture\.segmenter\.groups is invalid: 0 is less than the minimum of 1"),
    ("segmenter", "base_channels", 10**6, r"architecture\.segmenter\.base_channels .* greater than the maximum"),
    ("segmenter", "depth", 60, r"architecture\.segmenter\.depth .* greater than the maximum"),
    ("segmenter", "base_channels", -4, r"architecture\.segmenter\.base_channels .* less than the minimum"),
    ("segmenter", "in_channels", 2, r"architecture\.segmenter\.in_channels is invalid: 1 was expected"),
    ("segmenter", "depth", 2.5, r"architecture\.segmenter\.depth is invalid: 2\.5 is not of type 'integer'"),
    ("segmenter", "widths", [1], r"architecture\.segmenter is invalid: Additional properties .*'widths'"),
    ("confidence", "output_stride", 3, r"architecture\.confidence"),
    ("confidence", "base_channels", 0, r"architecture\.confidence"),
])
def test_refuses_network_options_out_of_bounds_before_building_anything(saved, part, option, value, match):
    """Each network option is bounded in the schema, so no header gets as far as building a network with them (a
    ZeroDivisionError, a 36 TB allocation, a RuntimeError at run time). The bounds live with the network classes
    (torch), so the torch-free ``read_header``, which only shows a model, does not apply them."""
    header = copy.deepcopy(saved[1])
    header["architecture"][part][option] = value
    _expect_refusal(_rewrite(saved[0], header=header), match, header_too=False)


@pytest.mark.parametrize("metadata, match", [
    ('{"format": "isdnet-model", "normalisation": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested deeper"),
    ('{"format": "isdnet-model", "normalisation": ' + '{"a": ' * 40 + "0" + "}" * 40 + "}", "nested deeper"),
    ("NaN", "NaN, which is not a number JSON allows"),
])
def test_refuses_deep_nesting_and_non_finite_numbers(saved, metadata, match):
    _expect_refusal(_rewrite(saved[0], metadata={METADATA_KEY: metadata}), match)
    header = copy.deepcopy(saved[1])
    header["geometry"]["spacing"] = [float("inf"), 1.0]  # json.dumps writes Infinity, which JSON does not allow
    _expect_refusal(_rewrite(saved[0], metadata={METADATA_KEY: json.dumps(header)}), "Infinity")


def test_weights_are_checked_against_the_header_before_any_network_is_built(saved, monkeypatch):
    """A header within the bounds whose networks would need far more memory than its weights: refused on the
    weights' shapes, which the file's table gives, before building anything; and a model too large for the free
    memory is refused from its table before any weight is read."""
    import isdnet.modelfile as modelfile

    def no_building(description, device=None):
        assert device == "meta", "a network was built before the weights were checked"
        return real_build(description, device)

    real_build = modelfile.build_network
    monkeypatch.setattr(modelfile, "build_network", no_building)
    header = copy.deepcopy(saved[1])
    header["architecture"]["segmenter"].update(base_channels=256, depth=7)
    _expect_refusal(_rewrite(saved[0], header=header), "segmenter.encoders.0.0.weight has shape", header_too=False)
    monkeypatch.setenv("ISDNET_AVAILABLE_MEMORY", "1000")
    with pytest.raises(InputError, match="model.safetensors: needs about .* of memory but only .* a smaller model"):
        load_model(saved[0])


def test_refuses_an_unknown_format_version(saved):
    header = dict(saved[1], format_version=99)
    _expect_refusal(_rewrite(saved[0], header=header), "version 99.*reads format version 1")


def test_refuses_weights_that_do_not_match_the_architecture(saved):
    tensors = safetensors.torch.load_file(saved[0])
    tensors["segmenter.head.weight"] = torch.zeros(5, 4, 1, 1)
    _expect_refusal(_rewrite(saved[0], tensors=tensors), r"segmenter\.head\.weight has shape \(5, 4, 1, 1\)",
                    header_too=False)
    tensors = safetensors.torch.load_file(saved[0])
    del tensors["confidence.body.0.bias"]
    _expect_refusal(_rewrite(saved[0], tensors=tensors), r"confidence\.body\.0\.bias is missing", False)
    tensors = safetensors.torch.load_file(saved[0])
    tensors["segmenter.extra"] = torch.zeros(1)
    _expect_refusal(_rewrite(saved[0], tensors=tensors), "segmenter.extra is not part of the architecture",
                    False)


def test_refuses_non_finite_weights_in_a_file(saved):
    tensors = safetensors.torch.load_file(saved[0])
    tensors["segmenter.head.bias"][0] = float("inf")
    _expect_refusal(_rewrite(saved[0], tensors=tensors), r"segmenter\.head\.bias contains NaN or infinite",
                    False)


def test_failed_save_leaves_the_previous_file_unchanged(saved):
    path, header, segmenter, confidence = saved
    before = path.read_bytes()
    with torch.no_grad():
        segmenter.head.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ModelFileError, match="NaN"):
        save_model(path, header, segmenter, confidence)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]


def test_save_replaces_an_existing_file_and_leaves_no_temporary_files(saved):
    path, header, segmenter, confidence = saved
    with torch.no_grad():
        segmenter.head.bias.fill_(0.5)
    save_model(path, header, segmenter, confidence)
    assert torch.equal(load_model(path).segmenter.head.bias, torch.full((3,), 0.5))
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]


def test_save_refuses_confidence_weights_without_architecture(tmp_path):
    segmenter, confidence = _networks()
    with pytest.raises(ValueError, match="confidence"):
        save_model(tmp_path / "m.safetensors", _header(segmenter), segmenter, confidence)
    assert not list(tmp_path.iterdir())
