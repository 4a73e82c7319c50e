"""Transforms: augmentation and targets as MONAI dictionary transforms, 2D and 3D.

``functional`` (pure ops: labels, warps, colour) and ``weight_map`` (the U-Net border weight map) -> ``array``
(one tensor) -> ``dictionary`` (``...d`` MapTransforms, one random draw for all keys) -> ``presets`` (named
pipelines from config).
"""

from medseg.transforms.array import (
    BorderWeightMap,
    ClassWeightMap,
    InstanceToSemantic,
    PercentileNormalize,
    RandColorJitter,
    RandElastic,
    RandOpticalDistortion,
)
from medseg.transforms.dictionary import (
    BorderWeightMapd,
    ClassWeightMapd,
    InstanceToSemanticd,
    PercentileNormalized,
    RandColorJitterd,
    RandElasticd,
    RandOpticalDistortiond,
    RandRot90d,
)
from medseg.transforms.functional import instances_to_semantic
from medseg.transforms.presets import (
    augmentation_settings,
    build_augmentation,
    build_mirror_pad,
    build_normalization,
    build_preprocessing,
    preset_parameters,
    preview_samples,
)
from medseg.transforms.weight_map import border_weight_map, class_balance_map

__all__ = [
    "BorderWeightMap",
    "BorderWeightMapd",
    "ClassWeightMap",
    "ClassWeightMapd",
    "InstanceToSemantic",
    "InstanceToSemanticd",
    "PercentileNormalize",
    "PercentileNormalized",
    "RandColorJitter",
    "RandColorJitterd",
    "RandElastic",
    "RandElasticd",
    "RandOpticalDistortion",
    "RandOpticalDistortiond",
    "RandRot90d",
    "augmentation_settings",
    "border_weight_map",
    "build_augmentation",
    "build_mirror_pad",
    "build_normalization",
    "build_preprocessing",
    "class_balance_map",
    "instances_to_semantic",
    "preset_parameters",
    "preview_samples",
]
