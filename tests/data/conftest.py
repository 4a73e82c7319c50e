"""Small real files for the data-layer tests, written with the libraries themselves (not with medseg)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

OBLIQUE = np.array(  # rotation about z and x with anisotropic spacing (0.8, 0.8, 2.5)
    [[0.6928, -0.4, 0.0, -12.5], [0.4, 0.6928, -0.4330, 30.0], [0.0, 0.2, 2.4495, 7.25], [0.0, 0.0, 0.0, 1.0]]
)


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None, codes=(1, 1)) -> Path:
    """``array`` stored as is (x-first), with ``affine`` and the given (qform, sform) codes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else affine
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=codes[0])
    image.set_sform(affine, code=codes[1])
    nib.save(image, path)
    return path


def save_dicom_series(folder: Path, volume_zyx: np.ndarray, spacing, origin, direction) -> sitk.Image:
    """Write ``volume_zyx`` (int16) as a DICOM series, one file per slice (SimpleITK's own recipe)."""
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(volume_zyx.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    d = image.GetDirection()
    date, clock = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    series = [
        ("0008|0021", date), ("0008|0031", clock), ("0008|0060", "CT"), ("0008|103e", "medseg test"),
        ("0020|000e", "1.2.826.0.1.3680043.2.1125.1." + date + clock),
        ("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))),
    ]  # fmt: skip
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in series:
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        plane.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(plane)
    return image


@pytest.fixture
def nnunet_dataset(tmp_path) -> Path:
    """A clean nnU-Net v2 dataset: 3 two-channel 3D cases (+1 test case), labels {0, 1, 2}."""
    root = tmp_path / "Dataset001"
    rng = np.random.default_rng(0)
    spacing = np.diag([0.8, 0.8, 2.0, 1.0])
    for split, names in (("Tr", ["c1", "c2", "c3"]), ("Ts", ["t1"])):
        for name in names:
            for ch in range(2):
                save_nifti(root / f"images{split}/{name}_{ch:04d}.nii.gz", rng.random((8, 7, 5), np.float32), spacing)
            label = rng.integers(0, 3, (8, 7, 5)).astype(np.uint8)
            save_nifti(root / f"labels{split}/{name}.nii.gz", label, spacing)
    spec = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "edema": 1, "tumor": 2},
        "numTraining": 3,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return root
