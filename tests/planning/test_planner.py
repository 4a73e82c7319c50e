import math

import numpy as np
import pytest

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.planning.fingerprint import CaseFingerprint, ChannelStats, Fingerprint, ObjectStats, fingerprint_dataset
from medseg.planning.fitting import MIN_BOTTLENECK, MIN_FEATURES, MIN_STEPS, topology
from medseg.planning.planner import (
    _Draft,
    instance_settings,
    normalisation,
    plan_experiment,
    target_spacing,
)
from medseg.planning.probe import StepProbe, measure_step_peak_rss
from medseg.planning.render import plan_yaml


def _fp(spacings, shapes=None, modality="other", bits=None, dims=3, objects=None):
    shapes = shapes or [[64] * dims] * len(spacings)
    cases = [CaseFingerprint(f"c{i}", list(sh), list(sp), 0.1) for i, (sp, sh) in enumerate(zip(spacings, shapes))]
    ch = ChannelStats("CT" if modality == "CT" else "x", modality, 40.0, 20.0, -10.0, 120.0, -1000.0, 2000.0,
                      bits is not None, bits)
    return Fingerprint("d", "/data/x", dims, "instance" if objects else "semantic", [ch.name], cases, [ch],
                       {"0": 0.9, "1": 0.1}, objects)


def test_anisotropic_spacing_takes_the_10th_percentile_on_the_coarse_axis():
    spacings = [[0.8, 0.8, z] for z in (2.5, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0)]
    spacing, seen, note = target_spacing(_fp(spacings))
    assert spacing[:2] == [0.8, 0.8]
    assert spacing[2] == pytest.approx(np.percentile([s[2] for s in spacings], 10))
    assert spacing[2] < 5.0 and "anisotropic" in note


def test_isotropic_mixed_spacing_takes_the_median():
    spacing, _, _ = target_spacing(_fp([[1.0, 1.0, 1.0], [1.2, 1.2, 1.5], [0.9, 0.9, 2.0]]))
    assert spacing == [1.0, 1.0, 1.5]


def test_one_spacing_is_not_resampled():
    spacing, seen, note = target_spacing(_fp([[1.0, 1.0]] * 3, dims=2))
    assert spacing is None and seen == [1.0, 1.0] and "microscopy" in note


def test_normalisation_by_modality():
    ct, _ = normalisation(_fp([[1, 1, 1]], modality="CT"))
    assert ct == {"mode": "ct", "window": [-10.0, 120.0], "mean": 40.0, "std": 20.0}
    micro, _ = normalisation(_fp([[1, 1]], dims=2, bits=16))
    assert micro["mode"] == "percentile"
    assert normalisation(_fp([[1, 1, 1]], modality="MR"))[0]["mode"] == "zscore"


@pytest.mark.parametrize("patch, spacing", [([128, 128, 32], [0.8, 0.8, 4.0]), ([40, 40, 10], [0.8, 0.8, 4.0]),
                                            ([96, 160], [1.0, 1.0]), ([64, 64, 64], [1.0, 1.0, 1.0])])
