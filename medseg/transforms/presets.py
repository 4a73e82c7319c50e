"""Named augmentation pipelines and the deterministic preprocessing, built from config values.

``build_preprocessing`` runs once per case (cached): normalisation, instance -> semantic target, weight
map. ``build_augmentation`` runs per sample and epoch. Every preset is a flat dict of parameters
(:data:`PRESETS`), so any one can be overridden from the config (``transforms.augmentation.params``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
    SpatialPadd,
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

_CELLS2D: dict[str, Any] = {
    "padding_mode": "reflection",  # context beyond the border for every warp: mirror
    "flip_prob": 0.5,  # per axis
    "flip_axes": None,  # None: every spatial axis
    "rot90_prob": 0.75,  # with k in 1..3: all four orientations equally likely
    "rot90_axes": [0, 1],
    "affine_prob": 0.3,
    "rotate_deg": 45.0,  # with rot90 this covers every angle
    "scale_range": [0.85, 1.15],  # per axis
    "elastic_prob": 0.3,
    "elastic_spacing": 32.0,  # control points, pixels
    "elastic_magnitude": [1.0, 4.0],  # displacement std at the control points, pixels
    "grid_prob": 0.15,
    "grid_cells": 5,
    "grid_limit": 0.2,
    "optical_prob": 0.15,
    "optical_limit": 0.2,
    "optical_shift": 0.1,
    "brightness_prob": 0.3,
    "brightness_range": [0.75, 1.25],  # multiplies
    "contrast_prob": 0.3,
    "contrast_range": [0.75, 1.25],  # about the mean, original range kept
    "gamma_prob": 0.3,
    "gamma_range": [0.7, 1.5],
    "noise_prob": 0.15,
    "noise_std": 0.05,  # largest std (drawn in [0, noise_std]); images are normalised to ~[0, 1]
    "blur_prob": 0.15,
    "blur_sigma": [0.5, 1.5],  # pixels
    "jitter_prob": 0.0,
    "jitter_brightness": 0.2,
    "jitter_contrast": 0.2,
    "jitter_saturation": 0.2,
    "jitter_hue": 0.05,  # turns
}

_LESIONS2D = {
    **_CELLS2D,
    "affine_prob": 0.5,
    "scale_range": [0.8, 1.2],
    "elastic_prob": 0.2,
    "elastic_spacing": 64.0,
    "elastic_magnitude": [2.0, 6.0],
    "brightness_prob": 0.0,  # the colour jitter does brightness and contrast for RGB
    "contrast_prob": 0.0,
    "gamma_prob": 0.2,
    "noise_prob": 0.1,
    "noise_std": 0.03,
    "blur_prob": 0.1,
    "jitter_prob": 0.5,
    "jitter_hue": 0.03,
}

_LESIONS3D = {
    **_CELLS2D,
    "rot90_prob": 0.0,  # volumes are often anisotropic; enable for isotropic patches
    "affine_prob": 0.2,
    "rotate_deg": 15.0,
    "elastic_prob": 0.1,
    "elastic_magnitude": [1.0, 3.0],
    "grid_prob": 0.0,
    "optical_prob": 0.0,
    "brightness_prob": 0.15,
    "contrast_prob": 0.15,
    "gamma_prob": 0.15,
    "noise_prob": 0.1,
    "blur_prob": 0.1,
    "blur_sigma": [0.5, 1.0],
}

_NONE = {k: (0.0 if k.endswith("_prob") else v) for k, v in _CELLS2D.items()}

PRESETS: dict[str, dict[str, Any]] = {
    "cells2d": _CELLS2D,
    "lesions2d": _LESIONS2D,
    "lesions3d": _LESIONS3D,
    "none": _NONE,
}

NORMALIZE_DEFAULTS: dict[str, Any] = {
    "mode": "percentile",
    "lower": 1.0,
    "upper": 99.8,
    "window": [-1000.0, 400.0],
    "per_channel": True,
    "nonzero": False,
}
WEIGHT_MAP_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "w0": 10.0,
    "sigma": 5.0,
    "class_balance": True,
    "physical_units": False,
}


def preset_parameters(preset: str, key: str = "transforms.augmentation.preset") -> dict[str, Any]:
    """A copy of the full default parameter dict of ``preset``."""
    if preset not in PRESETS:
        raise ConfigError(key, f"unknown augmentation preset '{preset}'; expected one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[preset])


# ----------------------------------------------------------------------------------------------- checks
# name -> (rule, argument); "_prob" parameters are probabilities. See _problem for the rules.
_RULES: dict[str, tuple[str, Any]] = {
    "padding_mode": ("choice", ("reflection", "border", "zeros")),
    "flip_axes": ("axes", None),
    "rot90_axes": ("axes", 2),
    "rotate_deg": ("rotation", None),
    "scale_range": ("pair", "positive"),
    "elastic_spacing": ("per_axis", "positive"),
    "elastic_magnitude": ("pair", "non-negative"),
    "grid_cells": ("count", None),
    "grid_limit": ("number", (0.0, 0.99)),
    "optical_limit": ("number", (0.0, 1.0)),
    "optical_shift": ("number", (0.0, 1.0)),
    "brightness_range": ("pair", "non-negative"),
    "contrast_range": ("pair", "non-negative"),
    "gamma_range": ("pair", "positive"),
    "noise_std": ("number", (0.0, math.inf)),
    "blur_sigma": ("pair", "non-negative"),
    "jitter_brightness": ("number", (0.0, 1.0)),
    "jitter_contrast": ("number", (0.0, 1.0)),
    "jitter_saturation": ("number", (0.0, 1.0)),
    "jitter_hue": ("number", (0.0, 0.5)),
}
_NORMALIZE_RULES = {
    "mode": ("choice", ("percentile", "zscore", "ct", "none")),
    "lower": ("number", (0.0, 100.0)),
    "upper": ("number", (0.0, 100.0)),
    "window": ("pair", None),
    "per_channel": ("bool", None),
    "nonzero": ("bool", None),
}
_WEIGHT_MAP_RULES = {
    "enabled": ("bool", None),
    "w0": ("number", (0.0, math.inf)),
    "sigma": ("positive", None),
    "class_balance": ("bool", None),
    "physical_units": ("bool", None),
}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _problem(rule: str, arg: Any, v: Any, dims: int) -> str | None:
    """What is wrong with value ``v`` under ``rule`` (None if nothing)."""
    seq = isinstance(v, (list, tuple))
    if rule == "number":
        lo, hi = arg
        ok = _num(v) and lo <= v <= hi
        return None if ok else f"expected a number in [{lo}, {hi}], got {v!r}"
    if rule == "positive":
        return None if _num(v) and v > 0 else f"expected a number > 0, got {v!r}"
    if rule == "pair":
        low = {"positive": "0 < ", "non-negative": "0 <= ", None: ""}[arg]
        ok = seq and len(v) == 2 and all(_num(x) for x in v) and v[0] <= v[1]
        ok = ok and (arg is None or v[0] > 0 or (arg == "non-negative" and v[0] == 0))
        return None if ok else f"expected [low, high] with {low}low <= high, got {v!r}"
    if rule == "per_axis":
        ok = all(_num(x) and x > 0 for x in (v if seq else [v])) and (not seq or len(v) == dims)
        return None if ok else f"expected a number > 0 or a list of {dims}, got {v!r}"
    if rule == "rotation":
        n = 1 if dims == 2 else 3
        ok = all(_num(x) and 0 <= x <= 180 for x in (v if seq else [v])) and (not seq or len(v) == n)
        return None if ok else f"expected degrees in [0, 180], a number or a list of {n} (one per plane), got {v!r}"
    if rule == "axes":
        if v is None and arg is None:
            return None
        ok = seq and all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < dims for a in v)
        ok = ok and len(set(v)) == len(v) and (arg is None or len(v) == arg)
        what = f"{arg} distinct spatial axes" if arg else "distinct spatial axes"
        return None if ok else f"expected {what} in 0..{dims - 1}{'' if arg else ' or null (all)'}, got {v!r}"
    if rule == "choice":
        return None if v in arg else f"expected one of: {', '.join(arg)}; got {v!r}"
    if rule == "count":
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        return None if ok else f"expected an integer >= 1, got {v!r}"
    if rule == "bool":
        return None if isinstance(v, bool) else f"expected true or false, got {v!r}"
    raise AssertionError(rule)


def _checked(values: Mapping[str, Any] | None, defaults: Mapping[str, Any], rules, prefix: str, dims: int = 0):
    """``defaults`` overridden by ``values``; an unknown name or a bad value raises ConfigError."""
    merged = copy.deepcopy(dict(defaults))
    for name, value in (values or {}).items():
        if name not in merged:
            raise ConfigError(f"{prefix}.{name}", f"unknown parameter; expected one of: {', '.join(sorted(merged))}")
        merged[name] = value
    for name, value in merged.items():
        rule, arg = ("number", (0.0, 1.0)) if name.endswith("_prob") else rules[name]
        problem = _problem(rule, arg, value, dims)
        if problem:
            raise ConfigError(f"{prefix}.{name}", problem)
    return merged


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


# -------------------------------------------------------------------------------------------- builders
def build_augmentation(
    preset: str,
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

    Raises:
        ConfigError: unknown preset (``<config_key>.preset``) or parameter / invalid value
            (``<config_key>.params.<name>``).
    """
    _check_dims(spatial_dims)
    defaults = preset_parameters(preset, f"{config_key}.preset")
    p = _checked(params, defaults, _RULES, f"{config_key}.params", spatial_dims)
    keys = [image_key, *label_keys]
    warp = {"mode": ["bilinear"] + ["nearest"] * len(label_keys), "padding_mode": p["padding_mode"]}
    warp["allow_missing_keys"] = True
    out: list[MapTransform] = []
    if p["flip_prob"] > 0:
        for axis in range(spatial_dims) if p["flip_axes"] is None else p["flip_axes"]:
            out.append(RandFlipd(keys, prob=p["flip_prob"], spatial_axis=axis, allow_missing_keys=True))
    if p["rot90_prob"] > 0:
        out.append(RandRot90d(keys, prob=p["rot90_prob"], spatial_axes=tuple(p["rot90_axes"]), allow_missing_keys=True))
    if p["affine_prob"] > 0:
        degrees = p["rotate_deg"] if isinstance(p["rotate_deg"], (list, tuple)) else [p["rotate_deg"]]
        degrees = degrees * (3 if spatial_dims == 3 and len(degrees) == 1 else 1)
        scale = [(p["scale_range"][0] - 1.0, p["scale_range"][1] - 1.0)] * spatial_dims
        rotate = [math.radians(d) for d in degrees]
        out.append(RandAffined(keys, prob=p["affine_prob"], rotate_range=rotate, scale_range=scale, **warp))
    if p["elastic_prob"] > 0:
        spacing = tuple(p["elastic_spacing"]) if isinstance(p["elastic_spacing"], list) else p["elastic_spacing"]
        out.append(RandElasticd(keys, p["elastic_prob"], spacing, tuple(p["elastic_magnitude"]), **warp))
    if p["grid_prob"] > 0:
        grid = {"num_cells": p["grid_cells"], "distort_limit": p["grid_limit"]}
        out.append(RandGridDistortiond(keys, prob=p["grid_prob"], **grid, **warp))
    if p["optical_prob"] > 0:
        out.append(RandOpticalDistortiond(keys, p["optical_prob"], p["optical_limit"], p["optical_shift"], **warp))
    return Compose(out + _intensity(p, image_key))


