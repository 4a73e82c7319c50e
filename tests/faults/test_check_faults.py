"""`medseg check` on datasets with the faults `train` and `predict` would otherwise meet late (issue 10 rows 2, 6
and 14): each reported once, naming the file and the reason; the summary says whether training can start."""

from __future__ import annotations

import json

import numpy as np

from .conftest import assert_clean_failure, blob_case, make_dataset, run_medseg, save_nifti


def test_check_reports_nonfinite_voxels_and_channel_counts(tmp_path):
    data = make_dataset(tmp_path / "data", n=3)
    image, _ = blob_case(np.random.default_rng(1))
    save_nifti(data / "imagesTr" / "case1_0000.nii.gz", np.stack([image, image], axis=-1))
    image[0, 0, 0] = np.inf
    save_nifti(data / "imagesTr" / "case2_0000.nii.gz", image)
    res = run_medseg("check", data, check=False)
    text = assert_clean_failure(res, 1, "case1_0000.nii.gz", "2 channels (4D NIfTI with 2 volumes)",
                                "channel_names declares 1 (CT)", "case2_0000.nii.gz", "0 NaN and 1 Inf voxels",
                                "NOT ready to train")
    assert "case0_0000.nii.gz" not in text


def test_check_lists_hidden_files_and_other_endings_of_listed_cases(tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    (data / "imagesTr" / "._case0_0000.nii.gz").write_bytes(b"macOS resource fork")
    (data / "labelsTr" / ".DS_Store").write_bytes(b"finder")
    image, _ = blob_case(np.random.default_rng(2))
    save_nifti(data / "imagesTr" / "case1_0000.nii", image)  # beside case1_0000.nii.gz, which is listed
    res = run_medseg("check", data)
    out = res.stdout
    assert f"SKIPPED {data / 'imagesTr' / '._case0_0000.nii.gz'}" in out
    assert f"SKIPPED {data / 'labelsTr' / '.DS_Store'}" in out
    (line,) = [line for line in out.splitlines() if "case1_0000.nii " in line or "case1_0000.nii:" in line]
    assert line.startswith("WARNING") and "case1_0000.nii.gz" in line and "not used" in line
    assert "2 files skipped" in out and "-> ok" in out


def test_check_warns_when_every_label_is_background(tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    spec = json.loads((data / "dataset.json").read_text())
    for item in spec["training"]:
        save_nifti(data / item["label"], np.zeros((20, 20, 10), np.uint8))
    res = run_medseg("check", data)
    assert "WARNING" in res.stdout and "background only" in res.stdout and "Dice 0" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr
