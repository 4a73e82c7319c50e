"""Dataset integrity: a clean set passes; a set broken in many ways reports each fault once, naming its file."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from medseg.data.check import check_dataset
from medseg.data.datalist import discover
from tests.data.conftest import save_nifti

SPACING = np.diag([0.8, 0.8, 2.0, 1.0])
SHAPE = (8, 7, 5)


def _case(root, name, *, channels=2, label=True, shape=SHAPE, label_shape=SHAPE, label_affine=SPACING):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    images = [save_nifti(root / f"imagesTr/{name}_{c:04d}.nii.gz", rng.random(shape, np.float32), SPACING)
              for c in range(channels)]  # fmt: skip
    lab = None
    if label:
        lab = save_nifti(
            root / f"labelsTr/{name}.nii.gz", rng.integers(0, 3, label_shape).astype(np.uint8), label_affine
        )
    return images, lab


def test_clean_dataset_has_no_problems(nnunet_dataset):
    report = check_dataset(nnunet_dataset)
    assert report.problems == [] and not report.fatal
    assert report.n_cases == 4 and report.lines() == []


def test_every_problem_reported_once_with_its_file(nnunet_dataset):
    root = nnunet_dataset
    spec = json.loads((root / "dataset.json").read_text())
    del spec["file_ending"]  # so that a second extension is a duplicate, not ignored
    (root / "dataset.json").write_text(json.dumps(spec))
    tr, lab = root / "imagesTr", root / "labelsTr"
    expected = {}

    images, _ = _case(root, "nolabel", label=False)
    expected[images[0]] = "has no label"
    save_nifti(lab / "orphan.nii.gz", np.zeros(SHAPE, np.uint8), SPACING)
    expected[lab / "orphan.nii.gz"] = "has no image"
    _, label = _case(root, "shape", label_shape=(8, 7, 4))
    expected[label] = "spatial shape (8, 7, 4) differs"
    _, label = _case(root, "geometry", label_affine=np.diag([0.8, 0.8, 2.5, 1.0]))
    expected[label] = "geometry differs from geometry_0000.nii.gz: spacing"
    images, _ = _case(root, "chgeometry")
    save_nifti(images[1], np.zeros(SHAPE, np.float32), SPACING + np.array([[0, 0, 0, 4.0]] * 3 + [[0] * 4]))
    expected[images[1]] = "geometry differs from chgeometry_0000.nii.gz: origin"
    _, label = _case(root, "values")
    save_nifti(label, np.full(SHAPE, 5, np.uint8), SPACING)
    expected[label] = "label values 5 are not among the declared [0, 1, 2]"
    _, label = _case(root, "fraction")
    save_nifti(label, np.full(SHAPE, 0.5, np.float32), SPACING)
    expected[label] = "non-integer"
    images, _ = _case(root, "nan")
    bad = np.zeros(SHAPE, np.float32)
    bad[0, 0, :2] = np.nan, np.inf
    save_nifti(images[1], bad, SPACING)
    expected[images[1]] = "1 NaN and 1 Inf"
    images, _ = _case(root, "corrupt")
    images[0].write_bytes(b"\x1f\x8b\x08 this is not a NIfTI file")
    expected[images[0]] = "cannot read"
    _, label = _case(root, "empty")
    label.write_bytes(b"")
    expected[label] = "empty file (0 bytes)"
    _, label = _case(root, "zerosize")
    save_nifti(label, np.zeros((0, 7, 5), np.uint8), SPACING)
    expected[label] = "empty image (no voxels, spatial shape (0, 7, 5))"
    images, _ = _case(root, "dup")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(SHAPE[::-1], np.float32)), str(tr / "dup_0000.mha"))
    expected[images[0]] = "duplicate case name 'dup_0000' (also dup_0000.mha)"
    images, _ = _case(root, "gap", channels=3)
    images[1].unlink()
    expected[images[0]] = "lacks channel file(s) _0001"
    images, _ = _case(root, "three", channels=3)
    expected[images[0]] = "3 channel file(s); dataset.json declares 2 (T1, T2)"
    for junk in (tr / "._c1_0000.nii.gz", tr / ".DS_Store", lab / "README.md"):
        junk.write_bytes(b"\0\0")

    report = check_dataset(root)
    assert report.fatal
    got = {p.path: p for p in report.problems}
    assert len(report.problems) == len(got) == len(expected), "\n".join(report.lines())
    for path, fragment in expected.items():
        problem = got[str(path)]
        assert problem.severity == "error" and fragment in problem.message, str(problem)
    assert f"ERROR {images[0]}: " in "\n".join(report.lines())
    assert {p.name for p in report.skipped} == {"._c1_0000.nii.gz", ".DS_Store", "README.md"}
    assert all(line.startswith("SKIPPED") for line in report.lines()[len(expected) :])


def test_missing_labels_folder_is_one_problem(nnunet_dataset):
    for p in (nnunet_dataset / "labelsTr").iterdir():
        p.unlink()
    (nnunet_dataset / "labelsTr").rmdir()
    report = check_dataset(nnunet_dataset)
    assert [p.path for p in report.problems] == [str(nnunet_dataset / "labelsTr")]


def test_instance_labels_accept_any_non_negative_id(tmp_path):
    save_nifti(tmp_path / "images/a.nii.gz", np.zeros(SHAPE, np.float32))
    save_nifti(tmp_path / "labels/a.nii.gz", np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE) * 7)
    save_nifti(tmp_path / "images/b.nii.gz", np.zeros(SHAPE, np.float32))
    save_nifti(tmp_path / "labels/b.nii.gz", np.full(SHAPE, -1, np.int16))
    report = check_dataset(discover(tmp_path))
    assert [(p.path, "negative" in p.message) for p in report.problems] == [(str(tmp_path / "labels/b.nii.gz"), True)]
    report = check_dataset(tmp_path, label_values={0, 1})  # an explicit set overrides
    assert [p.path for p in report.problems] == [str(tmp_path / f"labels/{n}.nii.gz") for n in "ab"]


def test_geometry_tolerance(tmp_path):
    save_nifti(tmp_path / "images/a.nii.gz", np.zeros(SHAPE, np.float32), SPACING)
    shifted = SPACING.copy()
    shifted[0, 3] = 1e-5
    save_nifti(tmp_path / "labels/a.nii.gz", np.ones(SHAPE, np.uint8), shifted)  # foreground: no warning
    assert check_dataset(tmp_path).problems == []
    (problem,) = check_dataset(tmp_path, geometry_tol=1e-7).problems
    assert "origin" in problem.message
