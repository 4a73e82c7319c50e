"""Named augmentation pipelines and the deterministic preprocessing, built from config settings.

``build_preprocessing`` runs once per case (cached): normalisation, instance -> semantic target, weight
map. ``build_augmentation`` runs per sample and epoch. The settings and their defaults live in one place,
the pydantic models of :mod:`medseg.config` (``NormalizeConfig``, ``WeightMapConfig``,
``AugmentationParams`` and the named presets ``AUGMENTATION_PRESETS``); the builders here validate what
they are given through those models, so a setting has one definition and one check.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    CopyItemsd,
    DivisiblePadd,
    Identityd,
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandGridDistortiond,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    SpatialPadd,
)

from medseg.config import (
    AugmentationConfig,
    AugmentationParams,
    NormalizeConfig,
    WeightMapConfig,
    validate_section,
)
from medseg.errors import ConfigError
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


def preset_parameters(preset: str, key: str = "transforms.augmentation") -> dict[str, Any]:
    """The full parameter dict of ``preset`` (its values over the :class:`AugmentationParams` defaults)."""
    return validate_section(AugmentationConfig, {"preset": preset}, key).params.model_dump()


def augmentation_settings(
    preset: str, params: Mapping[str, Any] | None, spatial_dims: int, key: str = "transforms.augmentation"
) -> AugmentationParams:
    """``preset`` with ``params`` over it, validated for ``spatial_dims``.

    Raises:
        ConfigError: every problem, at ``<key>.preset`` or ``<key>.params.<name>``.
    """
    settings = validate_section(AugmentationConfig, {"preset": preset, "params": dict(params or {})}, key).params
    _raise_dims_problems(settings, spatial_dims, key)
    return settings


def _raise_dims_problems(settings: AugmentationParams, spatial_dims: int, key: str) -> None:
    problems = [(f"{key}.params.{name}", message) for name, message in settings.dims_problems(spatial_dims)]
    if problems:
        raise ConfigError(*problems[0], others=problems[1:])


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


# -------------------------------------------------------------------------------------------- builders
def build_augmentation(
    preset: str | AugmentationParams,
    params: Mapping[str, Any] | None = None,
    *,
    spatial_dims: int,
    image_key: str = "image",
    label_keys: Sequence[str] = ("label", "instance", "weight"),
    config_key: str = "transforms.augmentation",
) -> Compose:
    """The random augmentation of a preset, ``params`` overriding its defaults.

    Spatial transforms (flips, rot90, rotation/scaling, elastic, grid and optical distortion) move the
    image and all ``label_keys`` with one draw, label-like keys with nearest-neighbour sampling; intensity
    transforms touch the image only. Missing label keys are allowed. A probability of 0 leaves the
    transform out. Seed with ``.set_random_state(seed)``.

    Args:
        preset: a preset name (``params`` override its values), or resolved settings (a config's
            ``transforms.augmentation.params``).

    Raises:
        ConfigError: unknown preset (``<config_key>.preset``) or parameter / invalid value
            (``<config_key>.params.<name>``).
    """
    _check_dims(spatial_dims)
    if isinstance(preset, AugmentationParams):
        settings = preset
        _raise_dims_problems(settings, spatial_dims, config_key)
    else:
        settings = augmentation_settings(preset, params, spatial_dims, config_key)
    keys = [image_key, *label_keys]
    return Compose(_spatial(settings, keys, spatial_dims) + _intensity(settings, image_key))


def _spatial(aug: AugmentationParams, keys: list[str], spatial_dims: int) -> list[MapTransform]:
    """Spatial transforms of every key with one draw; label-like keys (all but the first) sampled nearest."""
    warp = {"mode": ["bilinear"] + ["nearest"] * (len(keys) - 1), "padding_mode": aug.padding_mode}
    warp["allow_missing_keys"] = True
    out: list[MapTransform] = []
    if aug.flip_prob > 0:
        for axis in range(spatial_dims) if aug.flip_axes is None else aug.flip_axes:
            out.append(RandFlipd(keys, prob=aug.flip_prob, spatial_axis=axis, allow_missing_keys=True))
    if aug.rot90_prob > 0:
        out.append(RandRot90d(keys, prob=aug.rot90_prob, spatial_axes=tuple(aug.rot90_axes), allow_missing_keys=True))
    if aug.affine_prob > 0:
        degrees = aug.rotate_deg if isinstance(aug.rotate_deg, (list, tuple)) else [aug.rotate_deg]
        degrees = degrees * (3 if spatial_dims == 3 and len(degrees) == 1 else 1)
        scale = [(aug.scale_range[0] - 1.0, aug.scale_range[1] - 1.0)] * spatial_dims
        rotate = [math.radians(d) for d in degrees]
        out.append(RandAffined(keys, prob=aug.affine_prob, rotate_range=rotate, scale_range=scale, **warp))
    if aug.elastic_prob > 0:
        spacing = tuple(aug.elastic_spacing) if isinstance(aug.elastic_spacing, list) else aug.elastic_spacing
        out.append(RandElasticd(keys, aug.elastic_prob, spacing, tuple(aug.elastic_magnitude), **warp))
    if aug.grid_prob > 0:
        grid = {"num_cells": aug.grid_cells, "distort_limit": aug.grid_limit}
        out.append(RandGridDistortiond(keys, prob=aug.grid_prob, **grid, **warp))
    if aug.optical_prob > 0:
        out.append(RandOpticalDistortiond(keys, aug.optical_prob, aug.optical_limit, aug.optical_shift, **warp))
    return out


def _intensity(aug: AugmentationParams, key: str) -> list[MapTransform]:
    """Intensity transforms of the image; ranges of factors become MONAI's ``1 + factor`` offsets."""
    out: list[MapTransform] = []
    if aug.brightness_prob > 0:
        lo, hi = aug.brightness_range
        out.append(RandScaleIntensityd(key, factors=(lo - 1.0, hi - 1.0), prob=aug.brightness_prob))
    if aug.contrast_prob > 0:
        lo, hi = aug.contrast_range
        factors = (lo - 1.0, hi - 1.0)
        out.append(RandScaleIntensityFixedMeand(key, factors=factors, preserve_range=True, prob=aug.contrast_prob))
    if aug.gamma_prob > 0:
        out.append(RandAdjustContrastd(key, prob=aug.gamma_prob, gamma=tuple(aug.gamma_range)))
    if aug.jitter_prob > 0:
        jitter = [getattr(aug, f"jitter_{name}") for name in ("brightness", "contrast", "saturation", "hue")]
        out.append(RandColorJitterd(key, aug.jitter_prob, *jitter))
    if aug.blur_prob > 0:
        sigma = tuple(aug.blur_sigma)
        out.append(RandGaussianSmoothd(key, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=aug.blur_prob))
    if aug.noise_prob > 0:
        out.append(RandGaussianNoised(key, prob=aug.noise_prob, mean=0.0, std=aug.noise_std))
    return out


