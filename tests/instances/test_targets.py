"""Targets of each representation equal a naive whole-image computation, and turn with the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose, Flipd, Rotate90d
from scipy import ndimage

from medseg.instances import InstanceTargetsd, build_representation, distance_targets, flow_targets
from tests.instances.clusters import touches, touching_cells


def naive_distance(inst: np.ndarray) -> np.ndarray:
    out = np.zeros(inst.shape, np.float32)
    for i in np.unique(inst[inst > 0]):
        d = ndimage.distance_transform_edt(inst == i)
        out[inst == i] = (d[inst == i] / d.max()).astype(np.float32)
    return out[None]


def naive_flows(inst: np.ndarray) -> np.ndarray:
    out = np.zeros((inst.ndim, *inst.shape), np.float32)
    for i in np.unique(inst[inst > 0]):
        coords = np.nonzero(inst == i)
        for axis, c in enumerate(coords):
            off = c - c.mean()
            off = np.where(off < 0, off / max(-off.min(), 1e-300), off / max(off.max(), 1e-300))
            out[axis][coords] = off
    return out


def _maps():
    yield touching_cells((70, 90), 12, 9.0, seed=1)
    yield touching_cells((28, 30, 26), 6, 6.5, seed=2)
    edge = np.zeros((20, 24), np.int32)  # cut by the image edge, one-pixel objects, ids with gaps
    edge[:6, :5], edge[5:9, 18:], edge[12, 12], edge[15:, 3:9], edge[15:, 9:11] = 7, 3, 40, 2, 9
    yield edge


@pytest.mark.parametrize("inst", list(_maps()), ids=["2d", "3d", "edges"])
def test_targets_equal_the_naive_computation(inst):
    assert touches(inst)
    np.testing.assert_allclose(distance_targets(inst), naive_distance(inst), rtol=0, atol=1e-6)
    np.testing.assert_allclose(flow_targets(inst), naive_flows(inst), rtol=0, atol=1e-6)
    dist = distance_targets(inst)
    assert dist.dtype == np.float32 and np.all(dist[0][inst == 0] == 0) and np.all(dist[0][inst > 0] > 0)
    flows = flow_targets(inst)
    assert flows.shape == (inst.ndim, *inst.shape) and np.abs(flows).max() <= 1


def test_image_edge_is_not_a_boundary():
    inst = np.zeros((10, 10), np.int32)
    inst[:, :4] = 1  # a band along the left edge, touching the top and bottom edges
    d = distance_targets(inst)[0]
    assert np.allclose(d[:, 3], 1 / 4) and np.allclose(d[:, 0], 1.0)  # distance to the right side only


def _flip_field(field: np.ndarray, axis: int, vector: bool) -> np.ndarray:
    out = np.flip(field, 1 + axis).copy()
    if vector:
        out[axis] *= -1
    return out


def _rot_field(field: np.ndarray, axes: tuple[int, int], vector: bool) -> np.ndarray:
    """np.rot90 by 90 degrees in ``axes``: a point (p, q) moves to (n_q - 1 - q, p)."""
    out = np.rot90(field, 1, axes=(1 + axes[0], 1 + axes[1])).copy()
    if vector:
        a, b = axes
        out[[a, b]] = np.stack([-out[b], out[a]])
    return out


@pytest.mark.parametrize("name,fn", [("distance", distance_targets), ("flows", flow_targets)])
@pytest.mark.parametrize("inst", list(_maps())[:2], ids=["2d", "3d"])
def test_targets_turn_with_the_image(name, fn, inst):
    vector = name == "flows"
    base = fn(inst)
    for axis in range(inst.ndim):
        np.testing.assert_allclose(fn(np.flip(inst, axis)), _flip_field(base, axis, vector), atol=1e-5)
    for axes in [(0, 1)] + ([(1, 2), (0, 2)] if inst.ndim == 3 else []):
        rotated = np.rot90(inst, 1, axes=axes)
        np.testing.assert_allclose(fn(rotated), _rot_field(base, axes, vector), atol=1e-5)


@pytest.mark.parametrize("name", ["distance", "flows"])
def test_targets_after_monai_spatial_transforms(name):
    """Image and instance map go through MONAI flips and 90-degree turns; the targets computed afterwards
    equal the turned targets of the original: the chain order (augment, then targets) keeps them aligned."""
    inst = touching_cells((48, 48), 7, 8.0, seed=3)
    rep = build_representation(name)
    image = (inst > 0).astype(np.float32)[None]
    chain = Compose([Flipd(["image", "instance"], spatial_axis=1), Rotate90d(["image", "instance"], k=1),
                     rep.target_transform()])
    out = chain({"image": torch.from_numpy(image), "instance": torch.from_numpy(inst[None])})
    expected = np.rot90(np.flip(inst, 1), 1)
    assert np.array_equal(np.asarray(out["instance"][0]), expected)
    want = _rot_field(_flip_field(rep.targets(inst), 1, name == "flows"), (0, 1), name == "flows")
    np.testing.assert_allclose(np.asarray(out["regression"]), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["regression"]), rep.targets(expected))


def test_target_transform_checks_its_input():
    t = InstanceTargetsd("instance", flow_targets)
    with pytest.raises(ValueError, match="channel-first"):
        t({"instance": np.zeros((2, 8, 8), np.int32)})
    assert build_representation("border").target_transform() is None
