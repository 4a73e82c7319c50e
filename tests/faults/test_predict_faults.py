"""`medseg predict` under bad scans, models and folders (issue 10 rows 2, 5, 6, 7, 8, 9, 13 and the rows already
handled: one bad case in a batch, malicious and truncated checkpoints). Every bad case fails alone and says why;
the good case of the same batch is written and intact."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.engine.checkpoint import load_checkpoint, save_checkpoint

from .conftest import SHAPE, assert_clean_failure, blob_case, run_medseg, save_nifti


def _good(folder: Path) -> np.ndarray:
    image, _ = blob_case(np.random.default_rng(11))
    save_nifti(folder / "good.nii.gz", image)
    return image


def _cases(out: Path) -> dict[str, dict]:
    return {c["case"]: c for c in json.loads((out / "manifest.json").read_text())["cases"]}


def _predict(model, inp, out, *extra, code=1):
    return run_medseg("predict", "--model", model, "--input", inp, "--output", out, *extra, check=False)


def _assert_good_written(out: Path, reference: Path | None = None):
    got = nib.load(out / "good.nii.gz")
    assert got.shape == SHAPE and _cases(out)["good"]["status"] == "ok"
    if reference is not None:
        assert np.array_equal(np.asarray(got.dataobj), np.asarray(nib.load(reference).dataobj))


@pytest.fixture(scope="module")
def clean_good(trained, tmp_path_factory):
    """The good scan predicted alone: every batch below must write exactly this for it."""
    root = tmp_path_factory.mktemp("clean")
    _good(root / "in")
    run_medseg("predict", "--model", trained["model"], "--input", root / "in", "--output", root / "out")
    return root / "out" / "good.nii.gz"


def test_nonfinite_voxels_fail_the_case(trained, clean_good, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _good(inp)
    image, _ = blob_case(np.random.default_rng(4))
    image.flat[[3, 50, 700]] = np.nan
    image.flat[[9, 90]] = [np.inf, -np.inf]
    save_nifti(inp / "holes.nii.gz", image)
    res = _predict(trained["model"], inp, out)
    assert_clean_failure(res, 1, "holes.nii.gz", "3 NaN and 2 Inf voxels", "--nonfinite replace")
    assert not (out / "holes.nii.gz").exists()
    _assert_good_written(out, clean_good)

    res = _predict(trained["model"], inp, tmp_path / "replaced", "--nonfinite", "replace")
    assert res.returncode == 0, res.stdout + res.stderr
    cases = _cases(tmp_path / "replaced")
    assert cases["holes"]["status"] == "ok" and "3 NaN and 2 Inf voxels replaced" in cases["holes"]["warning"]
    assert cases["good"]["warning"] == ""
    assert nib.load(tmp_path / "replaced" / "holes.nii.gz").shape == SHAPE


def _truncated_gzip(folder: Path) -> Path:
    image, _ = blob_case(np.random.default_rng(5))
    path = save_nifti(folder / "truncated.nii.gz", image)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_unreadable_scans_say_why(trained, clean_good, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _good(inp)
    _truncated_gzip(inp)
    (inp / "junk.nii.gz").write_bytes(b"\x00junk bytes, not an image" * 20)
    (inp / "junk.nii").write_bytes(b"\x00junk bytes, not an image" * 20)
    (inp / "junk.mha").write_bytes(b"junk bytes, not an image" * 20)
    (inp / "junk.tif").write_bytes(b"II*\x00 definitely not a tiff")
    res = _predict(trained["model"], inp, out)
    text = assert_clean_failure(res, 1, "truncated.nii.gz", "truncated gzip", "junk.nii.gz", "not a gzip file",
                                "junk.nii", "junk.mha", "junk.tif")
    for noise in ("applying transform", "unable to load", "object at 0x"):
        assert noise not in text
    cases = _cases(out)
    for name in ("truncated", "junk"):
        assert cases[name]["status"] == "failed" and cases[name]["error"]
    for line in text.splitlines():
        if line.startswith("FAILED"):
            assert line.count(":") >= 2 and not line.rstrip().endswith(":"), line  # a reason after the name
    _assert_good_written(out, clean_good)


def test_channel_count_mismatch_names_the_file(trained, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _good(inp)
    image, _ = blob_case(np.random.default_rng(6))
    save_nifti(inp / "two.nii.gz", np.stack([image, image], axis=-1))  # a 4D NIfTI with 2 volumes
    res = _predict(trained["model"], inp, out)
    assert_clean_failure(res, 1, "two.nii.gz", "model expects 1 channel", "has 2", "4D NIfTI with 2 volumes")
    assert "conv" not in res.stdout + res.stderr
    _assert_good_written(out)


def test_header_claiming_a_huge_image_is_refused_before_allocating(trained, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    _good(inp)
    header = nib.Nifti1Header()
    header.set_data_shape((10000, 10000, 10000))
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), code=1)
    with gzip.open(inp / "huge.nii.gz", "wb") as f:
        f.write(header.binaryblock + b"\x00" * 4 + b"\x00" * 1024)
    res = _predict(trained["model"], inp, out)
    assert_clean_failure(res, 1, "huge.nii.gz", "10000x10000x10000", "3.6 TiB")
    assert "MemoryError" not in res.stdout + res.stderr
    _assert_good_written(out)


def _mismatched(trained, tmp_path: Path, **model) -> Path:
    state = load_checkpoint(trained["model"])
    state.pop("format")
    meta = state["metadata"]
    state["metadata"] = {**meta, "model": {**meta["model"], **model}}
    return save_checkpoint(tmp_path / "mismatched.pt", state)


@pytest.mark.parametrize("model", [{"params": {"features": 8, "depth": 2}}, {"name": "segnet"}])
def test_checkpoint_weights_that_do_not_fit_its_metadata(trained, tmp_path, model):
    inp = tmp_path / "in"
    _good(inp)
    ckpt = _mismatched(trained, tmp_path, **model)
    res = _predict(ckpt, inp, tmp_path / "out")
    text = assert_clean_failure(res, 2, "mismatched.pt", "do not fit")
    assert len([line for line in text.splitlines() if "error" in line]) == 1, text
    assert "size mismatch" in text or "missing" in text or "unexpected" in text


def test_malicious_and_truncated_checkpoints_are_refused(trained, tmp_path):
    """Already handled: a pickle that would run code is never executed; a truncated file is named."""
    inp = tmp_path / "in"
    _good(inp)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Evil()}))
    torch.save({"x": Evil()}, tmp_path / "evil_zip.pt")
    for ckpt in (evil, tmp_path / "evil_zip.pt"):
        res = _predict(ckpt, inp, tmp_path / "out")
        assert_clean_failure(res, 2, ckpt.name, "cannot be loaded safely")
    assert not marker.exists()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(trained["model"]).read_bytes()[:5000])
    assert_clean_failure(_predict(truncated, inp, tmp_path / "out"), 2, "truncated.pt", "truncated or corrupt")


def _unwritable_outputs(tmp_path: Path) -> list[Path]:
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    outs = [blocker / "out"]
    if os.geteuid() != 0:  # root writes through permission bits: only a non-root run can test them
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        outs.append(locked)
    return outs


def test_unwritable_output_folder_fails_before_compute(trained, tmp_path):
    inp = tmp_path / "in"
    _good(inp)
    for out in _unwritable_outputs(tmp_path):
        res = _predict(trained["model"], inp, out)
        text = assert_clean_failure(res, 2, str(out), "cannot write")
        assert "memory estimate" not in text and "predicted" not in text  # nothing was computed


def test_stale_temporaries_of_a_killed_run_are_removed(trained, tmp_path):
    """What a run killed while writing leaves (the atomic writes' hidden folders, a half-written probability
    file) is removed by the next run; files that are not ours stay."""
    inp, out = tmp_path / "in", tmp_path / "out"
    _good(inp)
    out.mkdir()
    (out / ".good.nii.gz.abc123.tmp").mkdir()
    (out / ".good.nii.gz.abc123.tmp" / "good.nii.gz").write_bytes(b"half")
    (out / "good_probabilities.tmp.npz").write_bytes(b"half")
    (out / ".good_probabilities.npz.4242.tmp").write_bytes(b"half")
    (out / ".manifest.json.4242.tmp").write_bytes(b"half")
    (out / "notes.tmp.txt").write_text("the user's own file")
    (out / ".hidden_user_file").write_text("also the user's")
    res = _predict(trained["model"], inp, out, "--save-probabilities")
    assert res.returncode == 0, res.stdout + res.stderr
    left = sorted(p.name for p in out.iterdir())
    assert left == [".hidden_user_file", "good.nii.gz", "good_probabilities.npz", "manifest.csv", "manifest.json",
                    "notes.tmp.txt"], left


def test_compression_level_keeps_the_labels_and_a_bad_level_is_refused(trained, clean_good, tmp_path):
    inp = tmp_path / "in"
    _good(inp)
    _predict(trained["model"], inp, tmp_path / "stored", "--compression-level", "0")
    _assert_good_written(tmp_path / "stored", clean_good)
    assert (tmp_path / "stored" / "good.nii.gz").stat().st_size > clean_good.stat().st_size  # level 0: stored
    res = _predict(trained["model"], inp, tmp_path / "bad", "--compression-level", "12")
    assert_clean_failure(res, 2, "--compression-level", "0 (stored) to 9")