def _intensity(p: Mapping[str, Any], key: str) -> list[MapTransform]:
    """Intensity transforms of the image; ranges of factors become MONAI's ``1 + factor`` offsets."""
    out: list[MapTransform] = []
    if p["brightness_prob"] > 0:
        lo, hi = p["brightness_range"]
        out.append(RandScaleIntensityd(key, factors=(lo - 1.0, hi - 1.0), prob=p["brightness_prob"]))
    if p["contrast_prob"] > 0:
        lo, hi = p["contrast_range"]
        factors = (lo - 1.0, hi - 1.0)
        out.append(RandScaleIntensityFixedMeand(key, factors=factors, preserve_range=True, prob=p["contrast_prob"]))
    if p["gamma_prob"] > 0:
        out.append(RandAdjustContrastd(key, prob=p["gamma_prob"], gamma=tuple(p["gamma_range"])))
    if p["jitter_prob"] > 0:
        jitter = [p[f"jitter_{n}"] for n in ("brightness", "contrast", "saturation", "hue")]
        out.append(RandColorJitterd(key, p["jitter_prob"], *jitter))
    if p["blur_prob"] > 0:
        sigma = tuple(p["blur_sigma"])
        out.append(RandGaussianSmoothd(key, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=p["blur_prob"]))
    if p["noise_prob"] > 0:
        out.append(RandGaussianNoised(key, prob=p["noise_prob"], mean=0.0, std=p["noise_std"]))
    return out


