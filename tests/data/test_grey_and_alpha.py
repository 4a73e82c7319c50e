"""Pictures as microscopes and image tools save them: an opaque alpha channel is dropped at reading, grey saved as
RGB feeds a one-channel model and grey feeds an RGB one, losslessly; anything else is still refused."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from medseg.data.check import check_dataset
from medseg.data.datalist import discover
from medseg.data.readers import load_image
from medseg.data.sanity import ValidateImaged
from medseg.errors import DataError
from tests.data.conftest import save_nifti

GREY = (np.arange(30 * 40).reshape(30, 40) * 7 % 251).astype(np.uint8)
OPAQUE = np.full_like(GREY, 255)


def _png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def test_an_opaque_alpha_channel_is_dropped(tmp_path):
    rgb = np.stack([GREY, GREY[::-1], GREY[:, ::-1]], -1)
    as_rgb = load_image(_png(tmp_path / "rgb.png", rgb, "RGB"))
    as_rgba = load_image(_png(tmp_path / "rgba.png", np.dstack([rgb, OPAQUE]), "RGBA"))
    assert as_rgba.shape == as_rgb.shape == (3, 40, 30) and torch.equal(as_rgba, as_rgb)
    grey_alpha = load_image(_png(tmp_path / "la.png", np.stack([GREY, OPAQUE], -1), "LA"))
    assert grey_alpha.shape == (1, 40, 30) and torch.equal(grey_alpha[0], torch.as_tensor(GREY.T.astype(np.float32)))
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([rgb, OPAQUE]), photometric="rgb", extrasamples=["unassalpha"])
    assert torch.equal(load_image(tmp_path / "rgba.tif"), as_rgb)


def test_an_alpha_that_varies_is_kept(tmp_path):
    alpha = OPAQUE.copy()
    alpha[3, 4] = 0
    rgba = np.dstack([GREY, GREY, GREY, alpha])
    assert load_image(_png(tmp_path / "rgba.png", rgba, "RGBA")).shape == (4, 40, 30)
    # four fluorescence channels that tifffile tags RGB + alpha by default stay four channels
    planes = np.stack([GREY, GREY[::-1], GREY[:, ::-1], alpha])
    tifffile.imwrite(tmp_path / "four.tif", planes)
    assert load_image(tmp_path / "four.tif").shape == (4, 40, 30)


def _validated(path, channels):
    return ValidateImaged(("image",), in_channels=channels)({"image": load_image(path)})


def test_grey_saved_as_rgb_feeds_a_one_channel_model_and_grey_an_rgb_one(tmp_path):
    grey = _png(tmp_path / "grey.png", GREY, "L")
    as_rgb = _png(tmp_path / "grey_rgb.png", np.dstack([GREY] * 3 + [OPAQUE]), "RGBA")
    one = _validated(as_rgb, 1)
    assert one["image"].shape == (1, 40, 30) and torch.equal(one["image"], load_image(grey))
    assert "identical channels" in one["warnings"][0] and "grey_rgb.png" in one["warnings"][0]
    three = _validated(grey, 3)
    assert torch.equal(three["image"], load_image(as_rgb)) and "R, G and B" in three["warnings"][0]
    assert "warnings" not in ValidateImaged(("image",), in_channels=1, warnings_key=None)({"image": load_image(as_rgb)})


def test_colour_and_scans_are_not_converted(tmp_path):
    colour = _png(tmp_path / "colour.png", np.stack([GREY, GREY[::-1], GREY[:, ::-1]], -1), "RGB")
    with pytest.raises(DataError, match=r"colour.png.*model expects 1 channel, this file has 3 that differ"):
        _validated(colour, 1)
    # two identical volumes of a 4D NIfTI are two scans, not a grey picture
    volume = np.random.default_rng(0).normal(size=(6, 7, 5)).astype(np.float32)
    save_nifti(tmp_path / "two.nii.gz", np.stack([volume, volume], -1))
    with pytest.raises(DataError, match="model expects 1 channel, this file has 2 "):
        _validated(tmp_path / "two.nii.gz", 1)


def test_check_accepts_grey_and_grey_saved_as_rgb_together(tmp_path):
    labels = np.zeros((30, 40), np.uint8)
    labels[5:15, 5:15] = 1
    for name, array, mode in [("a", GREY, "L"), ("b", GREY, "L"), ("c", np.dstack([GREY] * 3), "RGB")]:
        _png(tmp_path / "images" / f"{name}.png", array, mode)
        _png(tmp_path / "labels" / f"{name}.png", labels, "L")
    assert check_dataset(discover(tmp_path)).problems == []
    _png(tmp_path / "images" / "c.png", np.stack([GREY, GREY[::-1], GREY[:, ::-1]], -1), "RGB")  # real colour
    problems = check_dataset(discover(tmp_path)).problems
    assert [(p.path, "3 channels" in p.message) for p in problems] == [(str(tmp_path / "images/c.png"), True)]