def test_topology_pools_fine_axes_first_down_to_a_small_bottleneck(patch, spacing):
    strides, kernels = topology(patch, spacing, max_depth=7)
    assert len(kernels) == len(strides) + 1
    bottleneck = [p // math.prod(s[a] for s in strides) for a, p in enumerate(patch)]
    for axis, n in enumerate(bottleneck):
        assert n >= MIN_BOTTLENECK
        pooled_more = n // 2 >= MIN_BOTTLENECK
        # either the axis cannot be halved again, or it was too coarse to pool at the last level
        assert not pooled_more or spacing[axis] * math.prod(s[axis] for s in strides) > min(
            sp * math.prod(s[a] for s in strides) for a, sp in enumerate(spacing)) * 2 or len(strides) == 7
    if spacing[2:] == [4.0]:
        assert strides[0] == [2, 2, 1] and kernels[0] == [3, 3, 1]  # slices are not mixed at full resolution


def test_weight_map_sigma_and_min_size_scale_with_the_object_diameter():
    def settings(diameter):
        objects = ObjectStats(50, {"p10": diameter * 0.8, "median": diameter, "p90": diameter * 1.3},
                              {"median": [diameter, diameter]}, 0.4)
        draft = _Draft()
        instance_settings(_fp([[1, 1]], dims=2, objects=objects), draft)
        return draft.raw

    small, large = settings(12.0), settings(50.0)
    assert small["transforms"]["weight_map"]["sigma"] < 5.0 < large["transforms"]["weight_map"]["sigma"]
    assert small["transforms"]["weight_map"]["enabled"]
    assert small["inference"]["min_instance_size"] < large["inference"]["min_instance_size"]


def test_touching_objects_choose_a_shape_aware_representation():
    def chosen(touching_share):
        objects = ObjectStats(50, {"p10": 16.0, "median": 20.0, "p90": 26.0}, {"median": [20.0, 20.0]},
                              touching_share)
        draft = _Draft()
        instance_settings(_fp([[1, 1]], dims=2, objects=objects), draft)
        return draft.raw["data"]["instance_target"]

    assert chosen(0.4) == "flows" and chosen(0.02) == "border"


def test_planned_patch_fits_the_budget_measured(lesions_aniso, tmp_path, probe_cache):
    fp, _ = fingerprint_dataset(lesions_aniso, tmp_path / "fp.json")
    gb = 0.12
    plan = plan_experiment(fp, str(lesions_aniso), memory_gb=gb,
                           probe=StepProbe("cpu", cache=probe_cache, steps=1))
    # the plan's own verification: peak resident memory of a fresh process at the planned patch and batch
    assert plan.cost.method == "peak-rss"
    assert plan.cost.bytes <= plan.budget_bytes == int(gb * 2**30)
    cfg = plan.config  # measured again, independently of the planner's bookkeeping
    again = measure_step_peak_rss(cfg.model.name, cfg.model.params, 3, 1, 2, cfg.transforms.patch_size,
                                  cfg.train.batch_size, steps=1)
    assert again.bytes <= 1.1 * gb * 2**30  # the same measure in another process: within its run-to-run noise
    assert cfg.model.params["strides"][0][2] == 1  # 4 mm slices are not pooled at the first level


def test_written_yaml_loads_to_the_planned_config(cells_2d, tmp_path, probe_cache):
    fp, _ = fingerprint_dataset(cells_2d, tmp_path / "fp.json")
    plan = plan_experiment(fp, str(cells_2d), memory_gb=0.05, hours=0.01,
                           probe=StepProbe("cpu", cache=probe_cache, steps=1, rss=False))
    path = tmp_path / "plan.yaml"
    path.write_text(plan_yaml(plan.raw, plan.notes, ["header"]))
    assert load_config(path) == plan.config
    text = path.read_text()
    for key in ("patch_size", "batch_size", "sigma", "min_instance_size", "epochs"):
        line = next(line for line in text.splitlines() if key in line)
        assert "#" in line, f"{key} has no comment saying where it came from"


def test_a_short_time_budget_makes_the_step_cheaper(cells_2d, tmp_path, probe_cache):
    fp, _ = fingerprint_dataset(cells_2d, tmp_path / "fp.json")
    probe = StepProbe("cpu", cache=probe_cache, steps=2, rss=False)
    free = plan_experiment(fp, str(cells_2d), memory_gb=0.2, probe=probe)
    hours = 0.5 * free.cost.seconds * MIN_STEPS / 3600  # half the time MIN_STEPS steps of the free plan need
    timed = plan_experiment(fp, str(cells_2d), memory_gb=0.2, hours=hours, probe=probe)
    smaller = (timed.config.model.params["features"] < free.config.model.params["features"]
               or math.prod(timed.config.transforms.patch_size) < math.prod(free.config.transforms.patch_size))
    assert smaller and timed.cost.seconds < free.cost.seconds  # both measured by the probe, not assumed
    assert timed.config.model.params["features"] >= MIN_FEATURES
    assert f"{MIN_STEPS} steps" in " ".join(timed.notes.values())  # the config says why


def test_a_budget_too_small_for_any_patch_is_a_clear_error(cells_2d, tmp_path, probe_cache):
    fp, _ = fingerprint_dataset(cells_2d, tmp_path / "fp.json")
    with pytest.raises(ConfigError) as err:
        plan_experiment(fp, str(cells_2d), memory_gb=1e-5,
                        probe=StepProbe("cpu", cache=probe_cache, steps=1, rss=False))
    assert err.value.key == "--memory"
