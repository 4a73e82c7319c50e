"""SegNet (Badrinarayanan, Kendall and Cipolla, 2015; TPAMI 2017), 2D and 3D.

A VGG16-style encoder (13 conv-BN-ReLU layers in 5 stages of 2, 2, 3, 3, 3 convolutions, each stage ending in
a 2x max-pool) whose pooling indices are carried to a mirrored decoder: every decoder stage max-unpools with
the indices of its encoder stage (no learned upsampling, no skip features) and then convolves the sparse map.
The last decoder convolution gives the logits (no norm, no activation). The classic configuration
(``in_channels=3, num_classes=12``, the defaults below) has 29,449,932 parameters (the paper: 29.5M).
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.nets.blocks import (
    ConvNormAct,
    conv_layer,
    crop_to,
    max_pool,
    max_unpool,
    network_problems,
    pad_to_multiple,
    raise_for_arguments,
    resolve_kernel_sizes,
    resolve_strides,
    total_stride,
)


class SegNet(nn.Module):
    """SegNet encoder-decoder with max-pooling indices.

    Stage ``i`` (0-based) has ``features * min(2**i, 8)`` channels and 2 convolutions for ``i < 2``, else 3,
    so ``features=64, depth=5`` is VGG16's convolutional part. Any input size works: the input is padded per
    axis to a multiple of the product of its strides (``2**depth`` by default) and the logits cropped back
    (see :mod:`medseg.nets.blocks`).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the image.
        num_classes: logits channels (background included).
        features: channels of the first stage (VGG16: 64).
        depth: number of stages, i.e. of poolings (VGG16: 5).
        strides: per stage, the pooling stride of every axis, 1 or 2 (an int: the same on every axis);
            default 2 everywhere. The decoder unpools with the same strides.
        kernel_sizes: per stage, the odd convolution kernel size of every axis (encoder and decoder);
            default 3.
        norm: ``"batch"`` (the paper), ``"instance"`` or ``"none"``.
        activation: ``"relu"`` (the paper), ``"leaky_relu"``, ``"elu"`` or ``"gelu"``.
        dropout: channel-dropout rate after every hidden convolution, in [0, 1) (Bayesian SegNet uses 0.5).

    Attributes:
        deep_supervision: always False; SegNet has a single head.
        head_names: ``("logits",)``, the one output.

    Returns from ``forward(x)`` with ``x`` of shape ``B in_channels *S``: logits ``B num_classes *S``.
    """

    deep_supervision = False
    head_names = ("logits",)
    default_deep_supervision_weights = "equal"  # one head: nothing to weigh

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        features: int = 64,
        depth: int = 5,
        strides: list | None = None,
        kernel_sizes: list | None = None,
        norm: str = "batch",
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        raise_for_arguments(
            "SegNet",
            **network_problems(spatial_dims, in_channels, num_classes, features=features, depth=depth,
                               strides=strides, kernel_sizes=kernel_sizes, norm=norm, activation=activation,
                               dropout=dropout, kernel_levels=0),
        )
        self.depth = depth
        self.strides = resolve_strides(strides, depth, spatial_dims)
        kernels = resolve_kernel_sizes(kernel_sizes, depth, spatial_dims)
        kw = dict(norm=norm, activation=activation, dropout=float(dropout))
        ch = [features * min(2**i, 8) for i in range(depth)]
        n_convs = [2 if i < 2 else 3 for i in range(depth)]

        def convs(widths: list[int], level: int) -> list[nn.Module]:
            pairs = zip(widths, widths[1:])
            return [ConvNormAct(spatial_dims, a, b, kernel_size=kernels[level], **kw) for a, b in pairs]

        encoder = [
            nn.Sequential(*convs([in_channels if i == 0 else ch[i - 1]] + [ch[i]] * n_convs[i], i))
            for i in range(depth)
        ]
        # mirrored, coarsest stage first; a stage's last conv narrows to the next stage's width, and the
        # very last one gives the logits
        decoder = [nn.Sequential(*convs([ch[i]] * n_convs[i] + [ch[i - 1]], i)) for i in reversed(range(1, depth))]
        logits = conv_layer(spatial_dims, ch[0], num_classes, kernel_size=kernels[0])
        decoder.append(nn.Sequential(*convs([ch[0]] * n_convs[0], 0), logits))
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)
        self.pools = nn.ModuleList(max_pool(spatial_dims, return_indices=True, stride=s) for s in self.strides)

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Per axis, input sizes that are multiples of this (and at least twice it) run unpadded."""
        return total_stride(self.strides, self.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = list(x.shape[2:])
        x = pad_to_multiple(x, total_stride(self.strides, self.depth))

        indices = []
        for stage, pool in zip(self.encoder, self.pools):
            x, idx = pool(stage(x))
            indices.append(idx)
        for stage, stride in zip(self.decoder, reversed(self.strides)):
            x = stage(max_unpool(x, indices.pop(), stride))

        return crop_to(x, size)
