"""Dataset folders and cases (isdnet.dataset): Decathlon and nnU-Net v2 layouts, listed files, labeled splits."""

from __future__ import annotations

import json
import locale
from pathlib import Path

import pytest
from volume_helpers import (
    HIPPOCAMPUS,
    phantom,
    write,
)

from isdnet.dataset import Case, case_name, cases_from_files, load_dataset, split_labeled, unlabeled_cases
from isdnet.errors import InputError

# ----------------------------------------------------------------------------------------------------------
# dataset folders


def decathlon_folder(root: Path, n: int = 3, extra: dict | None = None) -> Path:
    image, label = phantom(size_xyz=(8, 8, 4))
    training = []
    for i in range(n):
        write(image, root / "imagesTr" / f"case_{i}.nii.gz")
        write(label, root / "labelsTr" / f"case_{i}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    meta = {"labels": {"0": "background", "1": "left", "2": "right"}, "training": training, **(extra or {})}
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def test_decathlon_dataset_with_unlabeled_list(tmp_path):
    image, _ = phantom(size_xyz=(8, 8, 4))
    write(image, tmp_path / "imagesUn" / "u1.nrrd")
    write(image, tmp_path / "imagesUn" / "u2.mha")
    extra = {"unlabeled": ["imagesUn/u1.nrrd", {"image": "./imagesUn/u2.mha"}], "colors": {"1": [255, 0, 0]}}
    root = decathlon_folder(tmp_path, extra=extra)
    spec = load_dataset(root)
    assert spec.labels == {0: "background", 1: "left", 2: "right"}
    assert [c.name for c in spec.cases] == ["case_0", "case_1", "case_2"]
    assert spec.cases[1].image == tmp_path / "imagesTr" / "case_1.nii.gz"
    assert spec.cases[1].label == tmp_path / "labelsTr" / "case_1.nii.gz"
    assert [(c.name, c.image.name, c.label) for c in spec.unlabeled] == [("u1", "u1.nrrd", None),
                                                                        ("u2", "u2.mha", None)]
    assert spec.colors == {1: [255, 0, 0]}


def test_non_ascii_names_load_under_the_c_locale_slicer_sets(tmp_path):
    # VTK and Qt set the C locale in Slicer (slicer-core too), which makes Python's default text encoding ASCII;
    # Windows' is cp1252. Every text file is read and written as UTF-8 all the same.
    root = decathlon_folder(tmp_path)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta["labels"] = {"0": "background", "1": "Cornu ammonis – vorn", "2": "Hippocampus hinten (ä)"}
    (root / "dataset.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert locale.getpreferredencoding(False) != "UTF-8"
        spec = load_dataset(root)
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)
    assert spec.labels == {0: "background", 1: "Cornu ammonis – vorn", 2: "Hippocampus hinten (ä)"}


def test_nnunet_v2_dataset(tmp_path):
    image, label = phantom(size_xyz=(8, 8, 4))
    for name in ("liver_7", "liver_3"):
        write(image, tmp_path / "imagesTr" / f"{name}_0000.nrrd")
        write(label, tmp_path / "labelsTr" / f"{name}.nrrd")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
            "numTraining": 2, "file_ending": ".nrrd"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    spec = load_dataset(tmp_path)
    assert spec.labels == {0: "background", 1: "liver", 2: "tumour"}
    assert [(c.name, c.image.name, c.label.name) for c in spec.cases] == [
        ("liver_3", "liver_3_0000.nrrd", "liver_3.nrrd"), ("liver_7", "liver_7_0000.nrrd", "liver_7.nrrd")]
    assert spec.unlabeled == []


@pytest.mark.skipif(not (HIPPOCAMPUS / "dataset.json").is_file(), reason="the hippocampus dataset is absent")
def test_hippocampus_dataset():
    spec = load_dataset(HIPPOCAMPUS)
    assert len(spec.cases) == 260
    assert set(spec.labels) == {0, 1, 2}
    assert spec.cases[0].name == "hippocampus_001"
    assert all(c.label is not None and c.label.is_file() for c in spec.cases)


@pytest.mark.parametrize("name, expected", [
    ("a/b/liver_12_0000.nii.gz", "liver_12"), ("x.seg.nrrd", "x"), ("x.nii", "x"), ("scan.MHA", "scan"),
    ("scan.mhd", "scan"), ("scan.nrrd", "scan"), ("case_0001.nii.gz", "case_0001")])
def test_case_names(name, expected):
    assert case_name(name) == expected


@pytest.mark.parametrize("mutate, problem", [
    (lambda root: (root / "dataset.json").unlink(), "is missing"),
    (lambda root: (root / "dataset.json").write_text("{\"labels\": ", encoding="utf-8"), "is not valid JSON"),
    (lambda root: _edit(root, labels={}), "lists no labels"),
    (lambda root: _edit(root, labels={"1": "left", "2": "right"}), "has no label 0"),
    (lambda root: _edit(root, training=[{"image": "../outside.nii.gz", "label": "./labelsTr/case_0.nii.gz"}]),
     "outside the dataset folder"),
    (lambda root: _edit(root, training=[{"image": "/etc/passwd", "label": "./labelsTr/case_0.nii.gz"}]),
     "outside the dataset folder"),
    (lambda root: _edit(root, unlabeled=["imagesTr/../../x.nii.gz"]), "outside the dataset folder"),
    (lambda root: _edit(root, terminology={"9": "SCT^1^x"}), "not a listed label value"),
    (lambda root: _edit(root, terminology={"1": 3}), "must map label values to terminology entry strings"),
])
def test_dataset_json_errors(tmp_path, mutate, problem):
    root = decathlon_folder(tmp_path / "ds", n=1)
    (tmp_path / "outside.nii.gz").write_bytes(b"x")
    mutate(root)
    with pytest.raises(InputError, match=problem) as info:
        load_dataset(root)
    assert "dataset.json" in str(info.value)


@pytest.mark.parametrize("layout", ["decathlon", "nnunet"])
@pytest.mark.parametrize("data_file", ["../../../etc/passwd", "/dev/zero", "../../outside.raw", "LIST\n../../x.raw",
                                       "../../%d.raw 1 2 1"])
def test_detached_data_outside_the_dataset_is_refused(tmp_path, layout, data_file):
    """A header inside the dataset may not take its voxels from outside it, any more than a listed path may."""
    image, label = phantom(size_xyz=(8, 8, 4))
    root = tmp_path / "ds"
    ending = ".nhdr"
    header = write(image, root / "imagesTr" / f"case_0{'_0000' if layout == 'nnunet' else ''}{ending}")
    write(label, root / "labelsTr" / f"case_0{ending}")
    meta = {"labels": {"0": "background", "1": "left", "2": "right"}}
    meta.update({"training": [{"image": f"./imagesTr/{header.name}", "label": f"./labelsTr/case_0{ending}"}]}
                if layout == "decathlon" else {"file_ending": ending})
    (root / "dataset.json").write_text(json.dumps(meta))
    assert load_dataset(root).cases[0].image == header  # its own data file, beside it, is fine
    header.write_text(header.read_text().replace(f"data file: {header.name[:-5]}.raw", f"data file: {data_file}"))
    with pytest.raises(InputError, match="outside the dataset folder") as info:
        load_dataset(root)
    assert str(info.value).startswith(str(header))


def _edit(root: Path, **changes) -> None:
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")


def test_dataset_listed_file_missing(tmp_path):
    root = decathlon_folder(tmp_path, n=2)
    (root / "labelsTr" / "case_1.nii.gz").unlink()
    with pytest.raises(InputError) as info:
        load_dataset(root)
    assert "case_1.nii.gz" in str(info.value)
    assert "listed in" in str(info.value) and "dataset.json" in str(info.value)
    assert "does not exist" in str(info.value)


def test_dataset_folder_missing(tmp_path):
    with pytest.raises(InputError, match="nowhere.*does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_cases_from_files_and_unlabeled_cases(tmp_path):
    image, label = phantom(size_xyz=(8, 8, 4))
    a, b = write(image, tmp_path / "a.nii.gz"), write(image, tmp_path / "b_0000.nrrd")
    la = write(label, tmp_path / "a.seg.nrrd")
    assert cases_from_files([a, b], [la, None]) == [Case("a", a, la), Case("b", b, None)]
    assert cases_from_files([a], None) == [Case("a", a, None)]
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        cases_from_files([a, b], [la])
    with pytest.raises(InputError, match="missing.nii.gz: does not exist"):
        cases_from_files([tmp_path / "missing.nii.gz"], None)
    folder = tmp_path / "unl"
    write(image, folder / "u2.nii.gz")
    write(image, folder / "u1.mha")
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    assert [c.name for c in unlabeled_cases([folder, a])] == ["u1", "u2", "a"]
    assert unlabeled_cases(None) == []


def test_split_labeled():
    cases = [Case(f"c{i}", Path(f"i{i}"), Path(f"l{i}")) for i in range(10)]
    labeled, unlabeled = split_labeled(cases, 0.3, seed=4)
    assert len(labeled) == 3 and len(unlabeled) == 7
    assert all(c.label is None for c in unlabeled)
    assert {c.name for c in labeled} | {c.name for c in unlabeled} == {c.name for c in cases}
    assert split_labeled(cases, 0.3, seed=4) == (labeled, unlabeled)
    assert split_labeled(cases, 0.3, seed=5)[0] != labeled
    assert len(split_labeled(cases, 0.01, seed=0)[0]) == 1
    assert split_labeled(cases, 1.0, seed=0) == (cases, [])
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            split_labeled(cases, bad, seed=0)
