"""Spatial augmentation: every transform, 2D and 3D, as the presets configure it (one at a time, prob 1).

Invariants: shapes kept, image and labels move together (the label equals the thresholded image away
from boundaries; instance and weight maps are resampled at exactly the same places), no new label
values, the same seed gives the same result, meta is kept.
"""

import copy

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.transforms import RandElasticd, RandOpticalDistortiond, RandRot90d, build_augmentation, build_mirror_pad
from tests.transforms.samples import make_sample, near_boundary, weight_of

SPATIAL = {
    "flip": {"flip_prob": 1.0},
    "rot90": {"rot90_prob": 1.0},
    "affine": {"affine_prob": 1.0, "rotate_deg": 30.0, "scale_range": [0.8, 1.2]},
    "elastic": {"elastic_prob": 1.0, "elastic_spacing": 16.0, "elastic_magnitude": [2.0, 4.0]},
    "grid": {"grid_prob": 1.0, "grid_limit": 0.3},
    "optical": {"optical_prob": 1.0, "optical_limit": 0.3, "optical_shift": 0.2},
}


def only(name, dims, seed=0):
    t = build_augmentation("none", SPATIAL[name], spatial_dims=dims)
    assert len(t.transforms) >= 1
    return t.set_random_state(seed)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_keys_move_together_and_keep_their_values(name, dims):
    data = make_sample(dims)
    out = only(name, dims)(copy.deepcopy(data))
    for key in ("image", "label", "instance", "weight"):
        assert isinstance(out[key], MetaTensor), key
        assert out[key].shape == data[key].shape, key
        assert out[key].meta["filename_or_obj"] == data[key].meta["filename_or_obj"], key
    label = out["label"][0].numpy()
    instance = out["instance"][0].numpy()
    assert set(np.unique(label)) <= {0.0, 1.0, 2.0}
    assert set(np.unique(instance)) <= set(np.unique(data["instance"].numpy()))
    # label-like keys are sampled at the same places: the same pixels of the same objects
    np.testing.assert_array_equal(label > 0, instance > 0)
    np.testing.assert_array_equal(out["weight"][0].numpy(), weight_of(instance))
    # the image (bilinear) matches the label (nearest) except next to a boundary
    mismatch = (out["image"][0].numpy() > 0.5) != (label > 0)
    assert not np.any(mismatch & ~near_boundary(label > 0)), f"{mismatch.sum()} misaligned pixels"
    assert not np.array_equal(out["instance"].numpy(), data["instance"].numpy()), "nothing happened"


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_same_seed_same_result(name, dims):
    data = make_sample(dims)
    a = only(name, dims, seed=3)(copy.deepcopy(data))
    b = only(name, dims, seed=3)(copy.deepcopy(data))
    for key in a:
        torch.testing.assert_close(a[key].as_tensor(), b[key].as_tensor(), rtol=0, atol=0)


@pytest.mark.parametrize("dims", [2, 3])
def test_missing_label_keys_are_allowed(dims):
    data = {"image": make_sample(dims)["image"]}
    for name in SPATIAL:
        out = only(name, dims)(copy.deepcopy(data))
        assert set(out) == {"image"} and out["image"].shape == data["image"].shape


@pytest.mark.parametrize("dims", [2, 3])
def test_zero_distortions_are_the_identity(dims):
    data = make_sample(dims, channels=2)
    keys = ["image", "label", "instance", "weight"]
    modes = ["bilinear", "nearest", "nearest", "nearest"]
    for t in (
        RandElasticd(keys, prob=1.0, magnitude=(0.0, 0.0), mode=modes),
        RandOpticalDistortiond(keys, prob=1.0, distort_limit=0.0, shift_limit=0.0, mode=modes),
    ):
        out = t(copy.deepcopy(data))
        for key in keys:
            torch.testing.assert_close(out[key].as_tensor(), data[key].as_tensor(), atol=1e-4, rtol=0)


def test_elastic_and_optical_draws_differ_by_seed_and_prob_zero_is_identity():
    data = make_sample(2)
    outs = [RandElasticd(["image"], prob=1.0).set_random_state(s)(copy.deepcopy(data))["image"] for s in (0, 1)]
    assert not torch.equal(outs[0], outs[1])
    same = RandOpticalDistortiond(["image", "label"], prob=0.0)(copy.deepcopy(data))
    assert torch.equal(same["image"], data["image"]) and torch.equal(same["label"], data["label"])


def test_optical_sign_barrel_versus_pincushion():
    # barrel (k > 0) samples farther out, so a centred square shrinks; pincushion grows it
    img = torch.zeros(1, 65, 65)
    img[0, 22:43, 22:43] = 1.0
    area = {}
    for k in (0.3, -0.3):
        t = RandOpticalDistortiond(["image"], prob=1.0, distort_limit=(k, k), shift_limit=0.0)
        area[k] = float(t({"image": img})["image"].sum())
    assert area[0.3] < img.sum() < area[-0.3]


def test_rot90_keeps_the_shape_of_non_square_patches():
    data = make_sample(2, shape=(48, 64))
    for seed in range(6):
        out = RandRot90d(["image", "label"], prob=1.0).set_random_state(seed)(copy.deepcopy(data))
        assert out["image"].shape == data["image"].shape
    square = make_sample(2)
    turned = RandRot90d(["image"], prob=1.0, max_k=1).set_random_state(0)(copy.deepcopy(square))
    torch.testing.assert_close(turned["image"][0], torch.rot90(square["image"][0], 1, (0, 1)))


@pytest.mark.parametrize("dims", [2, 3])
def test_mirror_pad_extends_every_key_by_mirroring(dims):
    data = make_sample(dims, shape=(10, 12) if dims == 2 else (6, 10, 12))
    target = (32, 20) if dims == 2 else (16, 12, 30)
    out = build_mirror_pad(target)(copy.deepcopy(data))
    for key in data:
        assert tuple(out[key].shape[1:]) == tuple(max(t, s) for t, s in zip(target, data[key].shape[1:]))
        assert set(np.unique(out[key].numpy())) == set(np.unique(data[key].numpy()))
    # the original sits in the middle, and the first padded row mirrors its first row
    label, original = out["label"][0].numpy(), data["label"][0].numpy()
    before = [(max(t, s) - s) // 2 for t, s in zip(target, original.shape)]
    inner = tuple(slice(b, b + s) for b, s in zip(before, original.shape))
    np.testing.assert_array_equal(label[inner], original)
    np.testing.assert_array_equal(label[before[0] - 1][inner[1:]], original[0])
    div = build_mirror_pad(divisible=16)(copy.deepcopy(data))
    assert all(s % 16 == 0 for s in div["label"].shape[1:])
    with pytest.raises(ValueError):
        build_mirror_pad()
