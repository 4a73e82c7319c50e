"""Case discovery in both layouts, channel grouping, hidden files, and actionable dataset.json errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medseg.data.datalist import Case, discover, to_datalist
from medseg.errors import DataError
from tests.data.conftest import save_nifti


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 5), value, np.uint8)).save(path)
    return path


def _touch_junk(folder):
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "._a.png").write_bytes(b"\0")
    (folder / "notes.txt").write_text("not an image")


def test_folder_pairs_match_by_name_across_extensions(tmp_path):
    _png(tmp_path / "images/a.png")
    _png(tmp_path / "labels/a.tif")  # other extension on the label side
    _png(tmp_path / "images/b_0000.png")
    _png(tmp_path / "images/b_0001.png")
    _png(tmp_path / "labels/b.png")
    _png(tmp_path / "images/c_0001.png")  # its own label: not a channel of "c"
    _png(tmp_path / "labels/c_0001.png")
    _touch_junk(tmp_path / "images")

    info = discover(tmp_path)
    assert info.layout == "folders" and info.problems == []
    assert [c.name for c in info.cases] == ["a", "b", "c_0001"]
    a, b, _ = info.cases
    assert a.images == [tmp_path / "images/a.png"] and a.label == tmp_path / "labels/a.tif"
    assert b.images == [tmp_path / "images/b_0000.png", tmp_path / "images/b_0001.png"]
    assert {p.name for p in info.skipped} == {"._a.png", ".DS_Store", "notes.txt"}


def test_folders_without_labels_are_an_unlabelled_set(tmp_path):
    _png(tmp_path / "images/x_0001.png")
    info = discover(tmp_path)
    assert info.problems == [] and info.cases == [Case("x_0001", [tmp_path / "images/x_0001.png"], None)]


def test_folder_pairs_with_dataset_json_keys(tmp_path):
    _png(tmp_path / "images/cell.png")
    _png(tmp_path / "labels/cell.png")
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "cell": 1}, "label_kind": "instance"})
    )
    info = discover(tmp_path)
    assert (info.layout, info.label_kind, info.labels) == ("folders", "instance", {"background": 0, "cell": 1})
    assert [c.name for c in info.cases] == ["cell"]


def test_numtraining_mismatch_is_a_warning(nnunet_dataset):
    spec = json.loads((nnunet_dataset / "dataset.json").read_text())
    (nnunet_dataset / "dataset.json").write_text(json.dumps({**spec, "numTraining": 5}))
    (problem,) = discover(nnunet_dataset).problems
    assert problem.severity == "warning" and "numTraining is 5 but 3" in problem.message


def test_nnunet_scan_with_channels(nnunet_dataset):
    _touch_junk(nnunet_dataset / "imagesTr")
    info = discover(nnunet_dataset)
    assert info.layout == "msd" and info.problems == []
    assert [c.name for c in info.cases] == ["c1", "c2", "c3"]
    assert [p.name for p in info.cases[0].images] == ["c1_0000.nii.gz", "c1_0001.nii.gz"]
    assert info.cases[0].label == nnunet_dataset / "labelsTr/c1.nii.gz"
    assert [c.name for c in info.test_cases] == ["t1"] and info.test_cases[0].label is not None
    assert info.labels == {"background": 0, "edema": 1, "tumor": 2}
    assert info.channel_names == {"0": "T1", "1": "T2"}
    assert info.file_ending == ".nii.gz" and info.label_kind == "semantic"
    assert {p.name for p in info.skipped} == {".DS_Store", "._a.png", "notes.txt"}


def test_msd_training_list_with_id_to_name_labels(tmp_path):
    for name in ("BRATS_001", "BRATS_002"):
        save_nifti(tmp_path / f"imagesTr/{name}.nii.gz", np.zeros((4, 4, 3, 2), np.float32))  # channels inside
        save_nifti(tmp_path / f"labelsTr/{name}.nii.gz", np.zeros((4, 4, 3), np.uint8))
    save_nifti(tmp_path / "imagesTs/BRATS_100.nii.gz", np.zeros((4, 4, 3, 2), np.float32))
    save_nifti(tmp_path / "imagesTr/unlisted.nii.gz", np.zeros((4, 4, 3), np.float32))  # the list wins
    training = [
        {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in ("BRATS_001", "BRATS_002")
    ]
    spec = {
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema"},
        "training": training,
        "test": ["./imagesTs/BRATS_100.nii.gz"],
        "label_kind": "semantic",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    info = discover(tmp_path / "dataset.json")
    assert info.problems == []
    assert [c.name for c in info.cases] == ["BRATS_001", "BRATS_002"]
    assert info.labels == {"background": 0, "edema": 1} and info.channel_names == {"0": "FLAIR", "1": "T1w"}
    assert info.test_cases == [Case("BRATS_100", [tmp_path / "imagesTs/BRATS_100.nii.gz"], None)]


def test_nnunet_v1_list_resolves_channel_files(tmp_path):
    for ch in range(2):
        save_nifti(tmp_path / f"imagesTr/p1_{ch:04d}.nii.gz", np.zeros((3, 3, 3), np.float32))
    save_nifti(tmp_path / "labelsTr/p1.nii.gz", np.zeros((3, 3, 3), np.uint8))
    spec = {"modality": {"0": "a", "1": "b"}, "labels": {"0": "bg"},
            "training": [{"image": "./imagesTr/p1.nii.gz", "label": "./labelsTr/p1.nii.gz"}]}  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    (case,) = discover(tmp_path).cases
    assert [p.name for p in case.images] == ["p1_0000.nii.gz", "p1_0001.nii.gz"]


def test_instance_label_kind_and_file_ending(nnunet_dataset):
    spec = json.loads((nnunet_dataset / "dataset.json").read_text())
    (nnunet_dataset / "dataset.json").write_text(json.dumps({**spec, "label_kind": "instance"}))
    _png(nnunet_dataset / "imagesTr/c9_0000.png")  # another ending than file_ending: ignored, with a warning
    info = discover(nnunet_dataset)
    assert info.label_kind == "instance" and len(info.cases) == 3
    assert [(p.severity, p.path.endswith("c9_0000.png")) for p in info.problems] == [("warning", True)]


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"labels": {"background": "zero"}}, "labels.background"),
        ({"labels": {"whole": [1, 2]}}, "labels.whole"),
        ({"file_ending": "nii.gz"}, "file_ending"),
        ({"label_kind": "panoptic"}, "label_kind"),
        ({"channel_names": ["CT"]}, "channel_names"),
        ({"training": {"image": "x"}}, "training"),
        ({"training": [{"label": "x.nii.gz"}]}, "training[0]"),
    ],
)
def test_malformed_dataset_json_names_the_key(nnunet_dataset, patch, key):
    spec = json.loads((nnunet_dataset / "dataset.json").read_text())
    (nnunet_dataset / "dataset.json").write_text(json.dumps({**spec, **patch}))
    with pytest.raises(DataError) as err:
        discover(nnunet_dataset)
    assert f"dataset.json: {key}" in str(err.value)


def test_unusable_roots_raise(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no dataset layout"):
        discover(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(DataError, match="no dataset.json"):
        discover(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        discover(tmp_path)
    (tmp_path / "imagesTr").rmdir()
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(DataError, match="found neither"):
        discover(tmp_path)


def test_to_datalist(tmp_path):
    cases = [
        Case("a", [tmp_path / "a.png"], tmp_path / "la.png"),
        Case("b", [tmp_path / "b0.png", tmp_path / "b1.png"], None),
    ]
    assert to_datalist(cases) == [
        {"image": str(tmp_path / "a.png"), "label": str(tmp_path / "la.png"), "case": "a"},
        {"image": [str(tmp_path / "b0.png"), str(tmp_path / "b1.png")], "case": "b"},
    ]
