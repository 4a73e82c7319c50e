"""Post-processing of perfect targets recovers the reference instances; loss terms; the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.errors import ConfigError
from medseg.instances import REPRESENTATIONS, build_representation, tune_thresholds
from medseg.instances.base import central_difference, label_markers, masked_mse, msge
from medseg.metrics import instance_metrics
from medseg.transforms.functional import instances_to_semantic
from tests.instances.clusters import one_hot, touches, touching_cells

CLUSTERS = {
    "2d": touching_cells((96, 112), 16, 9.0, seed=4),
    "3d": touching_cells((36, 40, 34), 9, 7.0, seed=5),
}


def perfect(rep, inst, mode="cell_border"):
    classes = instances_to_semantic(inst, mode, rep.border_width)
    probs = one_hot(classes, 3 if mode == "cell_border" else 2)
    return probs, rep.targets(inst)


@pytest.mark.parametrize("dims", ["2d", "3d"])
@pytest.mark.parametrize("name", ["border", "distance", "flows"])
def test_perfect_targets_give_back_the_instances(name, dims):
    inst = CLUSTERS[dims]
    assert touches(inst) and inst.max() >= 8
    assert ndimage.label(inst > 0)[1] < inst.max() - 2  # connected components alone would merge nuclei
    rep = build_representation(name)
    probs, reg = perfect(rep, inst)
    pred = rep.postprocess(probs, reg, min_size=8)  # flows then drops cores under 16 voxels: none of these
    scores = instance_metrics(pred, inst, thresholds=[0.9])
    assert scores["ap_90"] == 1.0, scores
    assert pred.shape == inst.shape and np.array_equal(pred > 0, inst > 0)


@pytest.mark.parametrize("name", ["distance", "flows"])
def test_foreground_only_classes_work_too(name):
    inst = CLUSTERS["2d"]
    rep = build_representation(name)
    probs, reg = perfect(rep, inst, mode="foreground")
    assert instance_metrics(rep.postprocess(probs, reg, min_size=0), inst, thresholds=[0.9])["ap_90"] == 1.0


def test_postprocessing_keeps_objects_without_a_marker_and_drops_small_ones():
    inst = np.zeros((40, 40), np.int32)
    inst[5:25, 5:25], inst[30:33, 30:33] = 1, 2
    rep = build_representation("distance")
    probs, reg = perfect(rep, inst, mode="foreground")
    reg[0][inst == 2] = 0.0  # no core predicted in the small object: still an instance
    assert rep.postprocess(probs, reg, min_size=0).max() == 2
    assert rep.postprocess(probs, reg, min_size=10).max() == 1  # 9 pixels < 10


def test_empty_prediction_and_threshold_errors():
    rep = build_representation("flows")
    probs = np.zeros((2, 16, 16), np.float32)
    probs[0] = 1
    out = rep.postprocess(probs, np.zeros((2, 16, 16), np.float32))
    assert out.shape == (16, 16) and out.max() == 0 and out.dtype == np.uint16
    with pytest.raises(ValueError, match="expected one of: foreground, marker_size, slope"):
        rep.postprocess(probs, np.zeros((2, 16, 16), np.float32), sharpness=1)
    with pytest.raises(ValueError, match="2 regression channels"):
        rep.postprocess(probs, np.zeros((1, 16, 16), np.float32))


def test_registry_lists_names_and_options():
    assert REPRESENTATIONS.names() == ["border", "distance", "flows"]
    with pytest.raises(ConfigError, match="border, distance, flows") as err:
        build_representation("stardist")
    assert err.value.key == "data.instance_target"
    with pytest.raises(ConfigError, match="border_width") as err:
        build_representation("flows", {"width": 2})
    assert err.value.key == "instances.width"
    with pytest.raises(ConfigError, match="border_width"):
        build_representation("distance", {"border_width": 0})
    rep = build_representation("flows", {"border_width": 2, "msge_weight": 0.5})
    assert rep.regression_channels(3) == 3 and rep.vector_axes(2) == [0, 1]
    assert build_representation("distance").regression_channels(3) == 1
    assert build_representation("border").regression_channels(2) == 0
    # each representation's own loss weights unless the config sets them (None = not set)
    assert (rep.mse_weight, rep.msge_weight) == (3.0, 0.5)
    assert build_representation("distance", {"mse_weight": None}).mse_weight == 1.0
    assert build_representation("flows", {"mse_weight": 1.0, "msge_weight": None}).msge_weight == 1.0


def test_central_difference_matches_numpy():
    x = torch.randn(2, 3, 7, 9, 5)
    for axis in range(3):
        want = np.gradient(x.numpy(), axis=2 + axis)
        np.testing.assert_allclose(central_difference(x, axis).numpy(), want, atol=1e-6)


@pytest.mark.parametrize("name", ["distance", "flows"])
def test_loss_terms_prefer_the_truth(name):
    inst = CLUSTERS["2d"]
    rep = build_representation(name)
    target = torch.from_numpy(rep.targets(inst))[None]
    fg = torch.from_numpy(inst > 0)[None, None]
    good = rep.loss_terms(target.clone(), target, fg)
    noisy = target + 0.3 * torch.randn_like(target, generator=None)
    bad = rep.loss_terms(noisy.requires_grad_(), target, fg)
    assert set(good) == ({"mse", "msge"} if name == "flows" else {"mse"})
    for key in good:
        assert float(good[key][1]) == 0.0 and float(bad[key][1].detach()) > 0.0
    sum(w * v for w, v in bad.values()).backward()


def test_msge_is_masked_and_sees_only_each_components_own_axis():
    pred = torch.zeros(1, 2, 8, 8)
    target = torch.zeros(1, 2, 8, 8)
    target[:, 1] = torch.linspace(-1, 1, 8)[:, None]  # component 1 changes along axis 0 only: ignored
    fg = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    assert float(msge(pred, target, fg, [0, 1])) == 0.0
    target[:, 0] = torch.linspace(-1, 1, 8)[:, None]
    assert float(msge(pred, target, fg, [0, 1])) > 0.0
    assert float(msge(pred, target, torch.zeros_like(fg), [0, 1])) == 0.0
    assert float(masked_mse(pred, target, torch.zeros_like(fg))) == 0.0


def test_tuning_finds_thresholds_that_beat_bad_defaults():
    inst = CLUSTERS["2d"]
    rep = build_representation("distance")
    probs, reg = perfect(rep, inst)
    reg = reg * 0.35  # a timid network: no distance reaches the default marker threshold 0.5
    cases = [(probs, reg, inst)]
    result = tune_thresholds(rep, cases, min_size=0)
    assert result.score == max(row["map"] for row in result.table)
    assert result.score > result.default_score
    assert result.thresholds["marker"] < 0.35
    fixed = tune_thresholds(rep, cases, min_size=0, fixed={"marker": 0.5})
    assert all(row["marker"] == 0.5 for row in fixed.table) and fixed.score == fixed.default_score
    assert np.isnan(tune_thresholds(rep, [], min_size=0).score)


@pytest.mark.parametrize("name", ["distance", "flows"])
def test_a_border_class_places_the_boundary_between_touching_objects(name):
    # two touching objects, A = columns 0..11 and B = 12..29; the regression's valley lies at column 15 (a
    # network unsure where the border is), the border class says column 12
    inst = np.zeros((20, 30), np.int32)
    inst[:, :12], inst[:, 12:] = 1, 2
    x = np.arange(30, dtype=np.float32)
    if name == "distance":
        profile = np.where(x < 15, 1 - np.abs(x - 4) / 14, 1 - np.abs(x - 26) / 14)
        reg = np.broadcast_to(profile, inst.shape)[None].astype(np.float32)
    else:  # offsets from centres at columns 6 and 23, falling from +0.83 to -0.83 over columns 11..17
        reg = np.zeros((2, *inst.shape), np.float32)
        reg[0] = ((np.arange(20, dtype=np.float32) - 9.5) / 9.5)[:, None]
        reg[1] = np.interp(x, [0, 11, 17, 29], [-1, 5 / 6, -5 / 6, 1])
    rep = build_representation(name)
    probs = np.zeros((3, *inst.shape), np.float32)
    probs[1] = 1.0
    probs[1][:, 12], probs[2][:, 12] = 0.0, 1.0
    with_border = rep.postprocess(probs, reg, min_size=0)
    assert instance_metrics(with_border, inst, thresholds=[0.9])["ap_90"] == 1.0
    fg_only = np.stack([probs[0], probs[1] + probs[2]])
    without = rep.postprocess(fg_only, reg, min_size=0)
    assert without.max() == 2 and instance_metrics(without, inst, thresholds=[0.9])["ap_90"] < 1.0


def test_flows_drops_small_noisy_markers():
    inst = CLUSTERS["2d"]
    rep = build_representation("flows")
    probs, reg = perfect(rep, inst)
    noisy = reg + np.random.default_rng(0).normal(0.0, 0.25, reg.shape).astype(np.float32)
    counts = {size: int(rep.postprocess(probs, noisy, min_size=8, slope=0.0, marker_size=size).max())
              for size in (0.0, 2.0)}
    assert counts[0.0] > inst.max() + 2  # noise cores split nuclei
    assert abs(counts[2.0] - inst.max()) < counts[0.0] - inst.max()


def test_label_markers_drops_small_regions():
    cores = np.zeros((12, 12), bool)
    cores[1:5, 1:5], cores[8:10, 8:9] = True, True
    assert label_markers(cores).max() == 2
    assert np.array_equal(label_markers(cores, min_voxels=3), ndimage.label(cores[:, :] & (np.arange(12) < 6))[0])


def test_flows_tuning_grid_scales_with_the_objects():
    rep = build_representation("flows")
    small = touching_cells((80, 90), 6, 8.0, seed=1)
    large = np.kron(small, np.ones((2, 2), small.dtype))  # the same objects, twice as wide
    grid_small, grid_large = rep.tuning_grid([small], min_size=8), rep.tuning_grid([large], min_size=8)
    assert grid_small["foreground"] == grid_large["foreground"] == rep.grid["foreground"]
    assert grid_small["smooth"][0] == 0.0 and len(grid_small["smooth"]) == len(grid_large["smooth"])
    np.testing.assert_allclose(grid_large["smooth"], 2 * np.asarray(grid_small["smooth"]), atol=0.11)
    np.testing.assert_allclose(grid_large["marker_size"], 4 * np.asarray(grid_small["marker_size"]), rtol=0.05,
                               atol=0.21)
    assert rep.tuning_grid([np.zeros((8, 8), np.int32)]) == rep.grid  # no objects: the fixed grid


def test_flows_tuning_removes_the_larger_noise_cores_of_large_objects():
    # nuclei ~40 px across with a smoothly noisy field: its spurious cores are larger than any marker_size of
    # the fixed grid (made for ~18 px nuclei) but not of the grid scaled to the objects
    class FixedGrid(type(build_representation("flows"))):
        def tuning_grid(self, references, min_size=8):
            return dict(self.grid)

    rep = build_representation("flows")
    inst = touching_cells((150, 160), 9, 20.0, seed=1)
    probs = one_hot(instances_to_semantic(inst, "cell_border", 1), 3)
    rng = np.random.default_rng(1)
    noise = np.stack([ndimage.gaussian_filter(rng.normal(0.0, 1.0, inst.shape), 3.0) for _ in range(2)])
    cases = [(probs, (rep.targets(inst) + noise / noise.std()).astype(np.float32), inst)]
    scaled, fixed = tune_thresholds(rep, cases, min_size=8), tune_thresholds(FixedGrid(), cases, min_size=8)
    assert scaled.thresholds["marker_size"] > max(rep.grid["marker_size"])
    assert scaled.score >= 0.95 and scaled.score > fixed.score + 0.1
