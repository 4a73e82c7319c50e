"""Topology, patch, batch and features fitted to a memory budget and a time budget, from measured steps.

The search's rules are described in :mod:`medseg.planning.planner`; every candidate is priced by
:class:`medseg.planning.probe.StepProbe` (measured, not assumed).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from medseg.errors import ConfigError
from medseg.planning.probe import StepCost, StepProbe

log = logging.getLogger(__name__)

MIN_BOTTLENECK = 4  # voxels per axis kept at the coarsest level (pooling stops before going below)
MAX_DEPTH = {2: 7, 3: 5}
BATCH_DATASET_SHARE = 0.05  # a batch covers at most this share of the dataset's voxels (nnU-Net)
FEATURES = 32
MIN_FEATURES = 8  # the time budget never halves the features below this
MIN_STEPS = 250  # with --hours: at least one nnU-Net epoch of steps, else the step is made cheaper


# -- topology ------------------------------------------------------------------------------------------


def topology(patch: list[int], spacing: list[float], max_depth: int) -> tuple[list[list[int]], list[list[int]]]:
    """Per-axis pooling strides (one entry per level) and kernel sizes (one per level, bottleneck included).

    An axis is pooled while it keeps at least :data:`MIN_BOTTLENECK` voxels and its current spacing is at
    most twice the finest current spacing; its kernel is 3 under the same spacing condition, else 1.
    """
    size, sp = list(patch), list(spacing)
    strides: list[list[int]] = []
    kernels: list[list[int]] = []
    while True:
        finest = min(sp)
        fine = [s <= 2 * finest * (1 + 1e-6) for s in sp]
        kernels.append([3 if f else 1 for f in fine])
        step = [2 if f and n // 2 >= MIN_BOTTLENECK else 1 for f, n in zip(fine, size)]
        if max(step) == 1 or len(strides) == max_depth:
            return strides, kernels
        strides.append(step)
        size = [n // f for n, f in zip(size, step)]
        sp = [s * f for s, f in zip(sp, step)]


def _total(strides: list[list[int]], dims: int) -> list[int]:
    return [int(np.prod([s[a] for s in strides])) if strides else 1 for a in range(dims)]


def network_params(model: str, features: int, strides, kernels) -> dict[str, Any]:
    params = {"features": features, "depth": len(strides), "strides": strides}
    if model == "segnet":  # one kernel size per stage; the bottleneck has no convolutions
        return params | {"kernel_sizes": kernels[: len(strides)]}
    params |= {"kernel_sizes": kernels, "norm": "instance", "deep_supervision": True}
    return params


# -- patch and batch from measured step costs ----------------------------------------------------------


class MemoryModel:
    """Bytes of a training step as ``fixed + batch * per_voxel * voxels``, fitted per topology from two
    measured probes at the topology's smallest patch (batch 1 and 2); the final plan is probed exactly."""

    def __init__(self, probe: StepProbe, model: str, features: int, dims: int, in_channels: int, classes: int):
        self.probe, self.model, self.features = probe, model, features
        self.dims, self.in_channels, self.classes = dims, in_channels, classes

    def cost(self, strides, kernels, patch: list[int], batch: int, exact: bool = False) -> StepCost:
        return self.probe.cost(self.model, network_params(self.model, self.features, strides, kernels),
                               spatial_dims=self.dims, in_channels=self.in_channels, num_classes=self.classes,
                               patch=list(patch), batch=batch, exact=exact)

    def fit(self, strides, kernels) -> tuple[float, float]:
        """``(fixed bytes, bytes per voxel of one sample)`` for this topology."""
        smallest = [2 * t for t in _total(strides, self.dims)]
        one, two = (self.cost(strides, kernels, smallest, b).bytes for b in (1, 2))
        per_sample = max(two - one, 1)
        return max(one - per_sample, 0), per_sample / math.prod(smallest)

    def estimate(self, strides, kernels, patch: list[int], batch: int) -> float:
        fixed, per_voxel = self.fit(strides, kernels)
        return fixed + batch * per_voxel * math.prod(patch)


