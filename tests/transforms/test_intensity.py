"""Intensity augmentation and normalisation: images change, labels never do."""

import copy

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.errors import ConfigError
from medseg.transforms import RandColorJitterd, build_augmentation, build_normalization
from medseg.transforms.functional import color_jitter
from tests.transforms.samples import make_sample

INTENSITY = {
    "brightness": {"brightness_prob": 1.0},
    "contrast": {"contrast_prob": 1.0},
    "gamma": {"gamma_prob": 1.0},
    "noise": {"noise_prob": 1.0},
    "blur": {"blur_prob": 1.0},
    "jitter": {"jitter_prob": 1.0},
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", sorted(INTENSITY))
def test_only_the_image_changes_and_seeds_repeat(name, dims):
    data = make_sample(dims, channels=3)
    data["image"] = data["image"] * 0.6 + 0.2 + 0.1 * torch.rand_like(data["image"].as_tensor())
    t = build_augmentation("none", INTENSITY[name], spatial_dims=dims)
    out = t.set_random_state(1)(copy.deepcopy(data))
    again = build_augmentation("none", INTENSITY[name], spatial_dims=dims).set_random_state(1)(copy.deepcopy(data))
    for key in ("label", "instance", "weight"):
        assert torch.equal(out[key].as_tensor(), data[key].as_tensor()), key
    assert isinstance(out["image"], MetaTensor) and out["image"].shape == data["image"].shape
    assert out["image"].meta["filename_or_obj"] == "case.tif"
    assert not torch.allclose(out["image"].as_tensor(), data["image"].as_tensor())
    torch.testing.assert_close(out["image"].as_tensor(), again["image"].as_tensor(), rtol=0, atol=0)


def test_color_jitter_neutral_factors_are_the_identity_and_hue_keeps_grey():
    img = torch.rand(3, 8, 9)
    torch.testing.assert_close(color_jitter(img, 1.0, 1.0, 1.0, 0.0), img)
    grey = torch.full((3, 4, 4), 0.4)
    torch.testing.assert_close(color_jitter(grey, hue=0.3), grey, atol=1e-5, rtol=0)
    # a hue turn is undone by the opposite turn; saturation 0 gives equal channels
    torch.testing.assert_close(color_jitter(color_jitter(img, hue=0.2), hue=-0.2), img, atol=1e-5, rtol=0)
    flat = color_jitter(img, saturation=0.0)
    torch.testing.assert_close(flat[0], flat[1], atol=1e-6, rtol=0)


def test_color_jitter_on_grey_images_only_scales():
    img = {"image": torch.rand(1, 10, 10)}
    out = RandColorJitterd("image", prob=1.0, brightness=0.5, contrast=0.0, saturation=0.5, hue=0.2)
    res = out.set_random_state(0)(img)["image"]
    ratio = res / img["image"]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0, 0])))


def image_with(values, channels=1):
    return {"image": MetaTensor(torch.as_tensor(values, dtype=torch.float32).reshape(channels, -1, 1))}


def test_percentile_normalisation_clips_to_unit_range_per_channel():
    values = np.stack([np.arange(1000.0), np.arange(1000.0) * 10 + 5])
    out = build_normalization({"mode": "percentile", "lower": 1, "upper": 99})(image_with(values, 2))["image"]
    assert out.min() == 0.0 and out.max() == 1.0
    torch.testing.assert_close(out[0], out[1])  # the same up to scale: per-channel percentiles
    assert 0.45 < float(out[0].median()) < 0.55


def test_percentile_nonzero_keeps_zeros():
    values = np.concatenate([np.zeros(500), np.linspace(10, 20, 500)])
    out = build_normalization({"mode": "percentile", "nonzero": True, "lower": 0, "upper": 100})(image_with(values))
    out = out["image"].flatten()
    assert torch.all(out[:500] == 0) and out[500] == 0 and out[-1] == 1


def test_zscore_and_ct_window():
    values = np.random.default_rng(0).normal(50, 10, 4000)
    z = build_normalization({"mode": "zscore"})(image_with(values))["image"]
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-3
    ct = build_normalization({"mode": "ct", "window": [-100, 300]})(image_with([-1000, -100, 100, 300, 3000]))
    torch.testing.assert_close(ct["image"].flatten(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    # clip to the window, then z-score with given statistics (nnU-Net's CT scheme)
    cz = build_normalization({"mode": "ct", "window": [-100, 300], "mean": 50.0, "std": 25.0})
    out = cz(image_with([-1000, -100, 50, 100, 300, 3000]))["image"].flatten()
    torch.testing.assert_close(out, (torch.tensor([-100.0, -100, 50, 100, 300, 300]) - 50) / 25)
    same = build_normalization({"mode": "none"})(image_with([1.0, 7.0]))
    torch.testing.assert_close(same["image"].flatten(), torch.tensor([1.0, 7.0]))


@pytest.mark.parametrize(
    ("normalize", "key"),
    [
        ({"mode": "minmax"}, "transforms.normalize.mode"),
        ({"lower": 50, "upper": 10}, "transforms.normalize.upper"),
        ({"window": [400, -1000], "mode": "ct"}, "transforms.normalize.window"),
        ({"per_channel": "yes"}, "transforms.normalize.per_channel"),
        ({"clip": True}, "transforms.normalize.clip"),
        ({"mode": "ct", "mean": 3.0}, "transforms.normalize"),
        ({"mode": "ct", "mean": 3.0, "std": 0.0}, "transforms.normalize.std"),
    ],
)
def test_normalisation_config_errors_name_the_key(normalize, key):
    with pytest.raises(ConfigError) as err:
        build_normalization(normalize)
    assert err.value.key == key
