"""Segmentation networks, registered by name and built from config.

Every network takes ``spatial_dims`` (2 or 3), ``in_channels`` and ``num_classes`` from the caller plus its
own ``model.params``, accepts any input size, and returns logits ``B num_classes *S`` of the input's size.
In training mode a network built with ``deep_supervision=True`` returns ``list[Tensor]`` instead: element 0
the full-resolution logits, then its extra heads (see each class); in eval mode always one Tensor. Every network
names its training-mode outputs in ``head_names`` and suggests a loss weighting of them in
``default_deep_supervision_weights`` (used when ``loss.deep_supervision_weights`` is not set).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medseg.nets.segnet import SegNet
from medseg.nets.unet import UNet
from medseg.nets.unetpp import UNetPlusPlus
from medseg.registry import Registry

NETWORKS = Registry("network")
NETWORKS.register("unet")(UNet)
NETWORKS.register("unetpp")(UNetPlusPlus)
NETWORKS.register("segnet")(SegNet)


# Arguments the training pipeline supplies from the config and the data, never from model.params.
PIPELINE_ARGUMENTS = {"spatial_dims": "data.spatial_dims", "in_channels": "in_channels", "num_classes": "data.classes"}


def build_network(
    name: str, params: dict[str, Any] | None, *, spatial_dims: int, in_channels: int, num_classes: int
) -> nn.Module:
    """Build the network registered as ``name`` (config ``model.name``) with ``params`` (``model.params``).

    Raises:
        ConfigError: every problem at once: unknown name or parameter (listing the valid ones), invalid
            values, each at its key path (``model.params.<name>``).
    """
    return NETWORKS.build(
        name,
        params,
        key="model.name",
        fixed_keys=PIPELINE_ARGUMENTS,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
    )


def check_network(name: str, params: dict[str, Any] | None, spatial_dims: int) -> None:
    """Run every check :func:`build_network` runs, on the meta device: nothing is allocated, so a large 3D
    network is checked in milliseconds before any data is read (``medseg config``, ``medseg train``).

    Raises:
        ConfigError: as :func:`build_network`.
    """
    with torch.device("meta"):
        build_network(name, params, spatial_dims=spatial_dims, in_channels=1, num_classes=2)


__all__ = ["NETWORKS", "PIPELINE_ARGUMENTS", "SegNet", "UNet", "UNetPlusPlus", "build_network", "check_network"]
