"""Building blocks shared by every network: conv-norm-activation, down, up, padding to a valid size.

Every block works in 2D and 3D: ``spatial_dims`` picks ``Conv2d``/``Conv3d`` and friends. Tensors are
``B C H W`` in 2D and ``B C H W D`` in 3D.

Conventions shared by the networks:

- Every convolution has a bias, also before a norm layer: it is redundant there but costs a few
  parameters and keeps the published parameter counts (UNet 31,030,658; SegNet 29.45M) reproducible.
- A network whose encoder halves the size ``depth`` times pads its input at the high end of every axis
  (replicate padding) to a multiple of ``2**depth`` and crops the logits back (:func:`pad_to_multiple`,
  :func:`crop_to`), so any input size works and a logit at index ``i`` still belongs to voxel ``i``.
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


def common_problems(spatial_dims: object, in_channels: object, num_classes: object) -> dict[str, str | None]:
    """Problems of the arguments every network receives from the caller (not from ``model.params``)."""
    return {"spatial_dims": spatial_dims_problem(spatial_dims), "in_channels": int_problem(in_channels),
            "num_classes": int_problem(num_classes)}


# -- layer factories -----------------------------------------------------------------------------------


def conv_layer(spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int = 3) -> nn.Module:
    """Same-size convolution (odd ``kernel_size``, stride 1) with bias."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return conv(in_ch, out_ch, kernel_size, padding=kernel_size // 2)


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


def max_pool(spatial_dims: int, return_indices: bool = False) -> nn.Module:
    pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
    return pool(2, stride=2, return_indices=return_indices)


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
        kernel_size: int = 3,
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
    """2x max-pool then :class:`DoubleConv`: ``B in_ch *S`` -> ``B out_ch *S/2``."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, **kw):
        super().__init__(max_pool(spatial_dims), DoubleConv(spatial_dims, in_ch, out_ch, **kw))


class Upsample(nn.Sequential):
    """Double the size and map ``in_ch`` to ``out_ch`` channels.

    ``"transpose"``: a 2x2(x2) transposed conv with stride 2 (the UNet paper's up-convolution).
    ``"linear"``: bi/trilinear interpolation then a 1x1 conv (no checkerboard artefacts, fewer parameters).
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, mode: str = "transpose"):
        if mode == "transpose":
            tconv = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
            super().__init__(tconv(in_ch, out_ch, kernel_size=2, stride=2))
        else:
            interp = "bilinear" if spatial_dims == 2 else "trilinear"
            super().__init__(
                nn.Upsample(scale_factor=2, mode=interp, align_corners=False),
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
    """

    def __init__(self, spatial_dims: int, in_ch: int, skip_ch: int, out_ch: int, upsample: str = "transpose", **kw):
        super().__init__()
        self.up = Upsample(spatial_dims, in_ch, out_ch, upsample)
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


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the spatial axes of ``x`` (``B C *S``) at their high end to :func:`padded_size`."""
    pad: list[int] = []
    for s in reversed(x.shape[2:]):  # F.pad lists the last axis first
        pad += [0, padded_size(s, multiple) - s]
    if not any(pad):
        return x
    return F.pad(x, pad, mode="replicate")


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Keep the first ``size[k]`` voxels of spatial axis ``k`` (undoes :func:`pad_to_multiple`)."""
    for axis, s in enumerate(size):
        if x.shape[2 + axis] != s:
            x = x.narrow(2 + axis, 0, s)
    return x


def coarse_size(size: Sequence[int], level: int) -> list[int]:
    """Size at ``level`` (halved ``level`` times) of the part of a padded map that covers the input."""
    return [math.ceil(s / 2**level) for s in size]
