"""Segmentation metrics: semantic (per class and overall) and instance (cells); numpy in, numbers out.

Conventions (also in the README):

- Distances (HD95, ASSD) and the surface-Dice tolerance are in the units of ``spacing`` (mm for medical
  images; pixels when ``spacing`` is ``None``). Surfaces are the mask voxels removed by one binary erosion;
  distances are exact Euclidean distances between surface voxel centres (MONAI's KD-tree), so any
  anisotropic spacing is handled in 2D and 3D.
- HD95 is ``max(P95(pred -> ref), P95(ref -> pred))`` of the directed surface distances (MONAI's
  definition); ASSD is the mean of both directed distance sets pooled; surface Dice (NSD) is the fraction
  of both surfaces lying within ``tolerance`` of the other one.
- Empty cases, per class: both masks empty -> Dice 1, IoU 1, HD95 0, ASSD 0, surface Dice 1. Exactly one
  empty -> Dice 0, IoU 0, surface Dice 0, HD95 and ASSD NaN, and ``empty_mismatch`` 1. NaN is not a
  number we can average, so :func:`aggregate_semantic` leaves those cases out of the distance means and
  reports how many there were (``n_empty_mismatch``); the Dice of those cases (0) still counts.
- Instance AP at an IoU threshold ``t`` is the cell-segmentation definition ``TP / (TP + FP + FN)``
  (Cellpose, StarDist), not the COCO area under a precision-recall curve. TP is the largest number of
  one-to-one pairs with IoU >= t. Panoptic quality uses pairs with IoU > 0.5 (unique by construction).
- Merges and splits say why AP is low. A *merge* is one prediction that covers at least half of each of
  >= 2 references (``|p & r| / |r| >= 0.5`` for each); a *split* is one reference that holds at least half
  of each of >= 2 predictions (``|p & r| / |p| >= 0.5`` for each), the symmetric definition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from monai.metrics.utils import get_mask_edges, get_surface_distance
from scipy import sparse
from scipy.sparse.csgraph import maximum_bipartite_matching

SEMANTIC_KEYS = ("dice", "iou", "hd95", "assd", "surface_dice")

# -- semantic, per class ------------------------------------------------------------------------------------


def semantic_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    classes: Mapping[str, int] | Sequence[int],
    spacing: float | Sequence[float] | None = None,
    tolerance: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Dice, IoU, HD95, ASSD and surface Dice of each class of one case.

    Args:
        pred: predicted labels, ``H W [D]`` integers.
        ref: reference labels, same shape.
        classes: ``{name: label}``, or labels (named ``str(label)``); include 0 to score background.
        spacing: voxel size per axis (or one number for all); ``None`` = 1 (pixel units).
        tolerance: surface-Dice tolerance, in the units of ``spacing``.

    Returns:
        ``{name: {"dice", "iou", "hd95", "assd", "surface_dice", "empty_mismatch"}}`` (floats; HD95 and
        ASSD are NaN when exactly one of the masks is empty, which sets ``empty_mismatch`` to 1).
    """
    _check_same_shape(pred, ref)
    sampling = _spacing(spacing, pred.ndim)
    named = classes.items() if isinstance(classes, Mapping) else ((str(c), c) for c in classes)
    return {name: _binary_metrics(pred == c, ref == c, sampling, tolerance) for name, c in named}


def _binary_metrics(p: np.ndarray, r: np.ndarray, spacing: tuple[float, ...], tol: float) -> dict[str, float]:
    n_p, n_r = int(p.sum()), int(r.sum())
    if n_p == 0 and n_r == 0:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0, "surface_dice": 1.0, "empty_mismatch": 0.0}
    if n_p == 0 or n_r == 0:
        nan = float("nan")
        return {"dice": 0.0, "iou": 0.0, "hd95": nan, "assd": nan, "surface_dice": 0.0, "empty_mismatch": 1.0}
    inter = int(np.logical_and(p, r).sum())
    edges_p, edges_r = get_mask_edges(p, r, crop=True)
    # Both directed distance sets once; HD95, ASSD and surface Dice all derive from them.
    d_pr = np.asarray(get_surface_distance(edges_p, edges_r, spacing=spacing), dtype=np.float64)
    d_rp = np.asarray(get_surface_distance(edges_r, edges_p, spacing=spacing), dtype=np.float64)
    n_surf = d_pr.size + d_rp.size
    # MONAI returns float32 distances: a distance equal to the tolerance (common on a grid: 2 mm at 1 mm
    # spacing) may come back a hair above it, so "within" allows a relative 1e-6.
    within = tol * (1 + 1e-6)
    return {
        "dice": 2 * inter / (n_p + n_r),
        "iou": inter / (n_p + n_r - inter),
        "hd95": float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))),
        "assd": float((d_pr.sum() + d_rp.sum()) / n_surf),
        "surface_dice": float(((d_pr <= within).sum() + (d_rp <= within).sum()) / n_surf),
        "empty_mismatch": 0.0,
    }


