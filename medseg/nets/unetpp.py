"""UNet++ (Zhou, Rahman Siddiquee, Tajbakhsh and Liang, DLMIA 2018), 2D and 3D.

Nodes ``x_i_j`` as in the paper's figure: row ``i`` is the resolution (``i`` halvings), column ``j`` the
position along the nested skip pathway. ``x_i_0`` is the backbone encoder and

    x_i_j = H([x_i_0, ..., x_i_{j-1}, U(x_{i+1}_{j-1})])    for j >= 1,

with ``H`` two conv-norm-activation layers and ``U`` a 2x upsampling. A 1x1 head reads each top-row node
``x_0_j``; with deep supervision all heads ``x_0_1 .. x_0_depth`` are trained, so the network can be pruned
at inference to the sub-network UNet++ L (nodes up to ``x_0_L``, ``L`` halvings) without retraining.
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
    conv_layer,
    crop_to,
    int_problem,
    network_problems,
    pad_to_multiple,
    raise_for_arguments,
    resolve_kernel_sizes,
    resolve_strides,
    total_stride,
)


class UNetPlusPlus(nn.Module):
    """UNet++ with nested dense skip pathways, deep supervision and pruned inference.

    Any input size works: the input is padded per axis to a multiple of the product of the strides of the
    ``L`` levels that run (``2**L`` by default) and the logits cropped back (see :mod:`medseg.nets.blocks`).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the image.
        num_classes: logits channels (background included).
        features: features of row 0; row ``i`` has ``features * 2**i`` (the paper: 32).
        depth: number of downsamplings, the rows below the top one (the paper: 4).
        strides: per downsampling (row ``i`` -> ``i+1``), the pooling stride of every axis, 1 or 2 (an int:
            the same on every axis); default 2 everywhere. See :class:`~medseg.nets.unet.UNet`.
        kernel_sizes: per row 0..depth, the odd convolution kernel size of every axis; default 3.
        norm: ``"batch"``, ``"instance"`` or ``"none"``.
        activation: ``"relu"``, ``"leaky_relu"``, ``"elu"`` or ``"gelu"``.
        dropout: channel-dropout rate after every convolution, in [0, 1).
        upsample: ``"transpose"`` or ``"linear"`` (see :class:`~medseg.nets.blocks.Upsample`).
        deep_supervision: train a head on every top-row node (the paper's default, needed for pruning);
            if False only ``x_0_depth`` has a head.
        prune_level: ``L`` in 1..depth, the sub-network run in eval mode (default None: ``depth``, the
            whole network). Levels below ``depth`` need ``deep_supervision=True``. Training always runs the
            whole network. Also a settable attribute: ``model.prune_level = 2``.

    Returns from ``forward(x)`` with ``x`` of shape ``B in_channels *S``:
        eval mode: logits ``B num_classes *S`` of the head on ``x_0_L``.
        training mode with deep supervision: ``[head(x_0_depth), head(x_0_1), ..., head(x_0_{depth-1})]``,
        every element ``B num_classes *S``.
        training mode without: ``head(x_0_depth)``.

    Attributes:
        head_names: the node each training-mode output reads, in order: ``("x_0_4", "x_0_1", "x_0_2",
            "x_0_3")`` for depth 4 (the whole network first, as every network here puts its full logits
            first); ``("x_0_4",)`` without deep supervision.
        eval_head: the node whose head eval mode returns, ``x_0_L``.
        default_deep_supervision_weights: ``"equal"``, the paper's average of the heads. Every head may
            serve pruned inference, so none may be starved: halving weights (head ``i``: ``1/2**i``) would
            give ``x_0_3`` of a depth-4 network 6.7 % of the loss while pruning at L=3 reads it.
    """

    default_deep_supervision_weights = "equal"

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
        deep_supervision: bool = True,
        prune_level: int | None = None,
    ):
        super().__init__()
        raise_for_arguments(
            "UNetPlusPlus",
            **network_problems(spatial_dims, in_channels, num_classes, features=features, depth=depth,
                               strides=strides, kernel_sizes=kernel_sizes, norm=norm, activation=activation,
                               dropout=dropout, kernel_levels=1),
            upsample=choice_problem(upsample, UPSAMPLES),
            deep_supervision=bool_problem(deep_supervision),
            prune_level=None if prune_level is None else int_problem(prune_level),
        )
        self.depth = depth
        self.strides = resolve_strides(strides, depth, spatial_dims)
        kernels = resolve_kernel_sizes(kernel_sizes, depth + 1, spatial_dims)
        kw = dict(norm=norm, activation=activation, dropout=float(dropout))
        self.deep_supervision = deep_supervision
        self._prune_level = depth

        ch = [features * 2**i for i in range(depth + 1)]
        nodes = {"x_0_0": DoubleConv(spatial_dims, in_channels, ch[0], kernel_size=kernels[0], **kw)}
        for i in range(1, depth + 1):
            nodes[f"x_{i}_0"] = Down(spatial_dims, ch[i - 1], ch[i], self.strides[i - 1], kernel_size=kernels[i], **kw)
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                nodes[f"x_{i}_{j}"] = Up(
                    spatial_dims, ch[i + 1], j * ch[i], ch[i], upsample, self.strides[i], kernel_size=kernels[i], **kw
                )
        self.nodes = nn.ModuleDict(nodes)
        # heads["j"] reads x_0_j
        self.heads = nn.ModuleDict(
            {
                str(j): conv_layer(spatial_dims, ch[0], num_classes, kernel_size=1)
                for j in range(1 if deep_supervision else depth, depth + 1)
            }
        )
        if prune_level is not None:
            self.prune_level = prune_level

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Per axis, input sizes that are multiples of this (and at least twice it) run unpadded in eval mode."""
        return total_stride(self.strides, self._prune_level)

    @property
    def prune_level(self) -> int:
        return self._prune_level

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(f"x_0_{j}" for j in (self.depth, *range(1, self.depth if self.deep_supervision else 1)))

    @property
    def eval_head(self) -> str:
        return f"x_0_{self._prune_level}"

    @prune_level.setter
    def prune_level(self, level: int) -> None:
        problem = int_problem(level)
        if problem is None and level > self.depth:
            problem = f"expected 1..{self.depth} (depth), got {level}"
        elif problem is None and str(level) not in self.heads:
            problem = f"level {level} has no trained head; pruning below depth {self.depth} needs deep_supervision"
        raise_for_arguments(type(self).__name__, prune_level=problem)
        self._prune_level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        levels = self.depth if self.training else self._prune_level
        size = list(x.shape[2:])
        x = pad_to_multiple(x, total_stride(self.strides, levels))

        # rows[i] holds x_i_0, x_i_1, ... as they are computed, one backbone step (and its diagonal) at a time
        rows: list[list[torch.Tensor]] = [[self.nodes["x_0_0"](x)]]
        for i in range(1, levels + 1):
            rows.append([self.nodes[f"x_{i}_0"](rows[i - 1][0])])
            for j in range(1, i + 1):
                r = i - j  # x_r_j, fed by x_{r+1}_{j-1} and the row's x_r_0..x_r_{j-1}
                rows[r].append(self.nodes[f"x_{r}_{j}"](rows[r + 1][j - 1], rows[r]))

        top = rows[0]  # x_0_0 .. x_0_levels
        logits = crop_to(self.heads[str(levels)](top[levels]), size)
        if not (self.training and self.deep_supervision):
            return logits
        return [logits, *(crop_to(self.heads[str(j)](top[j]), size) for j in range(1, levels))]
