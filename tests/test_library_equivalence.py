"""Where medseg now calls a library instead of its own code, the library gives the same result.

Each reference below is medseg's former hand-written implementation, kept here as the specification.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage as ndi

from medseg.postprocess import _relabel_sequential
from medseg.transforms import PercentileNormalize, build_normalization
from medseg.transforms.functional import instances_to_semantic
from tests.transforms.reference import touching_nuclei


def former_cell_border(inst: np.ndarray, border_width: int) -> np.ndarray:
    """Object pixels within ``border_width`` face-neighbour steps of another id (background included)."""
    cross = ndi.generate_binary_structure(inst.ndim, 1)
    hi, lo = inst, inst
    for _ in range(border_width):
        hi = ndi.maximum_filter(hi, footprint=cross, mode="nearest")
        lo = ndi.minimum_filter(lo, footprint=cross, mode="nearest")
    out = (inst > 0).astype(np.uint8)
    out[(inst > 0) & ((hi != inst) | (lo != inst))] = 2
    return out


def former_relabel_sequential(instances: np.ndarray, min_size: int) -> np.ndarray:
    sizes = np.bincount(instances.ravel())
    sizes[0] = 0
    ids = np.flatnonzero(sizes >= max(min_size, 1))
    mapping = np.zeros(len(sizes), dtype=np.uint16 if len(ids) <= 65535 else np.uint32)
    mapping[ids] = np.arange(1, len(ids) + 1)
    return mapping[instances]


def random_instances(shape, seed: int) -> np.ndarray:
    """Touching blobs with random, non-contiguous ids, some touching the image edge."""
    rng = np.random.default_rng(seed)
    inst = touching_nuclei(shape, 12, 6, seed=seed).astype(np.int64)
    ids = np.unique(inst)[1:]
    lut = np.zeros(inst.max() + 1, np.int64)
    lut[ids] = rng.choice(np.arange(1, 10 * len(ids) + 10), len(ids), replace=False)
    return lut[inst]


@pytest.mark.parametrize("shape", [(48, 40), (17, 23, 19)])
@pytest.mark.parametrize("width", [1, 2, 3])
def test_cell_border_class_equals_the_former_filters(shape, width):
    for seed in range(3):
        inst = random_instances(shape, seed)
        ours = instances_to_semantic(inst, "cell_border", width)
        np.testing.assert_array_equal(ours, former_cell_border(inst, width))


@pytest.mark.parametrize("min_size", [0, 1, 5, 40])
def test_relabel_sequential_equals_the_former_lookup_table(min_size):
    for seed in range(3):
        inst = random_instances((64, 48), seed)
        ours, former = _relabel_sequential(inst, min_size), former_relabel_sequential(inst, min_size)
        np.testing.assert_array_equal(ours, former)
        assert ours.dtype == former.dtype


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("shape", [(2, 40, 36), (1, 12, 14, 10)])
def test_percentile_normalisation_equals_the_former_transform(per_channel, shape):
    rng = np.random.default_rng(3)
    gains = np.arange(1, shape[0] + 1, dtype=np.float32).reshape(-1, *[1] * (len(shape) - 1))
    image = rng.gamma(2.0, 300.0, shape).astype(np.float32) * gains  # channels of different brightness
    image[..., :3] = 0.0  # a dark border, as in microscopy
    normalise = build_normalization({"mode": "percentile", "lower": 1.0, "upper": 99.8, "per_channel": per_channel})
    ours = normalise({"image": MetaTensor(torch.from_numpy(image))})["image"]
    former = PercentileNormalize(1.0, 99.8, per_channel=per_channel)(torch.from_numpy(image))
    assert ours.dtype == torch.float32 and isinstance(ours, MetaTensor)
    torch.testing.assert_close(ours.as_tensor(), former, rtol=0, atol=1e-5)
    constant = np.full(shape, 7.0, np.float32)  # degenerate: lower == upper percentile, all zeros either way
    with pytest.warns(Warning, match="Divide by zero"):  # MONAI's note; the output is all zeros, as before
        flat = normalise({"image": MetaTensor(torch.from_numpy(constant))})["image"]
    former_flat = PercentileNormalize(1.0, 99.8, per_channel)(torch.from_numpy(constant))
    torch.testing.assert_close(flat.as_tensor(), former_flat)
