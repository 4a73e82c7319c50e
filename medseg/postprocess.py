"""From predicted probabilities to what a user keeps: labels, cell instances, the input's geometry.

Every function takes a tensor or an array (probabilities ``K *S``, labels ``*S``; 2D or 3D) and returns
numpy, except :func:`resample_to`, which returns the kind it was given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.segmentation import relabel_sequential, watershed

__all__ = ["cell_instances", "probabilities_to_labels", "resample_to"]


def _numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _compact_dtype(largest: int) -> type:
    return np.uint8 if largest <= 255 else np.uint16 if largest <= 65535 else np.uint32


def _check_probabilities(probs: np.ndarray, name: str = "probs") -> None:
    if probs.ndim not in (3, 4) or not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"{name} must be floating K *S with 2 or 3 spatial axes; received {probs.dtype} {probs.shape}")


def probabilities_to_labels(probs: torch.Tensor | np.ndarray) -> np.ndarray:
    """Argmax over classes, in the smallest unsigned dtype that holds them.

    Args:
        probs: ``K *S`` probabilities (or logits); ``K == 1`` is a sigmoid, thresholded at 0.5.

    Returns:
        ``*S`` labels, uint8 (uint16 beyond 256 classes).
    """
    if isinstance(probs, torch.Tensor):  # argmax where the data lives, then move only the labels
        labels = probs[0] >= 0.5 if probs.shape[0] == 1 else probs.argmax(0)
        return labels.cpu().numpy().astype(_compact_dtype(probs.shape[0] - 1))
    probs = np.asarray(probs)
    labels = probs[0] >= 0.5 if probs.shape[0] == 1 else probs.argmax(0)
    return labels.astype(_compact_dtype(probs.shape[0] - 1))


def cell_instances(
    probs: torch.Tensor | np.ndarray,
    cell_class: int = 1,
    border_class: int | None = 2,
    min_size: int = 8,
    threshold: float = 0.5,
) -> np.ndarray:
    """Split a semantic cell prediction into instances, touching nuclei included.

    Seeds are the connected components of the cell interior (voxels whose argmax is ``cell_class``), which
    the predicted border class separates; a watershed on the cell probability grows them over the whole
    foreground (cell plus border probability >= ``threshold``), so the border voxels are shared between the
    cells they separate. Objects smaller than ``min_size`` voxels are removed.

    Args:
        probs: ``K *S`` probabilities, 2D or 3D.
        cell_class: channel of the cell interior.
        border_class: channel of the cell border, or None when the model has none (then touching cells
            stay merged).
        min_size: smallest object kept, in voxels.
        threshold: foreground threshold on the cell (+ border) probability.

    Returns:
        ``*S`` instance ids ``1..N`` in raster order of their seeds, 0 background (uint16, uint32 beyond 65535).
    """
    probs = _numpy(probs)
    _check_probabilities(probs)
    classes = probs.shape[0]
    if not 0 <= cell_class < classes or (border_class is not None and not 0 <= border_class < classes):
        raise ValueError(
            f"cell_class {cell_class} and border_class {border_class} must be channels of the {classes} in probs"
        )
    if border_class == cell_class:
        raise ValueError(f"border_class must differ from cell_class; both are {cell_class}")
    cell = probs[cell_class].astype(np.float32, copy=False)
    foreground = cell + probs[border_class] if border_class is not None else cell.copy()
    foreground = foreground >= threshold
    # argmax == cell_class with argmax's tie rule (the first maximum wins), without an int64 argmax map
    seeds = foreground.copy()
    for k in range(classes):
        if k != cell_class:
            seeds &= cell > probs[k] if k < cell_class else cell >= probs[k]
    markers, count = ndimage.label(seeds)
    if count == 0:
        return np.zeros(cell.shape, dtype=np.uint16)
    instances = watershed(-cell, markers, mask=foreground)
    return _relabel_sequential(instances, min_size)


def _relabel_sequential(instances: np.ndarray, min_size: int) -> np.ndarray:
    """Drop ids smaller than ``min_size`` voxels and renumber the rest ``1..N``, keeping their order."""
    small = np.bincount(instances.ravel()) < max(min_size, 1)
    small[0] = False
    relabelled = relabel_sequential(np.where(small[instances], 0, instances))[0]
    count = int(relabelled.max()) if relabelled.size else 0
    return relabelled.astype(np.uint16 if count <= 65535 else np.uint32, copy=False)


def _nearest_indices(size: int, target: int) -> np.ndarray:
    # Source voxel whose centre is nearest to each target voxel's centre (torch's "nearest-exact").
    return np.minimum(((np.arange(target) + 0.5) * size / target).astype(np.int64), size - 1)


def resample_to(
    labels_or_probs: torch.Tensor | np.ndarray, target_shape: Sequence[int], mode: str = "nearest"
) -> torch.Tensor | np.ndarray:
    """Resample a prediction to another grid over the same extent, e.g. back to the input geometry.

    Voxel centres are aligned as in ``align_corners=False``: the first and last voxels keep their
    half-voxel margins, so resampling there and back is consistent.

    Args:
        labels_or_probs: labels ``*S`` or channel-first ``K *S`` (2D or 3D).
        target_shape: the spatial shape ``*T`` to resample to.
        mode: ``"nearest"`` (labels, instance maps; keeps dtype and ids) or ``"linear"``
            (probabilities; bilinear/trilinear in float32).

    Returns:
        ``*T`` or ``K *T``, a tensor when given a tensor, else an array; the input itself when the shape
        already matches.
    """
    target = tuple(int(t) for t in target_shape)
    array = labels_or_probs
    channels = array.ndim - len(target)
    if len(target) not in (2, 3) or channels not in (0, 1) or min(target) < 1:
        raise ValueError(
            f"target_shape must have 2 or 3 positive sizes matching the last axes of the input; "
            f"received target {target} for input {tuple(array.shape)}"
        )
    if tuple(array.shape[channels:]) == target:
        return array
    if mode == "nearest":
        index = np.ix_(*[_nearest_indices(n, t) for n, t in zip(array.shape[channels:], target)])
        if isinstance(array, torch.Tensor):
            index = tuple(torch.from_numpy(i).to(array.device) for i in index)
        return array[(slice(None),) * channels + tuple(index)]
    if mode != "linear":
        raise ValueError(f"mode must be 'nearest' or 'linear'; received {mode!r}")
    is_tensor = isinstance(array, torch.Tensor)
    source = array if is_tensor else torch.from_numpy(np.asarray(array))
    if not source.is_floating_point():
        raise ValueError(f"linear resampling needs probabilities; integer {source.dtype} labels need mode='nearest'")
    source = source if channels else source[None]
    interpolation = "bilinear" if len(target) == 2 else "trilinear"
    out = torch.empty((source.shape[0], *target), dtype=torch.float32, device=source.device)
    for k in range(source.shape[0]):  # one channel at a time bounds the float32 temporaries
        out[k] = F.interpolate(source[k][None, None].float(), size=target, mode=interpolation, align_corners=False)[
            0, 0
        ]
    out = out if channels else out[0]
    return out if is_tensor else out.numpy()
