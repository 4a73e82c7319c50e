"""Dictionary transforms (MONAI ``MapTransform``) of medseg: one random draw moves every key together.

Conventions, as MONAI's: ``keys`` and ``allow_missing_keys``; random transforms take ``prob``, draw in
``randomize()`` from their own ``self.R`` (seeded by ``set_random_state``) and then apply that draw
to each key, with a per-key ``mode`` so label-like keys (labels, instance maps, weight maps) use
nearest-neighbour sampling and never get new values.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, RandomizableTransform
from monai.transforms import RandRotate90d as _MonaiRandRotate90d
from monai.utils import convert_to_tensor, ensure_tuple_rep

from medseg.transforms.array import (
    BorderWeightMap,
    ClassWeightMap,
    InstanceToSemantic,
    PercentileNormalize,
    RandColorJitter,
    RandElastic,
    RandOpticalDistortion,
    RandWarp,
)


class BorderWeightMapd(MapTransform):
    """Writes the U-Net border weight map of the instance map at ``keys`` to ``weight_key``.

    Args:
        keys: the instance-map key (one).
        weight_key: where the float32 weight map ``1 H W [D]`` goes.
        class_key: class map used for ``w_c`` (e.g. the semantic target with a border class);
            None: foreground/background of the instance map.
        w0, sigma, class_balance, physical_units: see :class:`~medseg.transforms.array.BorderWeightMap`.
        allow_missing_keys: skip (write nothing) when the instance map is missing.
    """

    backend = BorderWeightMap.backend

    def __init__(
        self,
        keys: KeysCollection = "instance",
        weight_key: str = "weight",
        class_key: str | None = None,
        w0: float = 10.0,
        sigma: float = 5.0,
        class_balance: bool = True,
        physical_units: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"BorderWeightMapd takes one instance-map key, got {self.keys}")
        self.weight_key, self.class_key = weight_key, class_key
        self.op = BorderWeightMap(w0, sigma, class_balance, physical_units)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            classes = d[self.class_key] if self.class_key is not None and self.class_key in d else None
            d[self.weight_key] = self.op(d[key], classes)
        return d


class ClassWeightMapd(MapTransform):
    """Writes the class-balance weight map ``w_c`` of the class map at ``keys`` to ``weight_key``
    (the weight map of semantic datasets, which have no instances for the border term)."""

    backend = ClassWeightMap.backend

    def __init__(
        self,
        keys: KeysCollection = "label",
        weight_key: str = "weight",
        class_balance: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"ClassWeightMapd takes one label key, got {self.keys}")
        self.weight_key = weight_key
        self.op = ClassWeightMap(class_balance)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.weight_key] = self.op(d[key])
        return d


class InstanceToSemanticd(MapTransform):
    """Writes the semantic target of the instance map at ``keys`` to ``label_key``.

    Args:
        keys: the instance-map key (one).
        label_key: output key (may be an existing key, which is replaced).
        mode, border_width: see :class:`~medseg.transforms.array.InstanceToSemantic`.
    """

    backend = InstanceToSemantic.backend

    def __init__(
        self,
        keys: KeysCollection = "instance",
        label_key: str = "label",
        mode: str = "cell_border",
        border_width: int = 1,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"InstanceToSemanticd takes one instance-map key, got {self.keys}")
        self.label_key = label_key
        self.op = InstanceToSemantic(mode, border_width)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.label_key] = self.op(d[key])
        return d


class PercentileNormalized(MapTransform):
    """Dictionary version of :class:`~medseg.transforms.array.PercentileNormalize`."""

    backend = PercentileNormalize.backend

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 1.0,
        upper: float = 99.8,
        per_channel: bool = True,
        nonzero: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.op = PercentileNormalize(lower, upper, per_channel, nonzero)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.op(d[key])
        return d


class _RandWarpd(RandomizableTransform, MapTransform):
    """One random warp drawn from the first present key's shape and applied to every key."""

    def __init__(self, keys, warp: RandWarp, prob, mode, padding_mode, allow_missing_keys):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.warp = warp
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.warp.set_random_state(state=self.R)  # one stream: the same seed twice would correlate draws
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize(None)
        first = self.first_key(d)
        if not self._do_transform or first == ():
            for key in self.key_iterator(d):
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
            return d
        shape = tuple(d[first].shape[1:])
        self.warp.randomize(shape)
        coords = self.warp.coords(shape)
        for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
            if tuple(d[key].shape[1:]) != shape:
                raise ValueError(f"'{key}' has spatial shape {tuple(d[key].shape[1:])}, '{first}' has {shape}")
            d[key] = self.warp.apply(d[key], coords, mode, padding_mode)
        return d