def build_normalization(
    normalize: Mapping[str, Any] | NormalizeConfig | None,
    image_key: str = "image",
    config_key: str = "transforms.normalize",
) -> MapTransform:
    """Intensity normalisation of ``image_key`` (also used alone at prediction time).

    ``normalize``: a :class:`~medseg.config.NormalizeConfig` or its mapping (``{"mode": "percentile" |
    "zscore" | "ct" | "none", "lower", "upper", "window", "per_channel", "nonzero"}``, missing entries take
    its defaults). ``percentile``: the lower..upper percentiles to 0..1, clipped; ``zscore``: zero mean, unit
    std; ``ct``: the HU ``window`` [low, high] to 0..1, clipped, or with ``mean`` and ``std`` clipped to the
    window and then z-scored with them (the planner's foreground statistics, as nnU-Net). ``per_channel``:
    statistics per channel; ``nonzero``: statistics of nonzero voxels only, zeros kept (percentile, zscore).

    Raises:
        ConfigError: at ``<config_key>.<name>``.
    """
    settings = validate_section(NormalizeConfig, normalize, config_key)
    if settings.mode == "percentile" and settings.nonzero:  # MONAI's percentile scaling has no nonzero option
        return PercentileNormalized(image_key, settings.lower, settings.upper, settings.per_channel, nonzero=True)
    if settings.mode == "percentile":
        return ScaleIntensityRangePercentilesd(image_key, settings.lower, settings.upper, b_min=0.0, b_max=1.0,
                                               clip=True, channel_wise=settings.per_channel, dtype=np.float32)
    if settings.mode == "zscore":
        return NormalizeIntensityd(image_key, nonzero=settings.nonzero, channel_wise=settings.per_channel)
    if settings.mode == "ct":
        low, high = settings.window
        if settings.mean is not None:  # clip, then z-score: one linear map of the clipped range
            b_min, b_max = (low - settings.mean) / settings.std, (high - settings.mean) / settings.std
            return ScaleIntensityRanged(image_key, a_min=low, a_max=high, b_min=b_min, b_max=b_max, clip=True)
        return ScaleIntensityRanged(image_key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    return Identityd(image_key)


def build_preprocessing(
    *,
    spatial_dims: int,
    label_kind: str,
    normalize: Mapping[str, Any] | NormalizeConfig | None,
    weight_map: Mapping[str, Any] | WeightMapConfig | None,
    instance_to_semantic: str | None,
    image_key: str = "image",
    label_key: str = "label",
    instance_key: str = "instance",
    weight_key: str = "weight",
    config_key: str = "transforms",
    border_width: int = 1,
) -> Compose:
    """The deterministic, cacheable preprocessing: normalisation, targets and weight map.

    For ``label_kind="instance"`` the loaded ``label_key`` holds instance ids: it is copied to
    ``instance_key``, the semantic target replaces ``label_key`` (``instance_to_semantic``:
    ``"cell_border"`` 0/1/2 with borders separating touching cells, or ``"foreground"`` 0/1, the default
    when None) and, when enabled, ``weight_key`` gets the border weight map
    (:class:`~medseg.transforms.dictionary.BorderWeightMapd`, ``w_c`` from the semantic target). For
    ``label_kind="semantic"`` an enabled weight map is ``w_c`` alone (the border term needs instances);
    ``"none"`` (or None) means no labels: normalisation only. Label keys may be missing (unlabelled images).

    ``border_width``: thickness of the ``cell_border`` border class, pixels.
    ``weight_map``: a :class:`~medseg.config.WeightMapConfig` or its mapping (``{"enabled", "w0", "sigma",
    "class_balance", "physical_units"}``, its defaults for missing entries).

    Raises:
        ConfigError: naming ``<config_key>.normalize.<name>``, ``<config_key>.weight_map.<name>``,
            ``<config_key>.instance_to_semantic`` or ``data.label_kind``.
    """
    _check_dims(spatial_dims)
    steps: list[MapTransform] = [build_normalization(normalize, image_key, f"{config_key}.normalize")]
    weights = validate_section(WeightMapConfig, weight_map, f"{config_key}.weight_map")
    if label_kind == "instance":
        mode = instance_to_semantic or "foreground"
        if mode not in ("cell_border", "foreground"):
            raise ConfigError(
                f"{config_key}.instance_to_semantic", f"expected cell_border, foreground or null; got {mode!r}"
            )
        steps += [
            CopyItemsd(label_key, names=instance_key, allow_missing_keys=True),
            InstanceToSemanticd(instance_key, label_key, mode=mode, border_width=border_width, allow_missing_keys=True),
        ]
        if weights.enabled:
            options = weights.model_dump(exclude={"enabled"})
            steps.append(BorderWeightMapd(instance_key, weight_key, label_key, **options, allow_missing_keys=True))
    elif label_kind == "semantic":
        if instance_to_semantic is not None:
            raise ConfigError(
                f"{config_key}.instance_to_semantic",
                f"only applies to instance labels; this dataset's labels are semantic (got {instance_to_semantic!r})",
            )
        if weights.enabled:
            steps.append(ClassWeightMapd(label_key, weight_key, weights.class_balance, allow_missing_keys=True))
    elif label_kind not in (None, "none"):
        raise ConfigError("data.label_kind", f"expected 'semantic', 'instance' or 'none', got {label_kind!r}")
    return Compose(steps)


def build_mirror_pad(
    spatial_size: Sequence[int] | None = None,
    keys: Sequence[str] = ("image", "label", "instance", "weight"),
    divisible: int | None = None,
) -> MapTransform:
    """Mirror padding of every key (labels too: nothing is interpolated) where a crop or a network needs
    context beyond the border: up to ``spatial_size`` (e.g. the patch size; larger dims are kept), or to
    a multiple of ``divisible``. Symmetric mirroring works for pads of any size, unlike torch's reflect.
    """
    if (spatial_size is None) == (divisible is None):
        raise ValueError("give exactly one of spatial_size and divisible")
    if divisible is not None:
        return DivisiblePadd(keys, k=divisible, mode="symmetric", allow_missing_keys=True)
    return SpatialPadd(keys, spatial_size=tuple(spatial_size), mode="symmetric", allow_missing_keys=True)


def preview_samples(data: Mapping[str, Any], transform: Callable, n: int, seed: int) -> list[dict]:
    """``n`` augmented copies of one preprocessed sample, the same for the same ``seed``.

    The transform is copied first, so its own random state is left as it was.
    """
    private = copy.deepcopy(transform)
    if hasattr(private, "set_random_state"):
        private.set_random_state(seed)
    return [private(copy.deepcopy(dict(data))) for _ in range(n)]
