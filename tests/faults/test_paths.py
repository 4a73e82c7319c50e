"""Row 4 of the fault matrix (issue 10): nothing outside the dataset root is read, nothing outside --output is
written.

A dataset.json entry (image, label, or a ``_0000`` channel found for a listed image) that resolves outside the
dataset folder -- ``../``, an absolute path, or a symlink leading out -- is an error naming the entry, for
`check` and for `train`, and the outside file is never opened: it holds junk bytes, so reading it would add a
"cannot read" problem to the report.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import assert_clean_failure, blob_case, make_dataset, run_medseg, save_nifti, tiny_config


def _escape(data, how: str, outside):
    spec = json.loads((data / "dataset.json").read_text())
    (outside / "x_0000.nii.gz").write_bytes(b"junk, not an image")
    (outside / "x.nii.gz").write_bytes(b"junk, not an image")
    if how == "dotdot":
        spec["training"][0]["image"] = "../outside/x.nii.gz"  # found through its _0000 channel file
        entry = "../outside/x.nii.gz"
    elif how == "absolute":
        spec["training"][0]["label"] = str(outside / "x.nii.gz")
        entry = str(outside / "x.nii.gz")
    else:  # a symlink inside imagesTr pointing out of the dataset
        (data / "imagesTr" / "link_0000.nii.gz").symlink_to(outside / "x_0000.nii.gz")
        spec["training"][0]["image"] = "imagesTr/link.nii.gz"
        entry = "imagesTr/link.nii.gz"
    (data / "dataset.json").write_text(json.dumps(spec))
    return entry


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_dataset_entries_cannot_leave_the_root(tmp_path, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    data = make_dataset(tmp_path / "data", n=2)
    entry = _escape(data, how, outside)
    res = run_medseg("check", data, check=False)
    text = assert_clean_failure(res, 1, entry, "outside the dataset folder")
    assert "cannot read" not in text  # refused by path, never opened
    res = run_medseg("train", tiny_config(tmp_path, data), check=False)
    text = assert_clean_failure(res, 2, entry, "outside the dataset folder")
    assert "cannot read" not in text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_predict_writes_only_under_output(trained, tmp_path):
    """Output names come from the input's base name only; a symlink planted in --output is replaced, never
    followed, so its target outside is untouched."""
    inp, out, victim = tmp_path / "in", tmp_path / "out", tmp_path / "victim.nii.gz"
    inp.mkdir()
    out.mkdir()
    victim.write_bytes(b"precious")
    image, _ = blob_case(np.random.default_rng(2))
    save_nifti(inp / "a..b.nii.gz", image)
    save_nifti(inp / "c.nii.gz", image)
    (out / "c.nii.gz").symlink_to(victim)
    before = set(tmp_path.rglob("*"))
    run_medseg("predict", "--model", trained["model"], "--input", str(inp / "..") + "/in/", "--output", out)
    new = set(tmp_path.rglob("*")) - before
    assert new and all(p.is_relative_to(out) for p in new), new
    assert victim.read_bytes() == b"precious"
    assert (out / "c.nii.gz").is_file() and not (out / "c.nii.gz").is_symlink()
    assert (out / "a..b.nii.gz").is_file()