def build_normalization(
    normalize: Mapping[str, Any] | None, image_key: str = "image", config_key: str = "transforms.normalize"
) -> MapTransform:
    """Intensity normalisation of ``image_key`` (also used alone at prediction time).

    ``normalize``: ``{"mode": "percentile" | "zscore" | "ct" | "none", "lower", "upper", "window",
    "per_channel", "nonzero"}`` (missing entries take :data:`NORMALIZE_DEFAULTS`).
    ``percentile``: the lower..upper percentiles to 0..1, clipped; ``zscore``: zero mean, unit std;
    ``ct``: the HU ``window`` [low, high] to 0..1, clipped. ``per_channel``: statistics per channel;
    ``nonzero``: statistics of nonzero voxels only, zeros kept (percentile, zscore).
    """
    n = _checked(normalize, NORMALIZE_DEFAULTS, _NORMALIZE_RULES, config_key)
    mode = n["mode"]
    if mode == "percentile":
        if n["lower"] >= n["upper"]:
            raise ConfigError(f"{config_key}.upper", f"expected upper > lower ({n['lower']}), got {n['upper']}")
        return PercentileNormalized(image_key, n["lower"], n["upper"], n["per_channel"], n["nonzero"])
    if mode == "zscore":
        return NormalizeIntensityd(image_key, nonzero=n["nonzero"], channel_wise=n["per_channel"])
    if mode == "ct":
        lo, hi = n["window"]
        if lo >= hi:
            raise ConfigError(f"{config_key}.window", f"expected [low, high] with low < high, got {n['window']}")
        return ScaleIntensityRanged(image_key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    return Identityd(image_key)


def build_preprocessing(
    *,
    spatial_dims: int,
    label_kind: str,
    normalize: Mapping[str, Any] | None,
    weight_map: Mapping[str, Any] | None,
    instance_to_semantic: str | None,
    image_key: str = "image",
    label_key: str = "label",
    instance_key: str = "instance",
    weight_key: str = "weight",
    config_key: str = "transforms",
) -> Compose:
    """The deterministic, cacheable preprocessing: normalisation, targets and weight map.

    For ``label_kind="instance"`` the loaded ``label_key`` holds instance ids: it is copied to
    ``instance_key``, the semantic target replaces ``label_key`` (``instance_to_semantic``:
    ``"cell_border"`` 0/1/2 with borders separating touching cells, or ``"foreground"`` 0/1, the default
    when None) and, when enabled, ``weight_key`` gets the border weight map
    (:class:`~medseg.transforms.dictionary.BorderWeightMapd`, ``w_c`` from the semantic target). For
    ``label_kind="semantic"`` an enabled weight map is ``w_c`` alone (the border term needs instances);
    ``"none"`` (or None) means no labels: normalisation only. Label keys may be missing (unlabelled images).

    ``weight_map``: ``{"enabled", "w0", "sigma", "class_balance", "physical_units"}``
    (:data:`WEIGHT_MAP_DEFAULTS` for missing entries).

    Raises:
        ConfigError: naming ``<config_key>.normalize.<name>``, ``<config_key>.weight_map.<name>``,
            ``<config_key>.instance_to_semantic`` or ``data.label_kind``.
    """
    _check_dims(spatial_dims)
    steps: list[MapTransform] = [build_normalization(normalize, image_key, f"{config_key}.normalize")]
    wm = _checked(weight_map, WEIGHT_MAP_DEFAULTS, _WEIGHT_MAP_RULES, f"{config_key}.weight_map")
    if label_kind == "instance":
        mode = instance_to_semantic or "foreground"
        if mode not in ("cell_border", "foreground"):
            raise ConfigError(
                f"{config_key}.instance_to_semantic", f"expected cell_border, foreground or null; got {mode!r}"
            )
        steps += [
            CopyItemsd(label_key, names=instance_key, allow_missing_keys=True),
            InstanceToSemanticd(instance_key, label_key, mode=mode, allow_missing_keys=True),
        ]
        if wm["enabled"]:
            options = {k: wm[k] for k in ("w0", "sigma", "class_balance", "physical_units")}
            steps.append(BorderWeightMapd(instance_key, weight_key, label_key, **options, allow_missing_keys=True))
    elif label_kind == "semantic":
        if instance_to_semantic is not None:
            raise ConfigError(
                f"{config_key}.instance_to_semantic",
                f"only applies to instance labels; this dataset's labels are semantic (got {instance_to_semantic!r})",
            )
        if wm["enabled"]:
            steps.append(ClassWeightMapd(label_key, weight_key, wm["class_balance"], allow_missing_keys=True))
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
    t = copy.deepcopy(transform)
    if hasattr(t, "set_random_state"):
        t.set_random_state(seed)
    return [t(copy.deepcopy(dict(data))) for _ in range(n)]
