"""Rows 1 and 3 of the fault matrix (issue 10), and the geometry rows already handled (MHA/NRRD).

Row 1: a NIfTI whose qform and sform differ (and a sheared sform, which no qform can hold) must come back from
`medseg predict` with the input's sform and qform, each with its code, to 1e-6 -- also when the model resamples
to its own spacing (``data.spacing``) and prediction inverts that.
Row 3: zero spacing or a degenerate affine is reported by `check` and fails the case in `predict` before any
compute, naming the file; the other cases of the batch are written.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from .conftest import SHAPE, assert_clean_failure, blob_case, make_dataset, run_medseg, save_nifti


def _rotation(a: float, b: float) -> np.ndarray:
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _affine(linear: np.ndarray, origin) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = linear
    aff[:3, 3] = origin
    return aff


def _write_two_forms(path, qform, qcode, sform, scode):
    image, _ = blob_case(np.random.default_rng(7))
    img = nib.Nifti1Image(image, sform)
    img.header.set_qform(qform, code=qcode)
    img.header.set_sform(sform, code=scode)
    nib.save(img, path)
    return nib.load(path).header


CASES = {
    # qform (scanner, code 1) and sform (aligned to a template, code 2) 100+ mm apart
    "apart": (_affine(_rotation(0.3, -0.1) @ np.diag([0.9, 0.8, 2.0]), [-40.5, 12.25, 88.0]), 1,
              _affine(_rotation(-0.2, 0.15) @ np.diag([0.9, 0.8, 2.0]), [60.0, -80.0, 10.0]), 2),
    # a sheared sform: a qform cannot hold shear, so only the sform keeps it
    "sheared": (_affine(np.diag([1.0, 1.0, 2.0]), [1.0, 2.0, 3.0]), 1,
                _affine(np.array([[1.0, 0.25, 0.0], [0.0, 1.0, 0.1], [0.0, 0.0, 2.0]]), [5.0, -6.0, 7.0]), 4),
    # sform only (qform code 0), the layout of many registration tools
    "sform_only": (np.eye(4), 0, _affine(_rotation(0.5, 0.0) @ np.diag([1.2, 1.2, 1.5]), [3.0, 4.0, 5.0]), 2),
}


@pytest.mark.parametrize("model", ["model", "resampling"])
def test_prediction_keeps_qform_and_sform_with_their_codes(trained, tmp_path, model):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    headers = {name: _write_two_forms(inp / f"{name}.nii.gz", *forms) for name, forms in CASES.items()}
    run_medseg("predict", "--model", trained[model], "--input", inp, "--output", out)
    for name, hdr in headers.items():
        got = nib.load(out / f"{name}.nii.gz")
        assert got.shape == SHAPE, name
        for form in ("get_qform", "get_sform"):
            want_matrix, want_code = getattr(hdr, form)(coded=True)
            got_matrix, got_code = getattr(got.header, form)(coded=True)
            assert int(got_code) == int(want_code), (name, form)
            if want_matrix is not None:
                np.testing.assert_allclose(got_matrix, want_matrix, atol=1e-6, err_msg=f"{name} {form}")
        assert np.issubdtype(got.get_data_dtype(), np.integer)


def test_mha_and_nrrd_geometry_round_trip(trained, tmp_path):
    """Already handled: ITK formats keep spacing, origin and direction."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    image, _ = blob_case(np.random.default_rng(3))
    itk = sitk.GetImageFromArray(image.transpose(2, 1, 0))
    itk.SetSpacing((0.8, 1.1, 2.5))
    itk.SetOrigin((5.0, -7.5, 30.0))
    itk.SetDirection(sitk.VersorTransform((0.2, 0.4, 0.1), 0.6).GetMatrix())
    for ext in (".mha", ".nrrd"):
        sitk.WriteImage(itk, str(inp / f"scan{ext}"))
    run_medseg("predict", "--model", trained["resampling"], "--input", inp, "--output", out)
    for ext in (".mha", ".nrrd"):
        got = sitk.ReadImage(str(out / f"scan{ext}"))
        assert got.GetSize() == itk.GetSize()
        np.testing.assert_allclose(got.GetSpacing(), itk.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(got.GetOrigin(), itk.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(got.GetDirection(), itk.GetDirection(), atol=1e-6)


def _sform_only(path, array, sform):
    """A NIfTI with only an sform (nibabel cannot build a qform from a singular matrix)."""
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_sform(sform, code=2)
    header["qform_code"] = 0
    nib.save(nib.Nifti1Image(array, None, header=header), path)


def _degenerate_scans(folder):
    image, _ = blob_case(np.random.default_rng(1))
    save_nifti(folder / "good.nii.gz", image)
    _sform_only(folder / "flat.nii.gz", image, np.diag([1.0, 0.0, 2.0, 1.0]))  # zero spacing along y
    collinear = np.eye(4)
    collinear[:3, :3] = [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]  # two axes on one line
    _sform_only(folder / "collinear.nii.gz", image, collinear)


def test_degenerate_affine_fails_the_case_before_compute(trained, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _degenerate_scans(inp)
    res = run_medseg("predict", "--model", trained["model"], "--input", inp, "--output", out, check=False)
    text = assert_clean_failure(res, 1, "flat.nii.gz", "collinear.nii.gz", "degenerate")
    assert "Could not decompose" not in text
    assert (out / "good.nii.gz").is_file()
    assert not (out / "flat.nii.gz").exists() and not (out / "collinear.nii.gz").exists()
    cases = {c["case"]: c for c in json.loads((out / "manifest.json").read_text())["cases"]}
    assert cases["good"]["status"] == "ok"
    for bad in ("flat", "collinear"):
        assert cases[bad]["status"] == "failed" and "degenerate" in cases[bad]["error"]
        assert cases[bad]["seconds"] < 5  # failed at load, not after a sliding window


def test_check_reports_a_degenerate_affine(tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    image, _ = blob_case(np.random.default_rng(5))
    _sform_only(data / "imagesTr" / "case1_0000.nii.gz", image, np.diag([1.0, 0.0, 2.0, 1.0]))
    res = run_medseg("check", data, check=False)
    assert_clean_failure(res, 1, "case1_0000.nii.gz", "degenerate")
