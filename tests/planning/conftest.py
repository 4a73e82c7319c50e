"""Tiny datasets for the planning tests: synthetic cells (2D instances), anisotropic lesions (3D CT) and a
two-channel MR-like set whose intensities are known exactly."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.synth import make_cells, make_lesions


@pytest.fixture(scope="session")
def probe_cache(tmp_path_factory) -> Path:
    """One step-cost cache for the session: the same network at the same size is measured once."""
    return tmp_path_factory.mktemp("probes") / "step_costs.json"


@pytest.fixture(scope="session")
def cells_2d(tmp_path_factory) -> Path:
    return make_cells(tmp_path_factory.mktemp("cells") / "cells", n=4, size=(96, 96))


@pytest.fixture(scope="session")
def lesions_aniso(tmp_path_factory) -> Path:
    """3D CT-like lesions at 0.8 x 0.8 x 4 mm."""
    return make_lesions(tmp_path_factory.mktemp("lesions") / "lesions", n=4, size=(40, 40, 10),
                        spacing=(0.8, 0.8, 4.0))


def write_two_channel(root: Path, n: int = 3) -> Path:
    """``n`` 3D cases, channel 1 = 10 * channel 0 + 5 everywhere; a cube of label 1 (and one of 2) whose
    channel-0 values are 0..99 and the background 1000, so foreground statistics are known."""
    rng = np.random.default_rng(0)
    for i in range(n):
        label = np.zeros((12, 10, 8), np.uint8)
        label[2:7, 2:7, 2:6] = 1
        label[8:10, 6:9, 5:7] = 2
        ch0 = np.full(label.shape, 1000.0, np.float32)
        ch0[label > 0] = rng.uniform(0, 99, int((label > 0).sum()))
        for c, array in enumerate([ch0, 10 * ch0 + 5]):
            path = root / "imagesTr" / f"case{i}_{c:04d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 1.5, 1.0])), path)
        (root / "labelsTr").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(label, np.diag([1.0, 1.0, 1.5, 1.0])), root / "labelsTr" / f"case{i}.nii.gz")
    spec = {"channel_names": {"0": "T1", "1": "FLAIR"}, "labels": {"background": 0, "a": 1, "b": 2},
            "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


@pytest.fixture
def two_channel(tmp_path) -> Path:
    return write_two_channel(tmp_path / "mr")
