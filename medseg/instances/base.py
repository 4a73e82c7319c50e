"""What every instance representation shares: the interface, the target transform, regression loss terms and
the final steps of the post-processing.

A representation turns an instance map (``H W [D]`` ids, 0 background) into training targets and turns a
network's output back into instances:

* class channels: the semantic target (background / cell [/ border]), trained with Dice + weighted CE as for
  any segmentation; :attr:`Representation.semantic` says which semantic mode it needs (or accepts);
* regression channels (``R`` of them, maybe none), appended after the ``K`` class logits; their targets are
  written by :meth:`Representation.target_transform` under ``"regression"`` AFTER spatial augmentation, so
  a flipped or rotated patch gets the targets of the flipped or rotated instances (flow vectors turn with it);
* :meth:`Representation.loss_terms`: the regression terms (MSE, MSGE) of one output head;
* :meth:`Representation.postprocess`: class probabilities ``K *S`` + regression ``R *S`` -> instance ids, with
  named thresholds (:attr:`Representation.thresholds`) that training tunes on validation cases.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from medseg.metrics import equivalent_diameter
from medseg.transforms.functional import as_label_array

__all__ = [
    "InstanceTargetsd",
    "Representation",
    "foreground_mask",
    "masked_mse",
    "msge",
    "finish_instances",
    "label_markers",
    "with_borders",
    "object_boxes",
    "median_object_size",
]


class Representation:
    """Base class of the instance representations (see the module docstring).

    Args:
        border_width: thickness in pixels of the border class when the semantic target is ``cell_border``.
        mse_weight: weight of the regression MSE term (representations with regression channels); None: the
            representation's own default (:attr:`loss_weights`).
        msge_weight: weight of the mean squared gradient error term (representations that use one); None: the
            representation's own default.

    Attributes:
        name: the registered name (``data.instance_target``).
        semantic: semantic modes of the class channels this representation works with.
        thresholds: default post-processing thresholds, name -> value.
        grid: values tried per threshold when tuning on validation cases (a small grid).
        loss_weights: default weights of the regression terms (``mse``, ``msge``).
    """

    name: ClassVar[str] = ""
    semantic: ClassVar[tuple[str, ...]] = ("cell_border", "foreground")
    thresholds: ClassVar[dict[str, float]] = {}
    grid: ClassVar[dict[str, tuple[float, ...]]] = {}
    uses_gradient: ClassVar[bool] = False
    loss_weights: ClassVar[dict[str, float]] = {"mse": 1.0, "msge": 1.0}

    def __init__(self, border_width: int = 1, mse_weight: float | None = None, msge_weight: float | None = None):
        mse_weight = self.loss_weights["mse"] if mse_weight is None else mse_weight
        msge_weight = self.loss_weights["msge"] if msge_weight is None else msge_weight
        if int(border_width) != border_width or border_width < 1:
            raise ValueError(f"border_width must be an integer >= 1, got {border_width}")
        if mse_weight < 0 or msge_weight < 0:
            raise ValueError(f"mse_weight and msge_weight must be >= 0, got {mse_weight} and {msge_weight}")
        self.border_width = int(border_width)
        self.mse_weight = float(mse_weight)
        self.msge_weight = float(msge_weight)

    # -- what the network predicts ------------------------------------------------------------------------
    def regression_channels(self, spatial_dims: int) -> int:
        """``R``, the regression channels appended after the class logits."""
        return len(self.vector_axes(spatial_dims))

    def vector_axes(self, spatial_dims: int) -> list[int | None]:
        """Per regression channel, the spatial axis it is a vector component along (None: a scalar).

        A flip of axis ``a`` negates the channels whose entry is ``a`` (mirror TTA needs this).
        """
        return []

    # -- targets ------------------------------------------------------------------------------------------
    def targets(self, instance: np.ndarray) -> np.ndarray | None:
        """Regression targets ``R *S`` (float32) of an instance map ``*S``, or None without regression."""
        return None

    def target_transform(self, instance_key: str = "instance", target_key: str = "regression") -> MapTransform | None:
        """The MONAI dictionary transform writing :meth:`targets` (None when there are none)."""
        if self.regression_channels(2) == 0:
            return None
        return InstanceTargetsd(instance_key, self.targets, target_key, allow_missing_keys=True)

    # -- loss ---------------------------------------------------------------------------------------------
    def loss_terms(
        self, pred: torch.Tensor, target: torch.Tensor, foreground: torch.Tensor
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """Regression terms of one head: name -> (weight, unweighted value).

        Args:
            pred: ``B R *S`` regression outputs.
            target: ``B R *S`` targets at the same resolution.
            foreground: ``B 1 *S`` bool, the reference objects.
        """
        terms = {"mse": (self.mse_weight, masked_mse(pred, target))}
        if self.uses_gradient:
            axes = self.vector_axes(pred.ndim - 2)
            terms["msge"] = (self.msge_weight, msge(pred, target, foreground, axes))
        return terms

    # -- post-processing ----------------------------------------------------------------------------------
    def tuning_grid(self, references: Sequence[np.ndarray], min_size: int = 8) -> dict[str, tuple[float, ...]]:
        """The values tried per threshold when tuning on cases with these reference instance maps: :attr:`grid`
        unless a representation scales it with the objects (``min_size``: the post-processing's)."""
        return dict(self.grid)

    def check_thresholds(self, values: Mapping[str, float] | None) -> dict[str, float]:
        """Defaults overridden by ``values``; an unknown name raises ValueError listing the valid ones."""
        out = dict(self.thresholds)
        for key, value in (values or {}).items():
            if key not in out:
                raise ValueError(
                    f"unknown post-processing threshold '{key}' for '{self.name}'; "
                    f"expected one of: {', '.join(sorted(out)) or '(none)'}"
                )
            out[key] = float(value)
        return out

    def postprocess(
        self, probs: np.ndarray, regression: np.ndarray | None, min_size: int = 8, **thresholds: float
    ) -> np.ndarray:
        """Instances ``*S`` (uint16/uint32, ids ``1..N``) from probabilities ``K *S`` and regression ``R *S``."""
        raise NotImplementedError


class InstanceTargetsd(MapTransform):
    """Writes ``fn(instance map)`` (``R *S`` float32) at ``target_key``; the instance map at ``keys``
    is channel-first ``1 *S`` as MONAI keeps it. Put it after the spatial augmentation."""

    def __init__(
        self,
        keys: KeysCollection,
        fn: Callable[[np.ndarray], np.ndarray],
        target_key: str = "regression",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"InstanceTargetsd takes one instance-map key, got {self.keys}")
        self.fn, self.target_key = fn, target_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            inst = as_label_array(d[key])
            if inst.ndim not in (3, 4) or inst.shape[0] != 1:
                raise ValueError(f"'{key}' must be a channel-first instance map 1 *S, got shape {inst.shape}")
            d[self.target_key] = torch.from_numpy(self.fn(inst[0]))
        return d


# ---------------------------------------------------------------------------------------------- targets
def object_boxes(inst: np.ndarray, margin: int = 0):
    """``(id, box)`` of every instance, ``box`` its bounding box grown by ``margin`` (clipped to the image)."""
    for index, box in enumerate(ndimage.find_objects(inst), start=1):
        if box is None:
            continue
        if margin:
            box = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, inst.shape))
        yield index, box


