"""Shared pieces of the fault tests: tiny NIfTI datasets written with nibabel, one tiny model trained once by the
real `medseg train`, and the assertion every fault test makes about a failed command."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medseg.engine.checkpoint import load_checkpoint, save_checkpoint

from ..integration.conftest import run_medseg

SHAPE = (20, 20, 10)


def blob_case(rng: np.random.Generator, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """An image with one bright ellipsoid and its label (x-first arrays, as stored)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = rng.uniform(-0.3, 0.3, size=3)[:, None, None, None]
    label = (((grid - centre) / 0.45) ** 2).sum(0) < 1
    image = (label * 2.0 + rng.normal(0, 0.3, size=shape)).astype(np.float32)
    return image, label.astype(np.uint8)


def save_nifti(path: Path, array: np.ndarray, affine=None, codes=(1, 1)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=codes[0])
    image.set_sform(affine, code=codes[1])
    nib.save(image, path)
    return path


def make_dataset(root: Path, n: int = 3, seed: int = 0) -> Path:
    """An nnU-Net style dataset (dataset.json with a training list) of ``n`` tiny 3D cases."""
    rng = np.random.default_rng(seed)
    training = []
    for i in range(n):
        image, label = blob_case(rng)
        save_nifti(root / "imagesTr" / f"case{i}_0000.nii.gz", image)
        save_nifti(root / "labelsTr" / f"case{i}.nii.gz", label)
        training.append({"image": f"imagesTr/case{i}.nii.gz", "label": f"labelsTr/case{i}.nii.gz"})
    spec = {"name": "tiny", "labels": {"background": 0, "lesion": 1}, "channel_names": {"0": "CT"},
            "file_ending": ".nii.gz", "numTraining": n, "training": training}
    (root / "dataset.json").write_text(json.dumps(spec, indent=1))
    return root


def tiny_config(folder: Path, data: Path, **train) -> Path:
    """A config training a 4-feature U-Net for a few steps on 16^3 patches, no tracking, no workers."""
    cfg = {
        "experiment": {"name": "faults", "seed": 1, "output_dir": str(folder / "run")},
        "data": {"root": str(data), "spatial_dims": 3, "val_fraction": 0.34, "num_workers": 0},
        "transforms": {"patch_size": [16, 16, 8], "augmentation": {"preset": "none"}},
        "model": {"name": "unet", "params": {"features": 4, "depth": 2}},
        "train": {"epochs": 1, "batch_size": 1, "iterations_per_epoch": 2, "val_every": 1, **train},
        "inference": {"overlap": 0.25, "sw_batch_size": 2},
        "tracking": {"enabled": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny model trained by the real CLI, shared by every fault test, and a copy of it whose metadata
    asks for resampling to 1.5 mm (``data.spacing``): same weights, the prediction path that inverts."""
    root = tmp_path_factory.mktemp("trained")
    data = make_dataset(root / "data")
    run_medseg("train", tiny_config(root, data))
    last = root / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["metadata"] = {**state["metadata"], "spacing": [1.5, 1.5, 1.5]}
    state.pop("format")
    resampling = save_checkpoint(root / "resampling.pt", state)
    return {"model": last, "resampling": resampling, "data": data, "root": root}


def assert_clean_failure(res, code: int, *needles: str) -> str:
    """The command exited with ``code``, printed every needle (file names, reasons) and no traceback."""
    text = res.stdout + res.stderr
    assert res.returncode == code, f"exit {res.returncode} != {code}\n{text}"
    for needle in needles:
        assert needle in text, f"{needle!r} not in the output:\n{text}"
    assert "Traceback" not in text, text
    return text


__all__ = ["SHAPE", "assert_clean_failure", "blob_case", "make_dataset", "run_medseg", "save_nifti", "tiny_config"]
