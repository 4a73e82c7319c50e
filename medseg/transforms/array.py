"""Array transforms: one channel-first tensor ``C H W [D]`` in, one out, MetaTensor meta kept.

They wrap :mod:`medseg.transforms.functional` and :mod:`medseg.transforms.weight_map` the way MONAI's array
transforms do; the dictionary versions in :mod:`medseg.transforms.dictionary` apply one random draw to several
keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import RandomizableTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple_rep

from medseg.transforms import functional as fn
from medseg.transforms import weight_map


def _single_channel(img: NdarrayOrTensor, what: str) -> None:
    if img.ndim < 3 or img.shape[0] != 1:
        raise ValueError(f"{what} must be channel-first with one channel, [1, H, W(, D)], got shape {tuple(img.shape)}")


def spacing_of(img: NdarrayOrTensor) -> tuple[float, ...]:
    """Pixel spacing of a channel-first MetaTensor (from its affine); ones for plain arrays."""
    nd = img.ndim - 1
    if isinstance(img, MetaTensor):
        return tuple(float(s) for s in np.asarray(img.pixdim, dtype=float)[:nd])
    return (1.0,) * nd


def _range(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """``x`` -> ``(-x, x)``; ``(a, b)`` -> ``(min, max)``."""
    if isinstance(value, (int, float)):
        return (-abs(value), abs(value))
    lo, hi = (float(v) for v in value)
    if lo > hi:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value}")
    return lo, hi


class BorderWeightMap(Transform):
    """U-Net weight map ``w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` from an instance map.

    Args:
        w0: weight of the separation term.
        sigma: its width, in pixels, or in physical units (from the MetaTensor affine) when
            ``physical_units`` is True.
        class_balance: True: ``w_c`` is the inverse class frequency (mean 1, see
            :func:`~medseg.transforms.weight_map.class_balance_map`); False: ``w_c = 1``.
        physical_units: measure distances with the pixel spacing.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, w0: float = 10.0, sigma: float = 5.0, class_balance: bool = True, physical_units: bool = False):
        if w0 < 0 or sigma <= 0:
            raise ValueError(f"w0 must be >= 0 and sigma > 0, got w0={w0}, sigma={sigma}")
        self.w0, self.sigma = float(w0), float(sigma)
        self.class_balance = class_balance
        self.physical_units = physical_units

    def __call__(self, instance: NdarrayOrTensor, classes: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        """``instance``: ids ``1 H W [D]``; ``classes``: optional class map of the same shape for ``w_c``
        (default: foreground/background). Returns float32 ``1 H W [D]`` with ``instance``'s meta."""
        _single_channel(instance, "instance map")
        if classes is not None and tuple(classes.shape) != tuple(instance.shape):
            raise ValueError(f"class map shape {tuple(classes.shape)} != instance map shape {tuple(instance.shape)}")
        weight = weight_map.border_weight_map(
            instance[0],
            w0=self.w0,
            sigma=self.sigma,
            spacing=spacing_of(instance) if self.physical_units else None,
            classes=None if classes is None else classes[0],
            class_balance=self.class_balance,
        )
        return convert_to_dst_type(weight[None], instance, dtype=torch.float32)[0]


class ClassWeightMap(Transform):
    """Class-balance weight map ``w_c`` (or ones) from a class map ``1 H W [D]``; float32, meta kept."""

    backend = [TransformBackends.NUMPY]

    def __init__(self, class_balance: bool = True):
        self.class_balance = class_balance

    def __call__(self, label: NdarrayOrTensor) -> NdarrayOrTensor:
        _single_channel(label, "label map")
        if self.class_balance:
            weight = weight_map.class_balance_map(label[0])[None]
        else:
            weight = np.ones(tuple(label.shape), np.float32)
        return convert_to_dst_type(weight, label, dtype=torch.float32)[0]


class InstanceToSemantic(Transform):
    """Semantic target from instance ids ``1 H W [D]``, in the input's type and dtype.

    Args:
        mode: ``"cell_border"`` (0 background / 1 cell / 2 border) or ``"foreground"`` (0 / 1), see
            :func:`~medseg.transforms.functional.instances_to_semantic`.
        border_width: border thickness in pixels.
    """

    backend = [TransformBackends.NUMPY]
    MODES = ("cell_border", "foreground")

    def __init__(self, mode: str = "cell_border", border_width: int = 1):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode, self.border_width = mode, int(border_width)

    def __call__(self, instance: NdarrayOrTensor) -> NdarrayOrTensor:
        _single_channel(instance, "instance map")
        semantic = fn.instances_to_semantic(instance[0], self.mode, self.border_width)[None]
        return convert_to_dst_type(semantic, instance)[0]


class PercentileNormalize(Transform):
    """Maps the ``lower``..``upper`` percentiles to 0..1 and clips (robust to hot pixels and saturation).

    Args:
        lower, upper: percentiles in [0, 100].
        per_channel: percentiles of each channel separately.
        nonzero: percentiles of nonzero values only, and zeros stay 0 (e.g. skull-stripped MRI);
            MONAI's ``ScaleIntensityRangePercentiles`` has no such option, hence this transform.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, lower: float = 1.0, upper: float = 99.8, per_channel: bool = True, nonzero: bool = False):
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = float(lower), float(upper)
        self.per_channel, self.nonzero = per_channel, nonzero

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        arr = arr.astype(np.float32)
        out = np.empty_like(arr)
        for sel in [slice(c, c + 1) for c in range(arr.shape[0])] if self.per_channel else [slice(None)]:
            chunk = arr[sel]
            values = chunk[chunk != 0] if self.nonzero else chunk.ravel()
            if values.size == 0:
                out[sel] = chunk
                continue
            lo, hi = np.percentile(values, [self.lower, self.upper])
            scaled = np.clip((chunk - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
            out[sel] = np.where(chunk != 0, scaled, 0.0) if self.nonzero else scaled
        return convert_to_dst_type(out, img, dtype=torch.float32)[0]


class RandWarp(RandomizableTransform):
    """Base of random warps: one draw gives sampling coordinates shared by every image it is applied to.

    Subclasses implement ``_draw(spatial_shape)`` (random numbers from ``self.R``) and
    ``coords(spatial_shape)`` (pixel coordinates ``nd *spatial`` to sample, from the last draw).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, prob: float, mode: str = "bilinear", padding_mode: str = "reflection"):
        RandomizableTransform.__init__(self, prob)
        self.mode, self.padding_mode = mode, padding_mode
        self._shape: tuple[int, ...] | None = None

    def _draw(self, spatial_shape: tuple[int, ...]) -> None:
        raise NotImplementedError

    def coords(self, spatial_shape: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        super().randomize(None)
        if self._do_transform:
            self._shape = tuple(int(s) for s in spatial_shape)
            self._draw(self._shape)

    def apply(
        self, img: NdarrayOrTensor, coords: torch.Tensor, mode: str | None = None, padding_mode: str | None = None
    ):
        """Samples ``img`` at ``coords``; the result keeps ``img``'s type, dtype and meta."""
        src = convert_to_tensor(img, track_meta=False)
        out = fn.warp(src, coords, mode or self.mode, padding_mode or self.padding_mode)
        return convert_to_dst_type(out, img)[0]

    def __call__(self, img, mode: str | None = None, padding_mode: str | None = None, randomize: bool = True):
        if randomize:
            self.randomize(img.shape[1:])
        if not self._do_transform:
            return convert_to_tensor(img, track_meta=get_track_meta())
        if tuple(img.shape[1:]) != self._shape:
            raise ValueError(f"image shape {tuple(img.shape[1:])} != shape of the random draw {self._shape}")
        return self.apply(img, self.coords(self._shape), mode, padding_mode)


class RandElastic(RandWarp):
    """Random elastic deformation: a smooth displacement field, cubic-interpolated from control points.

    Args:
        prob: probability of deforming.
        spacing: control point spacing in pixels (one value or one per axis); larger = smoother.
        magnitude: ``(low, high)`` range of the control points' displacement standard deviation, in
            pixels (drawn once per call).
        mode, padding_mode: see :func:`~medseg.transforms.functional.warp`.
    """

    def __init__(
        self,
        prob: float = 0.1,
        spacing: float | Sequence[float] = 32.0,
        magnitude: tuple[float, float] = (1.0, 4.0),
        mode: str = "bilinear",
        padding_mode: str = "reflection",
    ):
        super().__init__(prob, mode, padding_mode)
        self.spacing = spacing
        self.magnitude = _range(magnitude, "magnitude")
        if self.magnitude[0] < 0:
            raise ValueError(f"magnitude must be >= 0, got {magnitude}")
        self._control: np.ndarray | None = None

    def _draw(self, spatial_shape):
        spacing = ensure_tuple_rep(self.spacing, len(spatial_shape))
        grid = [max(2, math.ceil((n - 1) / float(s)) + 1) for n, s in zip(spatial_shape, spacing)]
        scale = self.R.uniform(*self.magnitude)
        self._control = (self.R.standard_normal((len(spatial_shape), *grid)) * scale).astype(np.float32)

    def coords(self, spatial_shape):
        return fn.elastic_coords(spatial_shape, torch.from_numpy(self._control))


class RandOpticalDistortion(RandWarp):
    """Random barrel/pincushion (radial) distortion about a randomly shifted centre, 2D and 3D.

    Args:
        prob: probability of distorting.
        distort_limit: range of the coefficient ``k`` (``x`` -> ``(-x, x)``); ``k > 0`` barrel,
            ``k < 0`` pincushion; at the image border a pixel moves by about ``k`` x half the image.
        shift_limit: range of the centre shift, as a fraction of half the image size per axis.
        mode, padding_mode: see :func:`~medseg.transforms.functional.warp`.
    """

    def __init__(
        self,
        prob: float = 0.1,
        distort_limit: float | tuple[float, float] = 0.1,
        shift_limit: float | tuple[float, float] = 0.1,
        mode: str = "bilinear",
        padding_mode: str = "reflection",
    ):
        super().__init__(prob, mode, padding_mode)
        self.distort_limit = _range(distort_limit, "distort_limit")
        self.shift_limit = _range(shift_limit, "shift_limit")
        self._k = 0.0
        self._shift: np.ndarray | None = None

    def _draw(self, spatial_shape):
        self._k = float(self.R.uniform(*self.distort_limit))
        self._shift = self.R.uniform(*self.shift_limit, size=len(spatial_shape))

    def coords(self, spatial_shape):
        center = [(n - 1) / 2.0 * (1.0 + s) for n, s in zip(spatial_shape, self._shift)]
        return fn.optical_coords(spatial_shape, self._k, center)


class RandColorJitter(RandomizableTransform):
    """Random brightness, contrast, saturation and hue (torchvision-style ranges), for RGB lesion images.

    Factors are drawn from ``[1 - x, 1 + x]`` for brightness/contrast/saturation and the hue shift from
    ``[-hue, hue]`` turns. Saturation and hue need 3 channels and are skipped otherwise; see
    :func:`~medseg.transforms.functional.color_jitter`.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        prob: float = 0.1,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.05,
    ):
        RandomizableTransform.__init__(self, prob)
        for name, value, top in (
            ("brightness", brightness, 1),
            ("contrast", contrast, 1),
            ("saturation", saturation, 1),
            ("hue", hue, 0.5),
        ):
            if not 0 <= value <= top:
                raise ValueError(f"{name} must be in [0, {top}], got {value}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self._factors = (1.0, 1.0, 1.0, 0.0)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            u = self.R.uniform
            self._factors = (
                u(1 - self.brightness, 1 + self.brightness),
                u(1 - self.contrast, 1 + self.contrast),
                u(1 - self.saturation, 1 + self.saturation),
                u(-self.hue, self.hue),
            )

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return convert_to_tensor(img, track_meta=get_track_meta())
        out = fn.color_jitter(convert_to_tensor(img, track_meta=False), *self._factors)
        return convert_to_dst_type(out, img)[0]