# ------------------------------------------------------------------------------------------ loss terms
def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over all pixels (or the ``mask``ed ones), float32."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    mask = mask.expand_as(err).float()
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


def central_difference(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``(x[i+1] - x[i-1]) / 2`` along spatial ``axis`` of ``B C *S`` (one-sided at the edges, as ``np.gradient``)."""
    dim = 2 + axis
    n = x.shape[dim]
    if n < 2:
        return torch.zeros_like(x)
    first = x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1)
    last = x.narrow(dim, n - 1, 1) - x.narrow(dim, n - 2, 1)
    inner = (x.narrow(dim, 2, n - 2) - x.narrow(dim, 0, n - 2)) / 2
    return torch.cat([first, inner, last], dim)


def msge(
    pred: torch.Tensor, target: torch.Tensor, foreground: torch.Tensor, axes: Sequence[int | None]
) -> torch.Tensor:
    """Mean squared gradient error (HoVer-Net): the derivative of each vector component along its own axis,
    of prediction and target, compared on the reference objects only (where the targets' jumps between
    touching objects are, the borders the post-processing looks for)."""
    terms = []
    for c, axis in enumerate(axes):
        if axis is None:
            continue
        channel = slice(c, c + 1)
        pred_slope = central_difference(pred[:, channel].float(), axis)
        terms.append(pred_slope - central_difference(target[:, channel].float(), axis))
    if not terms:
        return pred.new_zeros((), dtype=torch.float32)
    return masked_mse(torch.cat(terms, 1), torch.zeros_like(torch.cat(terms, 1)), foreground)


# ------------------------------------------------------------------------------------- post-processing
def median_object_size(references: Sequence[np.ndarray]) -> tuple[float, float]:
    """Median object size over instance maps: ``(pixels or voxels, equivalent diameter)``, the diameter of a
    disc (2D) or ball (3D) of that size; ``(0, 0)`` without objects."""
    sizes = []
    for ref in references:
        counts = np.bincount(np.asarray(ref).ravel().astype(np.int64))[1:]
        sizes.extend(counts[counts > 0].tolist())
    if not sizes:
        return 0.0, 0.0
    size = float(np.median(sizes))
    return size, equivalent_diameter(size, np.asarray(references[0]).ndim)


def foreground_mask(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels whose foreground probability (all classes but background; the sigmoid when ``K == 1``)
    is at least ``threshold``."""
    if probs.shape[0] == 1:
        return probs[0] >= threshold
    return (1.0 - probs[0].astype(np.float32, copy=False)) >= threshold


def label_markers(cores: np.ndarray, min_voxels: float = 0) -> np.ndarray:
    """Connected regions of ``cores`` (bool ``*S``), numbered ``1..N``, without those under ``min_voxels``
    (HoVer-Net drops small markers too: a few noisy pixels that pass a threshold inside a nucleus would
    otherwise split it; the nucleus keeps its larger marker, or becomes an instance of its own without one)."""
    markers, n = ndimage.label(cores)
    if n and min_voxels > 1:
        sizes = np.bincount(markers.ravel())
        keep = sizes >= min_voxels
        keep[0] = False
        markers, _ = ndimage.label(keep[markers])
    return markers


def with_borders(landscape: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The watershed landscape plus the border-class probability when the class channels have one (``K == 3``,
    ``cell_border``): floods from neighbouring markers then meet on the predicted border between touching
    nuclei, not wherever the regression happens to be lowest, which places the boundaries better (AP at high
    IoU). Without a border class the landscape stays as it is."""
    if probs.shape[0] < 3:
        return landscape
    return landscape + probs[2].astype(np.float32, copy=False)


def finish_instances(labels: np.ndarray, foreground: np.ndarray, min_size: int) -> np.ndarray:
    """Last steps shared by every post-processing: foreground components that no marker reached become
    instances of their own (a missed marker must not delete a nucleus), objects below ``min_size`` pixels
    go, ids are renumbered ``1..N`` keeping their order (uint16, uint32 beyond 65535)."""
    orphans = foreground & (labels == 0)
    if orphans.any():
        extra, n = ndimage.label(orphans)
        if n:
            labels = labels.astype(np.int64, copy=False)
            labels = np.where(extra > 0, extra + labels.max(), labels)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    ids = np.flatnonzero(sizes >= max(int(min_size), 1))
    mapping = np.zeros(len(sizes), dtype=np.uint16 if len(ids) <= 65535 else np.uint32)
    mapping[ids] = np.arange(1, len(ids) + 1)
    return mapping[labels]
