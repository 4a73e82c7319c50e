"""Building blocks shared by every network: conv-norm-activation, down, up, padding to a valid size.

Every block works in 2D and 3D: ``spatial_dims`` picks ``Conv2d``/``Conv3d`` and friends. Tensors are
``B C H W`` in 2D and ``B C H W D`` in 3D.

Conventions shared by the networks:

- Every convolution has a bias, also before a norm layer: it is redundant there but costs a few
  parameters and keeps the published parameter counts (UNet 31,030,658; SegNet 29.45M) reproducible.
- Pooling and kernels may differ per axis (anisotropic data, e.g. 0.8 x 0.8 x 4 mm): ``strides`` lists, per
  pooling step, a stride of 1 or 2 per axis (default 2 everywhere), ``kernel_sizes`` per resolution level an
  odd kernel size per axis (default 3); an int means the same on every axis (:func:`resolve_strides`,
  :func:`resolve_kernel_sizes`).
- A network whose encoder pools ``depth`` times pads its input at the high end of every axis (replicate
  padding) to a multiple of the product of that axis' strides (``2**depth`` by default) and crops the logits
  back (:func:`pad_to_multiple`, :func:`crop_to`), so any input size works and a logit at index ``i`` still
  belongs to voxel ``i``.
- Invalid arguments raise one :class:`~medseg.errors.InvalidArguments` (a plain ``ValueError``) naming every
  bad argument; the registry turns it into config key paths (``model.params.<name>``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import InvalidArguments

NORMS = ("batch", "instance", "none")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu")
UPSAMPLES = ("transpose", "linear")


# -- checks at the public boundary ---------------------------------------------------------------------
# Each returns what is wrong with one argument (None if nothing); raise_for_arguments reports them all at once.


def int_problem(value: object, minimum: int = 1) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return f"expected an integer >= {minimum}, got {value!r}"
    return None


def choice_problem(value: object, choices: Sequence[str]) -> str | None:
    return None if value in choices else f"expected one of {', '.join(choices)}; got {value!r}"


def bool_problem(value: object) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {value!r}"


def dropout_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        return f"expected a number in [0, 1), got {value!r}"
    return None


def spatial_dims_problem(value: object) -> str | None:
    return None if value in (2, 3) and not isinstance(value, bool) else f"expected 2 or 3, got {value!r}"


def raise_for_arguments(owner: str, **problems: str | None) -> None:
    """Raise :class:`~medseg.errors.InvalidArguments` naming every argument with a problem, if any."""
    found = {name: problem for name, problem in problems.items() if problem is not None}
    if found:
        raise InvalidArguments(owner, found)


def _per_axis(value: object, spatial_dims: int) -> tuple[int, ...] | None:
    """An int (same on every axis) or a list of ``spatial_dims`` ints as a tuple; None if neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * spatial_dims
    if (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == spatial_dims
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return tuple(value)
    return None


def _levels_problem(value: object, levels: object, spatial_dims: object, what: str, ok, expected: str) -> str | None:
    if value is None or int_problem(levels, 1) or spatial_dims_problem(spatial_dims):
        return None  # the default, or nothing to check against (those problems are reported themselves)
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != levels:
        return f"expected a list of {levels} {what} (one per level), each {expected}; got {value!r}"
    for i, entry in enumerate(value):
        axes = _per_axis(entry, spatial_dims)  # type: ignore[arg-type]
        if axes is None or not all(ok(a) for a in axes):
            return f"entry {i}: expected {expected} ({spatial_dims} axes); got {entry!r}"
    return None


def strides_problem(value: object, depth: object, spatial_dims: object) -> str | None:
    """``strides``: None or ``depth`` entries, each 1/2 or a list of 1/2 per axis, halving at least one axis."""
    problem = _levels_problem(value, depth, spatial_dims, "strides", lambda a: a in (1, 2), "1 or 2 or a list of those")
    if problem is None and value is not None:
        for i, entry in enumerate(value):  # type: ignore[union-attr]
            if max(_per_axis(entry, spatial_dims)) == 1:  # type: ignore[arg-type]
                return f"entry {i}: {entry!r} pools no axis; every step must halve at least one axis"
    return problem


def kernel_sizes_problem(value: object, levels: object, spatial_dims: object) -> str | None:
    """``kernel_sizes``: None or ``levels`` entries, each an odd int >= 1 or a list of those per axis."""
    return _levels_problem(value, levels, spatial_dims, "kernel sizes", lambda a: a >= 1 and a % 2 == 1,
                           "an odd integer >= 1 or a list of those")


def resolve_strides(strides: Sequence | None, depth: int, spatial_dims: int) -> list[tuple[int, ...]]:
    """Per pooling step, the stride of every axis (checked by :func:`strides_problem`)."""
    if strides is None:
        return [(2,) * spatial_dims] * depth
    return [_per_axis(s, spatial_dims) for s in strides]  # type: ignore[misc]


def resolve_kernel_sizes(kernel_sizes: Sequence | None, levels: int, spatial_dims: int) -> list[tuple[int, ...]]:
    """Per resolution level, the kernel size of every axis (checked by :func:`kernel_sizes_problem`)."""
    if kernel_sizes is None:
        return [(3,) * spatial_dims] * levels
    return [_per_axis(k, spatial_dims) for k in kernel_sizes]  # type: ignore[misc]


def total_stride(strides: Sequence[Sequence[int]], levels: int) -> tuple[int, ...]:
    """Per axis, the product of the first ``levels`` strides: the size of one cell at ``levels``."""
    return tuple(math.prod(axis) for axis in zip(*strides[:levels])) if levels else (1,) * len(strides[0])


def common_problems(spatial_dims: object, in_channels: object, num_classes: object) -> dict[str, str | None]:
    """Problems of the arguments every network receives from the caller (not from ``model.params``)."""
    return {"spatial_dims": spatial_dims_problem(spatial_dims), "in_channels": int_problem(in_channels),
            "num_classes": int_problem(num_classes)}


def network_problems(
    spatial_dims: object, in_channels: object, num_classes: object, *, features: object, depth: object,
    strides: object, kernel_sizes: object, norm: object, activation: object, dropout: object, kernel_levels: int,
) -> dict[str, str | None]:
    """Problems of the arguments the encoder-decoder networks share; ``kernel_levels`` = how many more
    resolution levels than ``depth`` take a kernel size (UNet: 1, the bottleneck; SegNet: 0)."""
    levels = depth + kernel_levels if isinstance(depth, int) else None
    return {**common_problems(spatial_dims, in_channels, num_classes), "features": int_problem(features),
            "depth": int_problem(depth), "strides": strides_problem(strides, depth, spatial_dims),
            "kernel_sizes": kernel_sizes_problem(kernel_sizes, levels, spatial_dims),
            "norm": choice_problem(norm, NORMS), "activation": choice_problem(activation, ACTIVATIONS),
            "dropout": dropout_problem(dropout)}


# -- layer factories -----------------------------------------------------------------------------------


def conv_layer(spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int | Sequence[int] = 3) -> nn.Module:
    """Same-size convolution (odd ``kernel_size``, an int or one per axis, stride 1) with bias."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    kernel = _per_axis(kernel_size, spatial_dims) or tuple(kernel_size)  # type: ignore[arg-type]
    if len(set(kernel)) == 1:  # an int keeps the module's repr (and its export) as before
        return conv(in_ch, out_ch, kernel[0], padding=kernel[0] // 2)
    return conv(in_ch, out_ch, kernel, padding=tuple(k // 2 for k in kernel))


def norm_layer(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if norm == "instance":
        # affine like nnU-Net; no running stats, so train and eval normalise the same way
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    return nn.Identity()


def act_layer(activation: str) -> nn.Module:
    if activation == "relu":
        return nn.ReLU(inplace=True)
    if activation == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    if activation == "elu":
        return nn.ELU(inplace=True)
    return nn.GELU()


def max_pool(spatial_dims: int, return_indices: bool = False, stride: int | Sequence[int] = 2) -> nn.Module:
    """Max-pool with window = ``stride`` (an int or one per axis; 1 leaves that axis alone)."""
    pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
    stride = stride if isinstance(stride, int) else tuple(stride)
    return pool(stride, stride=stride, return_indices=return_indices)


def max_unpool(x: torch.Tensor, indices: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """Undo a max-pool of window = ``stride`` (one per axis): every value goes back where the pool took it
    from, zeros elsewhere.

    Equal to ``nn.MaxUnpool2d/3d(stride, stride=stride)`` with the indices of :func:`max_pool`, written as a
    scatter because ``F.max_unpool*`` checks its output size with Python booleans, which tracing (TorchScript,
    ONNX export) cannot record. Shapes: ``x`` and ``indices`` ``B C *S`` -> ``B C *(S * stride)``.
    """
    flat = x.flatten(2)
    out = flat.new_zeros(flat.shape).repeat(1, 1, math.prod(stride))  # B C prod(S * stride), sizes kept symbolic
    out = out.scatter(2, indices.flatten(2), flat)
    return out.view(x.shape[0], x.shape[1], *(s * k for s, k in zip(x.shape[2:], stride)))


# -- blocks --------------------------------------------------------------------------------------------


class ConvNormAct(nn.Sequential):
    """Conv (k x k, same size) -> norm -> activation -> channel dropout (if ``dropout > 0``).

    Shapes: ``B in_ch *S`` -> ``B out_ch *S``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_ch: int,
        out_ch: int,
        *,
        norm: str = "instance",
        activation: str = "leaky_relu",
        dropout: float = 0.0,
        kernel_size: int | Sequence[int] = 3,
    ):
        layers = [
            conv_layer(spatial_dims, in_ch, out_ch, kernel_size),
            norm_layer(norm, spatial_dims, out_ch),
            act_layer(activation),
        ]
        if dropout > 0:
            layers.append((nn.Dropout2d if spatial_dims == 2 else nn.Dropout3d)(dropout))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two :class:`ConvNormAct`, the unit of every UNet / UNet++ node. ``B in_ch *S`` -> ``B out_ch *S``."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, **kw):
        super().__init__(
            ConvNormAct(spatial_dims, in_ch, out_ch, **kw), ConvNormAct(spatial_dims, out_ch, out_ch, **kw)
        )


