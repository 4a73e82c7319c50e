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

from torch import nn

from medseg.nets.segnet import SegNet
from medseg.nets.unet import UNet
from medseg.nets.unetpp import UNetPlusPlus
from medseg.registry import Registry

NETWORKS = Registry("network")
NETWORKS.register("unet")(UNet)
NETWORKS.register("unetpp")(UNetPlusPlus)
NETWORKS.register("segnet")(SegNet)


def build_network(
    name: str, params: dict[str, Any] | None, *, spatial_dims: int, in_channels: int, num_classes: int
) -> nn.Module:
    """Build the network registered as ``name`` (config ``model.name``) with ``params`` (``model.params``).

    Raises:
        ConfigError: unknown name or parameter (listing the valid ones), or an invalid value.
    """
    return NETWORKS.build(
        name,
        params,
        key="model.name",
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
    )


__all__ = ["NETWORKS", "SegNet", "UNet", "UNetPlusPlus", "build_network"]
