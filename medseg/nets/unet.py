"""UNet (Ronneberger, Fischer and Brox, MICCAI 2015), 2D and 3D.

An encoder of ``depth`` down blocks doubling the features, a mirrored decoder of up blocks with skip
connections, and a 1x1 head. Differences from the paper: same-size convolutions instead of valid ones (the
output covers the whole input, no overlap-tile needed), and optional norm, dropout, interpolation
upsampling and deep-supervision heads. The paper's network is
``UNet(spatial_dims=2, in_channels=1, num_classes=2, features=64, depth=4, norm="none",
activation="relu", upsample="transpose")``, 31,030,658 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.nets.blocks import (
    UPSAMPLES,
    DoubleConv,
    Down,
    Up,
    bool_problem,
    choice_problem,
    coarse_size,
    conv_layer,
    crop_to,
    network_problems,
    pad_to_multiple,
    raise_for_arguments,
    resolve_kernel_sizes,
    resolve_strides,
    total_stride,
)


class UNet(nn.Module):
    """UNet with configurable depth, width, norm, activation, dropout, upsampling and deep supervision.

    Any input size works: the input is padded per axis to a multiple of the product of its strides
    (``2**depth`` by default) and the logits cropped back (see :mod:`medseg.nets.blocks`).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the image.
        num_classes: logits channels (background included).
        features: features of the first level; level ``i`` has ``features * 2**i``.
        depth: number of downsamplings (the paper: 4).
        strides: per downsampling, the pooling stride of every axis, 1 or 2 (an int: the same on every axis),
            e.g. ``[[2, 2, 1], [2, 2, 1], [2, 2, 2]]`` for 4 mm slices of 0.8 mm pixels; default 2 everywhere.
        kernel_sizes: per level 0..depth, the odd convolution kernel size of every axis (an int: the same on
            every axis), e.g. ``[[3, 3, 1], [3, 3, 3], ...]``; default 3 everywhere.
        norm: ``"batch"``, ``"instance"`` or ``"none"``.
        activation: ``"relu"``, ``"leaky_relu"``, ``"elu"`` or ``"gelu"``.
        dropout: channel-dropout rate after every convolution, in [0, 1).
        upsample: ``"transpose"`` (2x2 up-convolution) or ``"linear"`` (bi/trilinear + 1x1 conv).
        deep_supervision: add a 1x1 head to decoder levels 1..depth-1.

    Returns from ``forward(x)`` with ``x`` of shape ``B in_channels *S``:
        eval mode, or no deep supervision: logits ``B num_classes *S``.
        training mode with deep supervision: ``[logits, head_1, ..., head_{depth-1}]`` where ``head_k``
        is ``B num_classes *ceil(S / stride_k)`` with ``stride_k`` the product of the first ``k`` strides
        of each axis (coarser decoder levels, not upsampled).

    Attributes:
        head_names: what each training-mode output reads, in order: ``level_0`` (full resolution) then
            ``level_1 .. level_{depth-1}``; only ``level_0`` without deep supervision.
        default_deep_supervision_weights: ``"halving"``: the full-resolution head, the one prediction uses,
            counts most (nnU-Net's choice); ``loss.deep_supervision_weights`` overrides it.
    """

    default_deep_supervision_weights = "halving"

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        features: int = 32,
        depth: int = 4,
        strides: list | None = None,
        kernel_sizes: list | None = None,
        norm: str = "instance",
        activation: str = "leaky_relu",
        dropout: float = 0.0,
        upsample: str = "transpose",
        deep_supervision: bool = False,
    ):
        super().__init__()
        raise_for_arguments(
            "UNet",
            **network_problems(spatial_dims, in_channels, num_classes, features=features, depth=depth,
                               strides=strides, kernel_sizes=kernel_sizes, norm=norm, activation=activation,
                               dropout=dropout, kernel_levels=1),
            upsample=choice_problem(upsample, UPSAMPLES),
            deep_supervision=bool_problem(deep_supervision),
        )
        self.depth = depth
        self.strides = resolve_strides(strides, depth, spatial_dims)
        kernels = resolve_kernel_sizes(kernel_sizes, depth + 1, spatial_dims)
        kw = dict(norm=norm, activation=activation, dropout=float(dropout))
        self.deep_supervision = deep_supervision

        ch = [features * 2**i for i in range(depth + 1)]
        self.stem = DoubleConv(spatial_dims, in_channels, ch[0], kernel_size=kernels[0], **kw)
        self.downs = nn.ModuleList(
            Down(spatial_dims, ch[i], ch[i + 1], self.strides[i], kernel_size=kernels[i + 1], **kw)
            for i in range(depth)
        )
        # ups[0] goes from the bottleneck (level depth) to level depth-1, ups[-1] ends at full resolution
        self.ups = nn.ModuleList(
            Up(spatial_dims, ch[i + 1], ch[i], ch[i], upsample, self.strides[i], kernel_size=kernels[i], **kw)
            for i in reversed(range(depth))
        )
        self.head = conv_layer(spatial_dims, ch[0], num_classes, kernel_size=1)
        # aux_heads[k-1] reads decoder level k (1 <= k < depth)
        self.aux_heads = nn.ModuleList(
            conv_layer(spatial_dims, ch[k], num_classes, kernel_size=1)
            for k in range(1, depth if deep_supervision else 1)
        )

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(f"level_{k}" for k in range(len(self.aux_heads) + 1))

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Per axis, input sizes that are multiples of this (and at least twice it) run unpadded."""
        return total_stride(self.strides, self.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        size = list(x.shape[2:])
        x = pad_to_multiple(x, total_stride(self.strides, self.depth))

        x = self.stem(x)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)

        with_heads = self.training and self.deep_supervision
        aux = []  # head outputs, coarsest first; computed on the way so decoder maps can be freed
        for level, up in zip(reversed(range(self.depth)), self.ups):
            x = up(x, [skips.pop()])
            if with_heads and level > 0:
                aux.append(crop_to(self.aux_heads[level - 1](x), coarse_size(size, level, self.strides)))

        logits = crop_to(self.head(x), size)
        return [logits, *reversed(aux)] if with_heads else logits
