"""`medseg predict` through the real CLI: geometry round trips, bad files in a batch, kill + --skip-existing."""

import json
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import torch
from PIL import Image

from medseg.engine.checkpoint import save_checkpoint
from medseg.nets import build_network

from .conftest import MEDSEG, run_medseg


def make_model(
    path: Path, spatial_dims: int, classes=("background", "cell", "border"), patch=None, seed=0, tta=False
) -> Path:
    """A checkpoint with the metadata prediction needs (random weights: geometry does not care)."""
    torch.manual_seed(seed)
    params = {"features": 4, "depth": 2}
    model = build_network("unet", params, spatial_dims=spatial_dims, in_channels=1, num_classes=len(classes))
    meta = {
        "format": "medseg-model-v1",
        "model": {"name": "unet", "params": params},
        "spatial_dims": spatial_dims,
        "in_channels": 1,
        "classes": {c: i for i, c in enumerate(classes)},
        "label_kind": "instance" if "border" in classes else "semantic",
        "instance_to_semantic": "cell_border",
        "normalize": {"mode": "zscore", "lower": 1.0, "upper": 99.8, "window": [-1000.0, 400.0],
                      "per_channel": True, "nonzero": False},
        "patch_size": patch or ([32, 32] if spatial_dims == 2 else [16, 16, 16]),
        "spacing": None,
        "inference": {"overlap": 0.25, "sw_batch_size": 2, "tta": tta, "cell_class": 1, "border_class": 2,
                      "min_instance_size": 4},
    }
    return save_checkpoint(path, {"model": model.state_dict(), "metadata": meta, "epoch": 1})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {2: make_model(root / "m2.pt", 2), 3: make_model(root / "m3.pt", 3, ("background", "lesion"))}


def _oblique_affine() -> np.ndarray:
    a, b = np.deg2rad(17), np.deg2rad(-8)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([0.7, 0.9, 2.5])
    aff[:3, 3] = [-40.5, 12.25, 88.0]
    return aff


def test_geometry_round_trip_nifti_and_mha(models, tmp_path):
    rng = np.random.default_rng(0)
    inp = tmp_path / "in"
    inp.mkdir()
    vol = rng.normal(size=(21, 19, 13)).astype(np.float32)
    img = nib.Nifti1Image(vol, _oblique_affine())
    img.header.set_qform(_oblique_affine(), code=1)
    img.header.set_sform(_oblique_affine(), code=2)
    nib.save(img, inp / "oblique.nii.gz")
    mha = sitk.GetImageFromArray(vol.transpose(2, 1, 0))
    mha.SetSpacing((0.8, 1.1, 3.0))
    mha.SetOrigin((5.0, -7.5, 30.0))
    rot = sitk.VersorTransform((0.2, 0.4, 0.1), 0.6).GetMatrix()
    mha.SetDirection(rot)
    sitk.WriteImage(mha, str(inp / "direction.mha"))

    out = tmp_path / "out"
    run_medseg("predict", "--model", models[3], "--input", inp, "--output", out)
    pred = nib.load(out / "oblique.nii.gz")
    assert pred.shape == vol.shape
    np.testing.assert_allclose(pred.affine, _oblique_affine(), atol=1e-4)
    assert int(pred.header["qform_code"]) == 1 and int(pred.header["sform_code"]) == 2
    assert np.issubdtype(pred.get_data_dtype(), np.integer)
    got = sitk.ReadImage(str(out / "direction.mha"))
    assert got.GetSize() == mha.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), mha.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(got.GetOrigin(), mha.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), mha.GetDirection(), atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {c["status"] for c in manifest["cases"]} == {"ok"}


def test_geometry_round_trip_png_and_tiff_with_instances(models, tmp_path):
    rng = np.random.default_rng(1)
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(rng.integers(0, 255, size=(45, 61), dtype=np.uint8)).save(inp / "a.png")
    tifffile.imwrite(inp / "b.tif", rng.integers(0, 4000, size=(37, 52), dtype=np.uint16))
    out = tmp_path / "out"
    run_medseg("predict", "--model", models[2], "--input", inp, "--output", out, "--instances",
               "--save-probabilities")
    assert np.asarray(Image.open(out / "a.png")).shape == (45, 61)
    assert tifffile.imread(out / "b.tif").shape == (37, 52)
    assert tifffile.imread(out / "b_instances.tif").shape == (37, 52)
    probs = np.load(out / "a_probabilities.npz")["probabilities"]
    assert probs.dtype == np.float16 and probs.shape[0] == 3