class RandElasticd(_RandWarpd):
    """Random elastic deformation of every key, 2D and 3D (see :class:`~medseg.transforms.array.RandElastic`).

    A coarse random displacement field, cubic-upsampled and applied with one ``grid_sample`` per key;
    several times faster than MONAI's ``Rand3DElasticd`` (which smooths a full-resolution random
    field) and equivalent to ``Rand2DElasticd`` without its affine part.

    Args:
        keys: keys to warp, e.g. ``("image", "label", "instance", "weight")``.
        prob, spacing, magnitude: see :class:`~medseg.transforms.array.RandElastic`.
        mode: per key (or one for all): ``"bilinear"`` for images, ``"nearest"`` for label-like keys.
        padding_mode: ``"reflection"`` (mirror), ``"border"`` or ``"zeros"``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        spacing: float | Sequence[float] = 32.0,
        magnitude: tuple[float, float] = (1.0, 4.0),
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "reflection",
        allow_missing_keys: bool = False,
    ):
        warp = RandElastic(1.0, spacing, magnitude)
        super().__init__(keys, warp, prob, mode, padding_mode, allow_missing_keys)


class RandOpticalDistortiond(_RandWarpd):
    """Random barrel/pincushion distortion of every key, 2D and 3D (MONAI has none).

    Args:
        keys: keys to warp.
        prob, distort_limit, shift_limit: see :class:`~medseg.transforms.array.RandOpticalDistortion`.
        mode, padding_mode: as in :class:`RandElasticd`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        distort_limit: float | tuple[float, float] = 0.1,
        shift_limit: float | tuple[float, float] = 0.1,
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "reflection",
        allow_missing_keys: bool = False,
    ):
        warp = RandOpticalDistortion(1.0, distort_limit, shift_limit)
        super().__init__(keys, warp, prob, mode, padding_mode, allow_missing_keys)


class RandColorJitterd(RandomizableTransform, MapTransform):
    """Random colour jitter with one draw for all ``keys`` (images only; labels are not touched).

    Args:
        keys: image keys.
        prob, brightness, contrast, saturation, hue: see :class:`~medseg.transforms.array.RandColorJitter`.
    """

    backend = RandColorJitter.backend

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.05,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.jitter = RandColorJitter(1.0, brightness, contrast, saturation, hue)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.jitter.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            self.jitter.randomize()
        for key in self.key_iterator(d):
            if self._do_transform:
                d[key] = self.jitter(d[key], randomize=False)
            else:
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
        return d


class RandRot90d(_MonaiRandRotate90d):
    """MONAI's ``RandRotate90d`` that keeps the shape: on a non-square plane only 180 degrees are used,
    so patches of a batch still stack (a 90-degree turn of an H x W patch would give W x H)."""

    def __call__(self, data: Mapping[Hashable, object], lazy: bool | None = None):
        first = self.first_key(dict(data))
        self._square = first == () or _is_square(data[first].shape[1:], self.spatial_axes)
        return super().__call__(data, lazy)

    def randomize(self, data=None) -> None:
        super().randomize(data)
        if not getattr(self, "_square", True) and self._rand_k % 2:
            self._rand_k = 2


def _is_square(spatial_shape: Sequence[int], axes: Sequence[int]) -> bool:
    return spatial_shape[axes[0]] == spatial_shape[axes[1]]