class Down(nn.Sequential):
    """Max-pool by ``stride`` (2 or per axis) then :class:`DoubleConv`: ``B in_ch *S`` -> ``B out_ch *S/stride``."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, stride: int | Sequence[int] = 2, **kw):
        super().__init__(max_pool(spatial_dims, stride=stride), DoubleConv(spatial_dims, in_ch, out_ch, **kw))


class Upsample(nn.Sequential):
    """Multiply the size by ``stride`` (2 or per axis) and map ``in_ch`` to ``out_ch`` channels.

    ``"transpose"``: a transposed conv with kernel = stride (the UNet paper's 2x2 up-convolution).
    ``"linear"``: bi/trilinear interpolation then a 1x1 conv (no checkerboard artefacts, fewer parameters).
    """

    def __init__(
        self, spatial_dims: int, in_ch: int, out_ch: int, mode: str = "transpose", stride: int | Sequence[int] = 2
    ):
        stride = stride if isinstance(stride, int) else tuple(stride)
        if mode == "transpose":
            tconv = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
            super().__init__(tconv(in_ch, out_ch, kernel_size=stride, stride=stride))
        else:
            interp = "bilinear" if spatial_dims == 2 else "trilinear"
            scale = stride if isinstance(stride, int) else tuple(float(f) for f in stride)
            super().__init__(
                nn.Upsample(scale_factor=scale, mode=interp, align_corners=False),
                conv_layer(spatial_dims, in_ch, out_ch, kernel_size=1),
            )


class Up(nn.Module):
    """Upsample the deeper map, concatenate the skip map(s), then :class:`DoubleConv`.

    Args:
        spatial_dims: 2 or 3.
        in_ch: channels of the deeper map ``x`` (``B in_ch *S/2``).
        skip_ch: channels of all skip maps together (``B skip_ch *S``).
        out_ch: channels out; the upsampled map also gets ``out_ch`` channels, as in the UNet paper
            (1024 -> up-conv -> 512, concat 512 -> 1024 -> 512).
        upsample: ``"transpose"`` or ``"linear"``, see :class:`Upsample`.
        stride: the stride of the pooling this level undoes (2 or one per axis).
        kw: :class:`ConvNormAct` options (``norm``, ``activation``, ``dropout``, ``kernel_size``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_ch: int,
        skip_ch: int,
        out_ch: int,
        upsample: str = "transpose",
        stride: int | Sequence[int] = 2,
        **kw,
    ):
        super().__init__()
        self.up = Upsample(spatial_dims, in_ch, out_ch, upsample, stride)
        self.conv = DoubleConv(spatial_dims, skip_ch + out_ch, out_ch, **kw)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        # skips first, upsampled map last: the order of the UNet++ paper's [x_i_0..x_i_{j-1}, U(x_{i+1,j-1})]
        return self.conv(torch.cat([*skips, self.up(x)], dim=1))


# -- any input size ------------------------------------------------------------------------------------


def padded_size(size: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` >= ``size``, and at least ``2 * multiple``.

    The floor of two keeps at least 2x2(x2) voxels at the coarsest level, where instance norm needs more
    than one value (and batch norm would see a single voxel per case).
    """
    return max(math.ceil(size / multiple), 2) * multiple


def pad_to_multiple(x: torch.Tensor, multiple: int | Sequence[int]) -> torch.Tensor:
    """Replicate-pad the spatial axes of ``x`` (``B C *S``) at their high end to :func:`padded_size`.

    ``multiple``: one for every axis, or one per axis (the product of that axis' strides).
    """
    multiples = [multiple] * (x.ndim - 2) if isinstance(multiple, int) else list(multiple)
    pad: list[int] = []
    for s, m in zip(reversed(x.shape[2:]), reversed(multiples)):  # F.pad lists the last axis first
        pad += [0, padded_size(s, m) - s]
    if not any(pad):
        return x
    return F.pad(x, pad, mode="replicate")


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Keep the first ``size[k]`` voxels of spatial axis ``k`` (undoes :func:`pad_to_multiple`)."""
    for axis, s in enumerate(size):
        if x.shape[2 + axis] != s:
            x = x.narrow(2 + axis, 0, s)
    return x


def coarse_size(size: Sequence[int], level: int, strides: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Size at ``level`` of the part of a padded map that covers the input.

    ``strides``: per pooling step the stride of every axis (default: 2 on every axis, halved ``level`` times).
    """
    cell = (2**level,) * len(size) if strides is None else total_stride(strides, level)
    return [math.ceil(s / f) for s, f in zip(size, cell)]
