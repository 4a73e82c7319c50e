"""Derive an experiment config from a dataset fingerprint and the machine, and say why for every value.

nnU-Net's recipe (Isensee et al. 2021, ``default_experiment_planner.py``), with medseg's own parts:

- target spacing: the median spacing; for anisotropic data (largest / smallest median spacing > 3) the
  low-resolution axis takes the 10th percentile of its spacings; no resampling when every case already has
  one spacing (2D microscopy, uniform scans).
- normalisation: CT -> clip to the foreground 0.5/99.5 percentiles, z-score with the foreground mean/std;
  8/16-bit 2D microscopy -> per-image percentiles; else per-image z-score.
- topology: pool an axis while it keeps >= 4 voxels and its spacing is at most twice the finest one (thin
  in-plane axes are pooled first until the slice axis catches up); 3-voxel kernels on such axes, 1 across
  coarse ones.
- patch and batch size: start at the median image shape (at the target spacing) and shrink the axis largest
  relative to that shape until a MEASURED training step at batch 2 fits the memory budget
  (:mod:`medseg.planning.probe`), then the largest batch that fits (at most 5 % of the dataset's voxels per
  batch, nnU-Net's cap, at least 2), verified by an exact probe at the final patch and batch (on CPU the peak
  resident memory of a fresh process), whose ratio to the estimate corrects the search when it does not fit.
- instance data (cells): the weight map's sigma and the smallest kept object scale with the measured object
  diameter (the U-Net paper's sigma = 5 px suits ~25 px cells); the representation follows how often
  objects touch.
- time budget (``hours``, medseg's own): when the measured step leaves fewer than ``MIN_STEPS`` training
  steps in the budget, a network trained that briefly learns little, so the step is made cheaper first:
  features halved (down to 8), then the patch shrunk in proportion to the missing steps (a step's time
  follows its voxels), each choice measured again. nnU-Net plans for the GPU it assumes and has no budget.
- schedule: epochs from ``hours`` and the measured step time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medseg.config import DataConfig, ExperimentConfig, validate_config
from medseg.errors import ConfigError
from medseg.planning.fingerprint import Fingerprint
from medseg.planning.fitting import (
    FEATURES,
    MIN_BOTTLENECK,
    MIN_STEPS,
    Fitter,
    network_params,
    steps_in,
)
from medseg.planning.probe import StepCost, StepProbe

log = logging.getLogger(__name__)

ANISOTROPY = 3.0  # largest / smallest spacing above which the low-res axis is treated as nnU-Net does
ITERATIONS_PER_EPOCH = 250  # nnU-Net's epoch
DEFAULT_EPOCHS = 1000  # nnU-Net's schedule when no time budget is given
REFERENCE_DIAMETER = 25.0  # px: the U-Net paper's w0=10, sigma=5 were chosen for cells about this size


@dataclass
class Plan:
    """A planned experiment: the config mapping to write, why each value, and what was measured."""

    raw: dict[str, Any]  # the config as written (only what the planner decided; the rest are defaults)
    notes: dict[str, str]  # dotted key path -> where the value came from
    config: ExperimentConfig  # ``raw`` validated
    fingerprint: Fingerprint
    cost: StepCost  # measured at the planned patch and batch
    budget_bytes: int
    summary: list[tuple[str, str]] = field(default_factory=list)  # rows for the printed table


class _Draft:
    """Collects values and their notes at dotted key paths."""

    def __init__(self):
        self.raw: dict[str, Any] = {}
        self.notes: dict[str, str] = {}

    def set(self, path: str, value: Any, note: str | None = None) -> None:
        *parents, last = path.split(".")
        node = self.raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
        if note:
            self.notes[path] = note


def _fmt(values) -> str:
    return " x ".join(f"{v:g}" for v in values)


# -- spacing and normalisation -------------------------------------------------------------------------


def target_spacing(fp: Fingerprint) -> tuple[list[float] | None, list[float], str]:
    """``(data.spacing or None, the spacing training sees, note)``."""
    spacings = np.array([c.spacing for c in fp.cases], dtype=float)
    median = np.median(spacings, axis=0)
    target = median.copy()
    note = f"median spacing of {len(fp.cases)} cases"
    if median.max() / median.min() > ANISOTROPY:
        axis = int(np.argmax(median))
        target[axis] = np.percentile(spacings[:, axis], 10)
        note = (f"anisotropic (median {_fmt(median)}, ratio {median.max() / median.min():.1f} > {ANISOTROPY:g}): "
                f"in-plane median, axis {axis} its 10th percentile")
    uniform = np.allclose(spacings, spacings[0], rtol=1e-3)
    if uniform and np.allclose(target, spacings[0], rtol=1e-3):
        what = "2D images of one spacing (microscopy)" if fp.spatial_dims == 2 else "every case has one spacing"
        return None, [float(s) for s in spacings[0]], f"no resampling: {what}"
    return [round(float(s), 4) for s in target], [float(s) for s in target], note


def normalisation(fp: Fingerprint) -> tuple[dict[str, Any], str]:
    if fp.modality == "CT" and len(fp.channels) == 1:
        c = fp.channels[0]
        return (
            {"mode": "ct", "window": [round(c.percentile_00_5, 2), round(c.percentile_99_5, 2)],
             "mean": round(c.mean, 4), "std": round(max(c.std, 1e-6), 4)},
            "CT: clip to the foreground 0.5/99.5 percentiles, z-score with the foreground mean/std (fingerprint)",
        )
    if fp.spatial_dims == 2 and all(c.bits in (8, 16) for c in fp.channels):
        bits = "/".join(sorted({str(c.bits) for c in fp.channels}))
        return ({"mode": "percentile", "lower": 1.0, "upper": 99.8, "per_channel": True},
                f"{bits}-bit 2D images: per-image 1..99.8 percentiles (robust to uneven exposure)")
    kinds = ", ".join(sorted({c.modality for c in fp.channels}))
    return {"mode": "zscore", "per_channel": True}, f"{kinds} channels: per-image z-score"


# -- instances and schedule ----------------------------------------------------------------------------


def instance_settings(fp: Fingerprint, draft: _Draft) -> None:
    """Border weight map and post-processing scaled from the measured object size (2D/3D cells)."""
    obj = fp.objects
    if obj is None or not obj.count:
        return
    d, d10 = obj.diameter["median"], obj.diameter["p10"]
    if "instance_target" in DataConfig.model_fields:  # representations (issue 11)
        target, why = (("border", f"objects rarely touch ({obj.touching_share:.0%})") if obj.touching_share < 0.1
                       else ("flows", f"{obj.touching_share:.0%} of objects touch: offset-map markers split them "
                                      "(fewest merges in benchmarks/instances.py); a border class alone merges them"))
        draft.set("data.instance_target", target, why)
    sigma = float(np.clip(5.0 * d / REFERENCE_DIAMETER, 1.0, 25.0))
    draft.set("transforms.weight_map", {"enabled": obj.touching_share > 0, "w0": 10.0, "sigma": round(sigma, 2)},
              f"sigma = 5 px x median object diameter {d:.1f} px / {REFERENCE_DIAMETER:g} px (the U-Net paper's "
              f"cells); on because {obj.touching_share:.0%} of the {obj.count} objects touch"
              if obj.touching_share > 0 else f"sigma from the median diameter {d:.1f} px; off: no object touches")
    unit = math.pi / 4 if fp.spatial_dims == 2 else math.pi / 6  # disc / ball volume per diameter**dims
    smallest = unit * (d10 / 2) ** fp.spatial_dims
    draft.set("inference.min_instance_size", int(max(1, round(smallest))),
              f"an object of half the 10th-percentile diameter ({d10:.1f} px): smaller pieces are noise")


def schedule(hours: float | None, step_seconds: float, draft: _Draft) -> None:
    if hours is None:
        total_h = DEFAULT_EPOCHS * ITERATIONS_PER_EPOCH * step_seconds / 3600
        draft.set("train.epochs", DEFAULT_EPOCHS, f"nnU-Net's schedule; ~{total_h:.1f} h of training steps at the "
                  f"measured {step_seconds:.3f} s/step (plan --hours H to fit a budget)")
        draft.set("train.iterations_per_epoch", ITERATIONS_PER_EPOCH, "nnU-Net's epoch")
        draft.set("train.val_every", 5)
        return
    iterations = steps_in(hours, step_seconds)
    long_run = iterations >= 10 * ITERATIONS_PER_EPOCH
    epochs = iterations // ITERATIONS_PER_EPOCH if long_run else min(10, iterations)
    per_epoch = max(1, iterations // epochs)
    draft.set("train.epochs", epochs, f"{hours:g} h x 90 % / measured {step_seconds:.3f} s per step = {iterations} "
                                      "steps")
    draft.set("train.iterations_per_epoch", per_epoch, f"{iterations} steps in {epochs} epochs")
    val_every = max(1, epochs // 20)
    draft.set("train.val_every", val_every, f"{epochs // val_every} validations over the run (at most about 20)")


def _augmentation(fp: Fingerprint) -> tuple[str, str]:
    if fp.spatial_dims == 3:
        return "lesions3d", "3D scans"
    if len(fp.channels) == 3 and fp.label_kind != "instance":
        return "lesions2d", "2D RGB photographs"
    return "cells2d", "2D microscopy"


def memory_budget(memory_gb: float | None, device: str) -> tuple[int, str]:
    """Bytes the planned training step may use, and where that number came from."""
    if memory_gb is not None:
        if memory_gb <= 0:
            raise ConfigError("--memory", f"expected a positive number of GB, got {memory_gb}")
        return int(memory_gb * 2**30), f"--memory {memory_gb:g} GB"
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        return int(0.85 * total), f"85 % of the GPU's {total / 2**30:.1f} GiB"
    import os

    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(0.25 * available), f"25 % of the {available / 2**30:.1f} GiB of free RAM"


# -- the plan ------------------------------------------------------------------------------------------


def _data_section(fp: Fingerprint, root: str, draft: _Draft) -> tuple[list[float] | None, list[float]]:
    """data.* and the normalisation; returns (data.spacing, the spacing training sees)."""
    dims = fp.spatial_dims
    draft.set("data.root", str(root))
    draft.set("data.spatial_dims", dims, f"{dims}D images (fingerprint of {len(fp.cases)} cases)")
    draft.set("data.label_kind", fp.label_kind)
    if len(fp.cases) >= 2:
        folds = min(5, len(fp.cases))
        draft.set("data.folds", folds, f"{folds}-fold cross-validation: medseg train CONFIG --fold K (K = 0.."
                  f"{folds - 1}), then medseg cv RUNS; medseg predict --model RUNS/fold_* ensembles")
    spacing, seen, spacing_note = target_spacing(fp)
    draft.set("data.spacing", spacing, spacing_note)
    normalize, note = normalisation(fp)
    draft.set("transforms.normalize", normalize, note)
    return spacing, seen


def plan_experiment(fp: Fingerprint, root: str, *, device: str = "cpu", memory_gb: float | None = None,
                    hours: float | None = None, model: str = "unet", probe: StepProbe | None = None,
                    name: str | None = None) -> Plan:
    """Plan an experiment for the dataset at ``root`` described by ``fp`` (see the module docstring).

    Raises:
        ConfigError: the budget fits no patch (``--memory``), or an unknown ``model``.
    """
    probe = probe or StepProbe(device)
    budget, budget_note = memory_budget(memory_gb, device)
    dims, draft = fp.spatial_dims, _Draft()
    draft.set("experiment.name", name or f"{fp.root.rstrip('/').split('/')[-1]}_{model}_planned")
    spacing, seen_spacing = _data_section(fp, root, draft)
    scale = np.array([s / t for s, t in zip(fp.median_spacing, seen_spacing)])
    shapes = np.array([c.shape for c in fp.cases], dtype=float) * scale
    median_shape = [float(v) for v in np.median(shapes, axis=0)]
    classes = 3 if fp.label_kind == "instance" else max(2, len(fp.class_fractions))
    fit = Fitter(probe, model, dims, len(fp.channels), classes, median_shape, seen_spacing,
                  float(shapes.prod(axis=1).sum()))
    patch, batch, strides, kernels, cost, batch_note, features = fit.in_time(budget, hours)
    params = network_params(model, features, strides, kernels)
    aniso = any(len(set(s)) > 1 for s in strides) or any(len(set(k)) > 1 for k in kernels)
    draft.set("model.name", model)
    draft.set("model.params", params,
              f"pool each axis while >= {MIN_BOTTLENECK} voxels remain and its spacing <= 2x the finest; "
              + ("anisotropic strides/kernels; " if aniso else "")
              + (f"features {features}" + (f" (halved from {FEATURES} to fit {fit.why})" if features < FEATURES
                                           else " (nnU-Net)")))
    draft.set("transforms.patch_size", patch,
              f"median shape {_fmt(round(m, 1) for m in median_shape)} at the target spacing, shrunk until a "
              f"measured step at batch 2 fits {budget_note} ({budget / 2**30:.2f} GiB)"
              + (f" and {MIN_STEPS} steps fit --hours" if fit.time_limited else "") + "; divisible by the pooling")
    draft.set("transforms.foreground_ratio", 0.33, "nnU-Net's foreground oversampling")
    preset, why = _augmentation(fp)
    draft.set("transforms.augmentation", {"preset": preset}, why)
    instance_settings(fp, draft)
    draft.set("train.batch_size", batch, batch_note + f"; measured step: {cost.bytes / 2**30:.3f} GiB "
                                                      f"({cost.method}), {cost.seconds:.3f} s on {cost.device}")
    draft.set("train.optimizer", {"name": "sgd", "lr": 0.01, "momentum": 0.99, "nesterov": True,
                                  "weight_decay": 3.0e-5}, "nnU-Net's optimiser")
    draft.set("train.scheduler", {"name": "poly", "power": 0.9})
    draft.set("train.device", device)
    schedule(hours, cost.seconds, draft)
    draft.set("inference", {"overlap": 0.5, "sw_batch_size": batch, "tta": True,
                            **draft.raw.get("inference", {})}, "mirror TTA, half-window overlap (nnU-Net)")
    config = validate_config(draft.raw, "medseg plan")
    return Plan(draft.raw, draft.notes, config, fp, cost, budget, _summary(fp, draft.raw, cost, budget))


def _summary(fp: Fingerprint, raw: dict, cost: StepCost, budget: int) -> list[tuple[str, str]]:
    params = raw["model"]["params"]
    rows = [
        ("cases", f"{len(fp.cases)} ({fp.spatial_dims}D, {fp.label_kind}, {len(fp.channels)} channel(s), "
                  f"{fp.modality})"),
        ("median shape", _fmt(fp.median_shape)),
        ("median spacing", _fmt(round(s, 4) for s in fp.median_spacing)),
        ("target spacing", _fmt(raw["data"]["spacing"]) if raw["data"].get("spacing") else "no resampling"),
        ("normalisation", raw["transforms"]["normalize"]["mode"]),
        ("patch x batch", f"{_fmt(raw['transforms']['patch_size'])} x {raw['train']['batch_size']}"),
        ("network", f"{raw['model']['name']} features {params['features']} depth {params['depth']}"),
        ("strides", " ".join("".join(map(str, s)) for s in params["strides"])),
        ("step (measured)", f"{cost.bytes / 2**30:.3f} of {budget / 2**30:.2f} GiB, {cost.seconds:.3f} s"),
        ("epochs x iterations", f"{raw['train']['epochs']} x {raw['train']['iterations_per_epoch']}"),
    ]
    if fp.objects is not None and fp.objects.count:
        rows.insert(2, ("objects", f"{fp.objects.count}, median diameter {fp.objects.diameter['median']:.1f} px, "
                                   f"{fp.objects.touching_share:.0%} touching"))
    return rows