def _divisible(patch: list[int], total: list[int]) -> list[int]:
    return [max(t, n // t * t) for n, t in zip(patch, total)]


def search_patch(median_shape: list[float], spacing: list[float], memory: MemoryModel, budget: float
                 ) -> tuple[list[int], list[list[int]], list[list[int]]] | None:
    """The largest patch (aspect ratio of the median shape) whose step at batch 2 fits ``budget``; None if
    even the smallest does not."""
    dims = len(median_shape)
    patch = [max(MIN_BOTTLENECK, round(m)) for m in median_shape]
    floor = [min(p, 2 * MIN_BOTTLENECK) for p in patch]  # one pooling step must stay possible
    while True:
        strides, kernels = topology(patch, spacing, MAX_DEPTH[dims])
        if not strides:
            return None
        total = _total(strides, dims)
        patch = _divisible(patch, total)
        if memory.estimate(strides, kernels, patch, 2) <= budget:
            return patch, strides, kernels
        # shrink the axis that is largest relative to the median shape (keeps the aspect ratio)
        order = np.argsort([-p / m for p, m in zip(patch, median_shape)])
        axis = next((int(a) for a in order if patch[a] > floor[a]), None)
        if axis is None:
            return None
        step = max(total[axis], patch[axis] // 16 // total[axis] * total[axis])
        patch[axis] = max(floor[axis], patch[axis] - step)


def choose_batch(memory: MemoryModel, strides, kernels, patch: list[int], budget: float, dataset_voxels: float
                 ) -> tuple[int, str]:
    fixed, per_voxel = memory.fit(strides, kernels)
    fits = int((budget - fixed) // (per_voxel * math.prod(patch)))
    cap = int(BATCH_DATASET_SHARE * dataset_voxels // math.prod(patch))
    batch = max(2, min(fits, cap))
    why = (f"{fits} fit the budget, {BATCH_DATASET_SHARE:.0%} of the dataset's voxels allow {cap}; at least 2"
           if fits > cap else f"the most that fit the budget ({fits}); at least 2")
    return batch, why


def fit_plan(memory: MemoryModel, median_shape: list[float], spacing: list[float], budget: float,
             dataset_voxels: float) -> tuple[list[int], int, list, list, StepCost, str]:
    """Patch, batch and topology that fit ``budget``, verified by an exact probe at exactly that patch and batch.

    The search uses the fast estimate; when the exact measure exceeds the budget, the ratio of the two
    (measured) scales the budget the search aims at, and the search runs again.
    """
    target = budget
    for _ in range(4):
        found = search_patch(median_shape, spacing, memory, target)
        if found is None:
            break
        patch, strides, kernels = found
        batch, why = choose_batch(memory, strides, kernels, patch, target, dataset_voxels)
        cost = memory.cost(strides, kernels, patch, batch, exact=True)
        if cost.bytes <= budget:
            return patch, batch, strides, kernels, cost, why
        ratio = cost.bytes / memory.estimate(strides, kernels, patch, batch)
        log.info("measured %.3f GiB at %s x %d, %.2fx the estimate: searching again", cost.bytes / 2**30, patch,
                 batch, ratio)
        target = min(target, budget / ratio) * 0.97
    raise ConfigError("--memory", f"no patch of batch 2 measured under {budget / 2**30:.3f} GiB with "
                                  f"{memory.features} features")


class Fitter:
    """Fits patch, batch and features to the memory budget and, with ``hours``, to the time budget."""

    def __init__(self, probe: StepProbe, model: str, dims: int, in_channels: int, classes: int,
                 median_shape: list[float], spacing: list[float], dataset_voxels: float):
        self.probe, self.model, self.dims, self.in_channels, self.classes = probe, model, dims, in_channels, classes
        self.median_shape, self.spacing, self.dataset_voxels = median_shape, spacing, dataset_voxels
        self.why, self.time_limited = "the memory budget", False

    def memory(self, budget: float, features: int, floor: int = 4) -> tuple:
        """``(patch, batch, strides, kernels, cost, batch note, features)``; features halved (not below
        ``floor``) until one fits."""
        while True:
            memory = MemoryModel(self.probe, self.model, features, self.dims, self.in_channels, self.classes)
            try:
                return (*fit_plan(memory, self.median_shape, self.spacing, budget, self.dataset_voxels), features)
            except ConfigError:
                if features // 2 < floor:
                    raise
                features //= 2

    def in_time(self, budget: float, hours: float | None) -> tuple:
        """The memory fit, made cheaper (features, then patch) until ``MIN_STEPS`` measured steps fit ``hours``."""
        best = self.memory(budget, FEATURES)
        target = budget
        for _ in range(6):
            if hours is None or steps_in(hours, best[4].seconds) >= MIN_STEPS:
                break
            short = steps_in(hours, best[4].seconds) / MIN_STEPS
            if best[6] > MIN_FEATURES:
                found = self.memory(budget, best[6] // 2)
                self.why = f"{MIN_STEPS} steps in --hours {hours:g}"
            else:  # a step's time follows its voxels: shrink the patch's memory target in proportion
                target = min(target, best[4].bytes) * max(short, 0.25)
                try:
                    found = self.memory(target, best[6], floor=best[6])
                except ConfigError:
                    break  # the smallest patch: keep the last fit
                self.time_limited = True
            if found[4].seconds >= best[4].seconds:
                break  # no cheaper step to be had
            best = found
        return best


def steps_in(hours: float, step_seconds: float) -> int:
    return max(1, int(hours * 3600 * 0.9 / step_seconds))  # 10 % left for validation
