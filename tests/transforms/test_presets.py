"""Presets, config checking, preprocessing and preview samples."""

import copy

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.config import AUGMENTATION_PRESETS, AugmentationParams
from medseg.errors import ConfigError
from medseg.transforms import build_augmentation, build_preprocessing, preset_parameters, preview_samples
from tests.transforms.reference import naive_border_weight_map, touching_nuclei
from tests.transforms.samples import make_sample, weight_of


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("preset", sorted(AUGMENTATION_PRESETS))
def test_presets_run_and_keep_labels_valid(preset, dims):
    data = make_sample(dims, channels=3 if preset == "lesions2d" else 1)
    t = build_augmentation(preset, spatial_dims=dims)
    for seed in range(3):
        out = t.set_random_state(seed)(copy.deepcopy(data))
        for key in data:
            assert isinstance(out[key], MetaTensor) and out[key].shape == data[key].shape, key
            assert out[key].meta["filename_or_obj"] == data[key].meta["filename_or_obj"]
        assert set(np.unique(out["label"].numpy())) <= {0.0, 1.0, 2.0}
        np.testing.assert_array_equal(out["weight"][0].numpy(), weight_of(out["instance"][0].numpy()))
        assert torch.isfinite(out["image"]).all()


@pytest.mark.parametrize("preset", ["cells2d", "lesions3d"])
def test_preset_is_deterministic_for_a_seed(preset):
    dims = 3 if preset.endswith("3d") else 2
    data = make_sample(dims)
    a = build_augmentation(preset, spatial_dims=dims).set_random_state(7)
    b = build_augmentation(preset, spatial_dims=dims).set_random_state(7)
    for _ in range(3):
        x, y = a(copy.deepcopy(data)), b(copy.deepcopy(data))
        for key in data:
            torch.testing.assert_close(x[key].as_tensor(), y[key].as_tensor(), rtol=0, atol=0)


def test_cells2d_has_what_fluorescence_needs_without_doing_everything_at_once():
    p = preset_parameters("cells2d")
    for name in ("flip", "rot90", "elastic", "grid", "optical", "brightness", "contrast", "gamma", "noise", "blur"):
        assert p[f"{name}_prob"] > 0, name
    resampling = ("affine", "elastic", "grid", "optical")
    assert sum(p[f"{n}_prob"] for n in resampling) <= 1.0  # about one interpolating warp per sample
    assert all(p[k] < 0.5 for k in p if k.endswith("_prob") and k not in ("flip_prob", "rot90_prob"))


def test_every_preset_has_the_same_parameters_and_overrides_win():
    names = set(AugmentationParams.model_fields)
    assert all(set(preset_parameters(p)) == names for p in AUGMENTATION_PRESETS)
    assert preset_parameters("cells2d") == AugmentationParams().model_dump()  # the defaults are cells2d's
    params = preset_parameters("cells2d")
    params["flip_prob"] = 0.0
    assert preset_parameters("cells2d")["flip_prob"] == 0.5  # a copy
    t = build_augmentation("cells2d", {"flip_prob": 0.0, "rot90_prob": 0.0}, spatial_dims=2)
    assert not any(type(x).__name__ in ("RandFlipd", "RandRot90d") for x in t.transforms)
    assert len(build_augmentation("none", spatial_dims=3).transforms) == 0


@pytest.mark.parametrize(
    ("preset", "params", "key", "words"),
    [
        ("cells3d", None, "transforms.augmentation.preset", "cells2d, lesions2d, lesions3d, none"),
        ("cells2d", {"flip_probability": 0.5}, "transforms.augmentation.params.flip_probability", "flip_prob"),
        ("cells2d", {"flip_prob": 1.5}, "transforms.augmentation.params.flip_prob", "less than or equal to 1"),
        ("cells2d", {"blur_sigma": [-1.0, 1.0]}, "transforms.augmentation.params.blur_sigma", "low"),
        ("cells2d", {"noise_std": -0.1}, "transforms.augmentation.params.noise_std", "got -0.1"),
        ("cells2d", {"flip_axes": [2]}, "transforms.augmentation.params.flip_axes", "0..1"),
        ("cells2d", {"flip_axes": [1, 1]}, "transforms.augmentation.params.flip_axes", "distinct"),
        ("cells2d", {"flip_prob": "0.5"}, "transforms.augmentation.params.flip_prob", "valid number"),
        ("cells2d", {"rot90_axes": [0]}, "transforms.augmentation.params.rot90_axes", "2 distinct"),
        ("cells2d", {"gamma_range": [1.5, 0.7]}, "transforms.augmentation.params.gamma_range", "low <= high"),
        ("cells2d", {"padding_mode": "wrap"}, "transforms.augmentation.params.padding_mode", "reflection"),
        ("cells2d", {"grid_cells": 2.5}, "transforms.augmentation.params.grid_cells", "integer"),
        ("cells2d", {"elastic_prob": True}, "transforms.augmentation.params.elastic_prob", "True"),
    ],
)
def test_config_errors_name_the_key(preset, params, key, words):
    with pytest.raises(ConfigError) as err:
        build_augmentation(preset, params, spatial_dims=2)
    assert err.value.key == key
    assert words in err.value.message