def aggregate_semantic(cases: Iterable[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of :func:`semantic_metrics` results over cases, NaN (empty-mismatch) distances left out.

    Returns:
        ``{name: {"dice", "iou", "hd95", "assd", "surface_dice", "n_cases", "n_empty_mismatch"}}``; a
        distance mean is NaN when every case was an empty mismatch.
    """
    per_class: dict[str, list[Mapping[str, float]]] = {}
    for case in cases:
        for name, values in case.items():
            per_class.setdefault(name, []).append(values)
    out = {}
    for name, rows in per_class.items():
        summary = {}
        for k in SEMANTIC_KEYS:
            v = np.array([row[k] for row in rows], dtype=np.float64)
            summary[k] = float(np.mean(v[~np.isnan(v)])) if (~np.isnan(v)).any() else float("nan")
        summary["n_cases"] = float(len(rows))
        summary["n_empty_mismatch"] = float(sum(row["empty_mismatch"] for row in rows))
        out[name] = summary
    return out


# -- semantic, all classes ----------------------------------------------------------------------------------


def confusion_matrix(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel counts ``[C, C]``: row = reference class, column = predicted class.

    Sum these over cases for dataset-level :func:`overall_from_confusion`.
    """
    _check_same_shape(pred, ref)
    p, r = pred.ravel().astype(np.int64), ref.ravel().astype(np.int64)
    for name, x in (("pred", p), ("ref", r)):
        if x.size and (x.min() < 0 or x.max() >= num_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}), "
                f"got min {x.min()} and max {x.max()}"
            )
    return np.bincount(r * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def overall_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Pixel accuracy, mean pixel accuracy and frequency-weighted IoU from a confusion matrix.

    Mean pixel accuracy averages the recall of the classes present in the reference; frequency-weighted
    IoU weights each class's IoU by its reference frequency (absent classes weigh 0).
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    if total == 0:
        raise ValueError("the confusion matrix is empty (no pixels); expected at least one pixel")
    tp, ref_count, pred_count = np.diag(cm), cm.sum(1), cm.sum(0)
    present = ref_count > 0
    iou = tp[present] / (ref_count + pred_count - tp)[present]
    return {
        "pixel_accuracy": float(tp.sum() / total),
        "mean_pixel_accuracy": float(np.mean(tp[present] / ref_count[present])),
        "fw_iou": float(np.sum(ref_count[present] / total * iou)),
    }


def overall_metrics(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> dict[str, float]:
    """``pixel_accuracy``, ``mean_pixel_accuracy`` and ``fw_iou`` of one case (labels ``H W [D]``)."""
    return overall_from_confusion(confusion_matrix(pred, ref, num_classes))


# -- instance -----------------------------------------------------------------------------------------------


def instance_metrics(
    pred_inst: np.ndarray, ref_inst: np.ndarray, thresholds: Sequence[float] = np.arange(0.5, 1.0, 0.05)
) -> dict[str, float]:
    """AP at IoU thresholds, mean AP, F1 at 0.5 and panoptic quality of two instance maps.

    Args:
        pred_inst: predicted instance ids, ``H W [D]`` non-negative integers, 0 = background; ids need not
            be consecutive.
        ref_inst: reference instance ids, same shape and convention.
        thresholds: IoU thresholds of the APs; keys are ``ap_<round(100 t)>``.

    Returns:
        ``ap_50 .. ap_95``, ``map`` (their mean), ``f1_50``, ``tp_50``, ``fp_50``, ``fn_50``, ``pq``,
        ``sq``, ``rq``, ``n_pred``, ``n_ref``, and ``merges``, ``merged_refs``, ``splits``, ``split_preds``
        of :func:`merges_and_splits`. Both maps empty: every score is 1. Otherwise, without a
        pair of IoU > 0.5 (e.g. exactly one map empty), ``sq`` is NaN (nothing to average) and ``pq`` 0.
    """
    _check_same_shape(pred_inst, ref_inst)
    ref_lab, n_ref = _relabel(ref_inst, "ref_inst")
    pred_lab, n_pred = _relabel(pred_inst, "pred_inst")
    table = _contingency(ref_lab, n_ref, pred_lab, n_pred)
    rows, cols, ious = table.rows, table.cols, table.ious()

    out: dict[str, float] = {}
    for t in np.round(np.asarray(thresholds, dtype=np.float64), 6):  # 0.8 == 4/5, not 0.8000000000000003
        out[f"ap_{round(t * 100)}"] = _ratio(_n_matches(rows, cols, ious >= t, n_ref, n_pred), n_pred + n_ref)
    out["map"] = float(np.mean(list(out.values())))

    tp = _n_matches(rows, cols, ious >= 0.5, n_ref, n_pred)
    out["f1_50"] = 1.0 if n_pred + n_ref == 0 else 2 * tp / (n_pred + n_ref)
    out.update(tp_50=float(tp), fp_50=float(n_pred - tp), fn_50=float(n_ref - tp))

    # Panoptic quality (Kirillov et al.): IoU > 0.5 makes each pair unique, no assignment needed.
    matched = ious[ious > 0.5]
    if n_pred + n_ref == 0:
        sq = rq = pq = 1.0
    else:
        rq = 2 * matched.size / (n_pred + n_ref)
        sq = float(matched.mean()) if matched.size else float("nan")
        pq = sq * rq if matched.size else 0.0
    out.update(pq=pq, sq=sq, rq=rq)
    out.update(n_pred=float(n_pred), n_ref=float(n_ref))
    out.update(_merges_and_splits(table))
    return out


def equivalent_diameter(size: float, dims: int) -> float:
    """Diameter of the disc (2D) or ball (3D) of ``size`` pixels or voxels: an object's size as a length."""
    unit = np.pi if dims == 2 else 4.0 / 3.0 * np.pi  # area of a unit disc / volume of a unit ball
    return 2.0 * (float(size) / unit) ** (1.0 / dims)


def merges_and_splits(pred_inst: np.ndarray, ref_inst: np.ndarray, coverage: float = 0.5) -> dict[str, float]:
    """Count the predictions that merge references and the references split into several predictions.

    Args:
        pred_inst: predicted instance ids, ``H W [D]``, 0 = background.
        ref_inst: reference instance ids, same shape and convention.
        coverage: the share of a reference (for merges) or of a prediction (for splits) that must lie in
            the other instance for it to count.

    Returns:
        ``merges`` (predictions covering >= ``coverage`` of each of >= 2 references), ``merged_refs`` (the
        references inside those merges), ``splits`` (references holding >= ``coverage`` of each of >= 2
        predictions) and ``split_preds`` (the predictions inside those splits), as floats.
    """
    _check_same_shape(pred_inst, ref_inst)
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
    ref_lab, n_ref = _relabel(ref_inst, "ref_inst")
    pred_lab, n_pred = _relabel(pred_inst, "pred_inst")
    return _merges_and_splits(_contingency(ref_lab, n_ref, pred_lab, n_pred), coverage)


def _merges_and_splits(table: _Contingency, coverage: float = 0.5) -> dict[str, float]:
    # Each overlapping pair votes once: for its prediction when it covers most of the reference, for its
    # reference when it holds most of the prediction; a prediction (reference) with >= 2 votes merges (splits).
    inter = table.inter
    refs_per_pred = np.bincount(table.cols[inter >= coverage * table.area_r[table.rows]], minlength=table.n_pred)
    preds_per_ref = np.bincount(table.rows[inter >= coverage * table.area_p[table.cols]], minlength=table.n_ref)
    merged, split = refs_per_pred[refs_per_pred >= 2], preds_per_ref[preds_per_ref >= 2]
    return {"merges": float(merged.size), "merged_refs": float(merged.sum()),
            "splits": float(split.size), "split_preds": float(split.sum())}


def _ratio(tp: int, n_pred_plus_ref: int) -> float:
    """TP / (TP + FP + FN) with FP + FN = n_pred + n_ref - 2 TP; 1 when both maps are empty."""
    denom = n_pred_plus_ref - tp
    return 1.0 if denom == 0 else tp / denom


def _relabel(inst: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Map instance ids to 1..n (0 stays background) so they can index bincounts."""
    if not np.issubdtype(inst.dtype, np.integer) and inst.dtype != bool:
        raise ValueError(f"{name} must hold integer instance ids, got dtype {inst.dtype}")
    flat = inst.ravel().astype(np.int64)
    if flat.size == 0:
        return flat, 0
    if flat.min() < 0:
        raise ValueError(f"{name} must hold non-negative instance ids (0 = background), got min {flat.min()}")
    if flat.max() <= flat.size:  # a lookup table is linear time; np.unique would sort
        ids = np.flatnonzero(np.bincount(flat)[1:]) + 1
        lut = np.zeros(flat.max() + 1, dtype=np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[flat], int(ids.size)
    ids, inverse = np.unique(flat, return_inverse=True)
    has_background = ids[0] == 0
    return (inverse if has_background else inverse + 1), int(ids.size - has_background)


class _Contingency(NamedTuple):
    """The overlapping (ref, pred) pairs of two relabelled instance maps and the instances' areas."""

    rows: np.ndarray  # 0-based reference index of each overlapping pair
    cols: np.ndarray  # 0-based prediction index of each pair
    inter: np.ndarray  # pixels the pair shares
    area_r: np.ndarray  # pixels of each reference, ``n_ref``
    area_p: np.ndarray  # pixels of each prediction, ``n_pred``
    n_ref: int
    n_pred: int

    def ious(self) -> np.ndarray:
        """IoU of each pair (all other pairs have IoU 0)."""
        return self.inter / (self.area_r[self.rows] + self.area_p[self.cols] - self.inter)


def _contingency(ref: np.ndarray, n_ref: int, pred: np.ndarray, n_pred: int) -> _Contingency:
    """The sparse contingency table of two relabelled maps, in one pass over the pixels."""
    both = (ref > 0) & (pred > 0)
    inter = sparse.coo_matrix(
        (np.ones(int(both.sum()), dtype=np.int64), (ref[both] - 1, pred[both] - 1)), shape=(n_ref, n_pred)
    )
    inter.sum_duplicates()
    area_r = np.bincount(ref, minlength=n_ref + 1)[1:]
    area_p = np.bincount(pred, minlength=n_pred + 1)[1:]
    return _Contingency(inter.row, inter.col, inter.data, area_r, area_p, n_ref, n_pred)


def _pair_ious(ref: np.ndarray, n_ref: int, pred: np.ndarray, n_pred: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every overlapping (ref, pred) pair.

    Returns:
        0-based ref indices, pred indices and IoUs of the pairs that overlap (all other IoUs are 0).
    """
    table = _contingency(ref, n_ref, pred, n_pred)
    return table.rows, table.cols, table.ious()


def _n_matches(rows: np.ndarray, cols: np.ndarray, keep: np.ndarray, n_ref: int, n_pred: int) -> int:
    """Size of the largest one-to-one matching among the kept pairs (Hopcroft-Karp on a sparse graph).

    Above IoU 0.5 each instance has at most one candidate, so this is just the number of kept pairs;
    at 0.5 exactly and below, ties need the matching.
    """
    if not keep.any():
        return 0
    graph = sparse.csr_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(n_ref, n_pred))
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())


# -- fast torch Dice for validation during training ---------------------------------------------------------


def dice_per_class(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard Dice of every class of every sample, on the tensors' device.

    Args:
        pred: predicted labels ``B H W [D]`` (or ``B 1 H W [D]``), integers in ``[0, num_classes)``.
        ref: reference labels, same shape.
        num_classes: number of classes, background included.

    Returns:
        ``B C`` float tensor, background in column 0; NaN where a class is absent from both the
        prediction and the reference of that sample (use ``torch.nanmean`` to average).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} does not match ref shape {tuple(ref.shape)}")
    b, c = pred.shape[0], num_classes
    p, r = pred.reshape(b, -1).long(), ref.reshape(b, -1).long()
    lo, hi = int(torch.minimum(p.min(), r.min())), int(torch.maximum(p.max(), r.max()))
    if lo < 0 or hi >= c:
        raise ValueError(f"labels must lie in [0, {c - 1}] (num_classes={c}), got min {lo} and max {hi}")
    # One bincount gives the B x C x C confusion matrices: intersections on the diagonal.
    offsets = torch.arange(b, device=p.device)[:, None] * c * c
    cm = torch.bincount((offsets + r * c + p).ravel(), minlength=b * c * c).reshape(b, c, c).double()
    inter = torch.diagonal(cm, dim1=1, dim2=2)
    return (2 * inter / (cm.sum(1) + cm.sum(2))).float()  # 0 / 0 = NaN: class absent in both


# -- checks -------------------------------------------------------------------------------------------------


def _check_same_shape(pred: np.ndarray, ref: np.ndarray) -> None:
    if np.shape(pred) != np.shape(ref):
        raise ValueError(f"pred shape {np.shape(pred)} does not match ref shape {np.shape(ref)}")


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = (float(spacing),) * ndim if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if len(values) != ndim or min(values) <= 0:
        raise ValueError(f"spacing must be one positive number per axis ({ndim} axes), got {spacing}")
    return values
