"""Instance representations, registered by name (config ``data.instance_target``).

=========  ==========================================  ==============================  ==============================
name       class channels                              regression channels             instances from
=========  ==========================================  ==============================  ==============================
border     background / cell / border                  none                            cell cores + watershed
distance   background / cell [/ border]                normalised distance (1)         distance cores + watershed
flows      background / cell [/ border]                offsets from the centre (nd)    centre cores + watershed
=========  ==========================================  ==============================  ==============================

Example:
    >>> rep = build_representation("flows", {"border_width": 1})
    >>> rep.regression_channels(spatial_dims=2)
    2
    >>> instances = rep.postprocess(probs, regression, min_size=8, **tuned_thresholds)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medseg.errors import ConfigError
from medseg.instances.base import InstanceTargetsd, Representation
from medseg.instances.border import Border
from medseg.instances.distance import Distance, distance_targets
from medseg.instances.flows import Flows, flow_targets
from medseg.instances.tune import tune_thresholds
from medseg.registry import Registry, valid_parameters

REPRESENTATIONS = Registry("instance representation")
REPRESENTATIONS.register("border")(Border)
REPRESENTATIONS.register("distance")(Distance)
REPRESENTATIONS.register("flows")(Flows)


def build_representation(
    name: str, params: Mapping[str, Any] | None = None, key: str = "data.instance_target", prefix: str = "instances"
) -> Representation:
    """The representation registered as ``name`` with its options (``border_width``, ``mse_weight``,
    ``msge_weight``).

    Raises:
        ConfigError: unknown name at ``key`` (listing the valid ones), or an unknown or invalid option at
            ``<prefix>.<option>``.
    """
    builder = REPRESENTATIONS.get(name, key)
    params = dict(params or {})
    accepted = valid_parameters(builder) or set()
    for option in params:
        if option not in accepted:
            expected = ", ".join(sorted(accepted))
            raise ConfigError(f"{prefix}.{option}", f"unknown option of '{name}'; expected one of: {expected}")
    try:
        return builder(**params)
    except ValueError as err:
        raise ConfigError(prefix, f"'{name}' rejected its options: {err}") from err


__all__ = [
    "REPRESENTATIONS",
    "Border",
    "Distance",
    "Flows",
    "InstanceTargetsd",
    "Representation",
    "build_representation",
    "distance_targets",
    "flow_targets",
    "tune_thresholds",
]