def test_a_bad_scan_fails_alone(models, tmp_path):
    rng = np.random.default_rng(2)
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("good1", "good2"):
        tifffile.imwrite(inp / f"{name}.tif", rng.integers(0, 255, size=(40, 40), dtype=np.uint8))
    (inp / "corrupt.tif").write_bytes(b"II*\x00 definitely not a tiff")
    (inp / "empty.png").write_bytes(b"")
    tifffile.imwrite(inp / "rgb.tif", rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8))  # 3 channels != 1
    (inp / "._good1.tif").write_bytes(b"mac resource fork")
    (inp / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    res = run_medseg("predict", "--model", models[2], "--input", inp, "--output", out, check=False)
    assert res.returncode == 1
    assert (out / "good1.tif").is_file() and (out / "good2.tif").is_file()
    cases = {Path(c["input"]).name: c for c in json.loads((out / "manifest.json").read_text())["cases"]}
    assert set(cases) == {"good1.tif", "good2.tif", "corrupt.tif", "empty.png", "rgb.tif"}
    for bad in ("corrupt.tif", "empty.png", "rgb.tif"):
        assert cases[bad]["status"] == "failed" and cases[bad]["error"], bad
        assert f"FAILED {inp / bad}" in res.stdout
    assert "._good1.tif" in res.stdout and "notes.txt" in res.stdout  # listed as skipped


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: np.asarray(nib.load(p).dataobj).tobytes() for p in sorted(folder.glob("*.nii.gz"))}


def test_kill_mid_batch_then_skip_existing_matches_a_clean_run(models, tmp_path):
    rng = np.random.default_rng(3)
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(10):
        nib.save(nib.Nifti1Image(rng.normal(size=(40, 40, 24)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])),
                 inp / f"case{i:02d}.nii.gz")
    clean = tmp_path / "clean"
    run_medseg("predict", "--model", models[3], "--input", inp, "--output", clean)

    out = tmp_path / "killed"
    proc = subprocess.Popen([MEDSEG, "predict", "--model", str(models[3]), "--input", str(inp), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(out.glob("*.nii.gz"))) < 2:
        assert proc.poll() is None, "the batch finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("*.nii.gz")))
    assert done_before < 10
    res = run_medseg("predict", "--model", models[3], "--input", inp, "--output", out, "--skip-existing")
    assert f"skipped {done_before}" in res.stdout
    assert _outputs(out) == _outputs(clean)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left visible or hidden


def test_model_errors_are_clear(tmp_path):
    res = run_medseg("predict", "--model", tmp_path / "nope.pt", "--input", tmp_path, "--output", tmp_path / "o",
                     check=False)
    assert res.returncode == 2 and "nope.pt" in res.stderr and "Traceback" not in res.stderr


def test_the_models_tta_setting_is_the_default_and_the_flag_overrides_it(tmp_path):
    # Two models with the same random weights, one saved with inference.tta true. Random weights are not
    # flip-equivariant, so mirrored averaging changes the probabilities.
    inp = tmp_path / "in"
    inp.mkdir()
    tifffile.imwrite(inp / "a.tif", np.random.default_rng(2).normal(size=(29, 23)).astype(np.float32))

    def probabilities(tta: bool, *flags: str) -> np.ndarray:
        out = tmp_path / f"out_{tta}_{flags}"
        run_medseg("predict", "--model", make_model(tmp_path / f"tta_{tta}.pt", 2, tta=tta), "--input", inp,
                   "--output", out, "--save-probabilities", *flags)
        return np.load(out / "a_probabilities.npz")["probabilities"]

    by_default = probabilities(True)
    np.testing.assert_array_equal(by_default, probabilities(False, "--tta"))  # TTA on: the model's default
    plain = probabilities(True, "--no-tta")  # and the flag overrides it
    assert np.abs(by_default.astype(np.float32) - plain).max() > 1e-3