def test_per_axis_values_follow_the_dimensions():
    build_augmentation("lesions3d", {"rotate_deg": [10, 0, 0], "elastic_spacing": [8, 16, 16]}, spatial_dims=3)
    with pytest.raises(ConfigError, match="rotate_deg"):
        build_augmentation("lesions3d", {"rotate_deg": [10, 0]}, spatial_dims=3)


def test_preview_samples_are_deterministic_and_leave_inputs_alone():
    data = make_sample(2)
    before = copy.deepcopy(data)
    t = build_augmentation("cells2d", spatial_dims=2).set_random_state(0)
    first = preview_samples(data, t, n=4, seed=11)
    second = preview_samples(data, t, n=4, seed=11)
    assert len(first) == 4
    for a, b in zip(first, second):
        for key in data:
            assert torch.equal(a[key].as_tensor(), b[key].as_tensor())
    assert any(not torch.equal(first[0]["image"], s["image"]) for s in first[1:])
    for key in data:
        assert torch.equal(data[key].as_tensor(), before[key].as_tensor())
    # the caller's transform keeps its own random stream
    fresh = build_augmentation("cells2d", spatial_dims=2).set_random_state(0)
    torch.testing.assert_close(t(copy.deepcopy(data))["image"], fresh(copy.deepcopy(data))["image"])


def loaded_instance_sample(shape=(48, 48)):
    inst = touching_nuclei(shape, 10, 8, seed=3)
    image = (inst > 0) * 200.0 + np.random.default_rng(0).uniform(0, 20, shape)
    return inst, {
        "image": MetaTensor(torch.as_tensor(image, dtype=torch.float32)[None], meta={"filename_or_obj": "a.tif"}),
        "label": MetaTensor(torch.as_tensor(inst, dtype=torch.float32)[None], meta={"filename_or_obj": "a_l.tif"}),
    }


def test_preprocessing_of_instance_labels_derives_targets_and_weight():
    inst, data = loaded_instance_sample()
    pre = build_preprocessing(
        spatial_dims=2,
        label_kind="instance",
        normalize={"mode": "percentile"},
        weight_map={"enabled": True},
        instance_to_semantic="cell_border",
    )
    out = pre(data)
    assert set(out) == {"image", "label", "instance", "weight"}
    np.testing.assert_array_equal(out["instance"][0].numpy(), inst)
    assert set(np.unique(out["label"].numpy())) == {0.0, 1.0, 2.0}
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
    expected = naive_border_weight_map(inst, classes=out["label"][0].numpy().astype(int))
    np.testing.assert_allclose(out["weight"][0].numpy(), expected, atol=1e-4)
    for key in out:
        assert isinstance(out[key], MetaTensor)
    # unlabelled images pass through the same pipeline
    assert set(pre({"image": data["image"]})) == {"image"}


def test_preprocessing_of_semantic_labels_weights_classes_only():
    _, data = loaded_instance_sample()
    data["label"] = (data["label"] > 0).float()
    out = build_preprocessing(
        spatial_dims=2, label_kind="semantic", normalize=None, weight_map={"enabled": True}, instance_to_semantic=None
    )(data)
    assert "instance" not in out
    weights = out["weight"][0].numpy()
    fg = out["label"][0].numpy() > 0
    assert len(np.unique(weights[fg])) == 1 and len(np.unique(weights[~fg])) == 1
    assert weights.mean() == pytest.approx(1.0)


def test_preprocessing_without_labels_only_normalises():
    _, data = loaded_instance_sample()
    for kind in ("none", None):
        pre = build_preprocessing(
            spatial_dims=2, label_kind=kind, normalize=None, weight_map=None, instance_to_semantic=None
        )
        out = pre({"image": data["image"]})
        assert set(out) == {"image"} and float(out["image"].max()) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"weight_map": {"enabled": True, "sigma": -5}}, "transforms.weight_map.sigma"),
        ({"weight_map": {"enabled": True, "w1": 3}}, "transforms.weight_map.w1"),
        ({"instance_to_semantic": "contours"}, "transforms.instance_to_semantic"),
        ({"label_kind": "semantic", "instance_to_semantic": "cell_border"}, "transforms.instance_to_semantic"),
        ({"label_kind": "panoptic"}, "data.label_kind"),
        ({"normalize": {"mode": "percentile", "upper": 120}}, "transforms.normalize.upper"),
    ],
)
def test_preprocessing_errors_name_the_key(kwargs, key):
    args = {"spatial_dims": 2, "label_kind": "instance", "normalize": None, "weight_map": None}
    args["instance_to_semantic"] = None
    args.update(kwargs)
    with pytest.raises(ConfigError) as err:
        build_preprocessing(**args)
    assert err.value.key == key
