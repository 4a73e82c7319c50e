"""Small synthetic samples shared by the transform tests."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage as ndi

from medseg.transforms.functional import instances_to_semantic
from tests.transforms.reference import touching_nuclei

SHAPES = {2: (64, 64), 3: (24, 32, 32)}


def make_sample(dims: int, seed: int = 0, channels: int = 1, shape=None) -> dict:
    """image (foreground = 1, background = 0, per channel), label (0/1/2), instance, weight = f(instance).

    The weight map is a function of the instance map so a test can check that every label-like key was
    resampled at the same places (nearest neighbour, one draw).
    """
    shape = shape or SHAPES[dims]
    inst = touching_nuclei(shape, n=10 if dims == 2 else 8, radius=9 if dims == 2 else 6, seed=seed)
    label = instances_to_semantic(inst, "cell_border")
    affine = np.diag([0.5] * dims + [1.0])

    def meta_tensor(array, name):
        return MetaTensor(torch.as_tensor(array)[None], affine=torch.as_tensor(affine), meta={"filename_or_obj": name})

    image = meta_tensor((inst > 0).astype(np.float32), "case.tif")
    if channels > 1:
        image = MetaTensor(image.as_tensor().repeat(channels, *([1] * dims)), meta=dict(image.meta))
    return {
        "image": image,
        "label": meta_tensor(label.astype(np.float32), "case_label.tif"),
        "instance": meta_tensor(inst.astype(np.float32), "case_label.tif"),
        "weight": meta_tensor(weight_of(inst), "case_label.tif"),
    }


def weight_of(instance) -> np.ndarray:
    return (np.asarray(instance, dtype=np.float32) * 0.25 + 1.0).astype(np.float32)


def near_boundary(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels within ``width`` steps of a change of ``mask``."""
    grown = ndi.maximum_filter(mask.astype(np.uint8), size=2 * width + 1, mode="nearest")
    shrunk = ndi.minimum_filter(mask.astype(np.uint8), size=2 * width + 1, mode="nearest")
    return grown != shrunk
