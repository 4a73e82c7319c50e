"""Metrics on hand-made cases with known values, the empty conventions, and fast-equals-naive checks."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, gaussian_filter
from scipy.spatial.distance import cdist

from medseg.metrics import (
    _pair_ious,
    _relabel,
    aggregate_semantic,
    confusion_matrix,
    dice_per_class,
    equivalent_diameter,
    instance_metrics,
    merges_and_splits,
    overall_metrics,
    semantic_metrics,
)

# -- semantic, per class ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_offset_squares_dice_iou_hd95(k):
    n = 20
    ref = np.zeros((40, 40), np.uint8)
    ref[10 : 10 + n, 10 : 10 + n] = 1
    pred = np.roll(ref, k, axis=1)
    m = semantic_metrics(pred, ref, {"fg": 1}, spacing=2.0)["fg"]
    assert m["dice"] == pytest.approx((n - k) / n)  # overlap n(n-k) over 2 n^2 / 2
    assert m["iou"] == pytest.approx((n - k) / (n + k))
    assert m["hd95"] == pytest.approx(2.0 * k)  # the shifted side is k pixels of 2 mm away
    assert m["empty_mismatch"] == 0.0


def _shifted_sheets(shape, axis, shift):
    """A one-voxel-thick line (2D) or slab (3D) across ``axis`` and its copy ``shift`` voxels along ``axis``.

    A one-voxel sheet is its own surface, and every point lies exactly ``shift`` voxels from the other sheet.
    """
    ref = np.zeros(shape, np.uint8)
    index = [slice(2, s - 2) for s in shape]
    index[axis] = slice(4, 5)
    ref[tuple(index)] = 1
    return np.roll(ref, shift, axis=axis), ref


@pytest.mark.parametrize(
    "shape, spacing, axis",
    [
        ((12, 16), (2.0, 0.5), 0),
        ((12, 16), (2.0, 0.5), 1),
        ((10, 10, 10), (3.0, 1.0, 0.5), 0),
        ((10, 10, 10), (3.0, 1.0, 0.5), 2),
    ],
)
def test_anisotropic_distances_follow_the_spacing_of_the_shifted_axis(shape, spacing, axis):
    pred, ref = _shifted_sheets(shape, axis, shift=3)
    expected = 3 * spacing[axis]
    m = semantic_metrics(pred, ref, {"lesion": 1}, spacing=spacing, tolerance=expected)["lesion"]
    assert m["hd95"] == pytest.approx(expected) and m["assd"] == pytest.approx(expected)
    assert m["surface_dice"] == 1.0  # a distance equal to the tolerance is within it
    tighter = semantic_metrics(pred, ref, [1], spacing=spacing, tolerance=0.9 * expected)["1"]
    assert tighter["surface_dice"] == 0.0


def test_surface_dice_by_hand():
    ref = np.zeros((12, 16), np.uint8)
    ref[5, 2:12] = 1
    pred = np.zeros_like(ref)
    pred[5, 2:7] = 1  # 5 points on the reference
    pred[8, 7:12] = 1  # 5 points 3 away
    # pred -> ref: 5 of 10 within 1; ref -> pred: columns 2..6 at 0, column 7 at 1 (to (5, 6)), rest >= 2.
    m = semantic_metrics(pred, ref, [1], tolerance=1.0)["1"]
    assert m["surface_dice"] == pytest.approx((5 + 6) / 20)


def _naive_surface_metrics(pred, ref, spacing, tol):
    """All-pairs distances between surface voxels (mask minus its erosion), in physical units."""
    pts = [np.argwhere(m & ~binary_erosion(m)) * np.asarray(spacing) for m in (pred, ref)]
    d = cdist(pts[0], pts[1])
    d_pr, d_rp = d.min(1), d.min(0)
    both = np.concatenate([d_pr, d_rp])
    return {
        "hd95": max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)),
        "assd": both.mean(),
        "surface_dice": (both <= tol).mean(),
    }


@pytest.mark.parametrize("shape, spacing", [((24, 20), (0.7, 1.9)), ((12, 14, 10), (2.5, 0.8, 1.2))])
def test_surface_metrics_equal_the_naive_all_pairs_version(shape, spacing):
    rng = np.random.default_rng(0)
    pred, ref = (gaussian_filter(rng.random(shape), 2) > 0.5 for _ in range(2))
    # A tolerance no distance is close to: exact ties are decided by float rounding (see the next test).
    fast = semantic_metrics(pred.astype(np.uint8), ref.astype(np.uint8), [1], spacing=spacing, tolerance=2.05)
    naive = _naive_surface_metrics(pred, ref, spacing, 2.05)
    for key, value in naive.items():
        assert fast["1"][key] == pytest.approx(value, rel=1e-5), key


def test_empty_conventions():
    empty, blob = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    blob[2:5, 2:5] = 1
    both = semantic_metrics(empty, empty, [1])["1"]
    assert both == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0, "surface_dice": 1.0, "empty_mismatch": 0.0}
    for pred, ref in [(empty, blob), (blob, empty)]:
        one = semantic_metrics(pred, ref, [1])["1"]
        assert (one["dice"], one["iou"], one["surface_dice"], one["empty_mismatch"]) == (0.0, 0.0, 0.0, 1.0)
        assert math.isnan(one["hd95"]) and math.isnan(one["assd"])


def test_aggregate_leaves_nan_distances_out_and_counts_them():
    blob = np.zeros((8, 8), np.uint8)
    blob[2:5, 2:5] = 1
    shifted = np.roll(blob, 1, axis=0)
    cases = [semantic_metrics(p, r, {"fg": 1}) for p, r in [(blob, blob), (shifted, blob), (0 * blob, blob)]]
    summary = aggregate_semantic(cases)["fg"]
    assert summary["n_cases"] == 3 and summary["n_empty_mismatch"] == 1
    assert summary["hd95"] == pytest.approx((0.0 + 1.0) / 2)  # the mismatch case is left out
    assert summary["dice"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)  # but its Dice of 0 counts


def test_class_names_and_several_classes():
    ref = np.zeros((10, 10), np.int64)
    ref[:5] = 1
    ref[5:] = 2
    m = semantic_metrics(ref, ref, {"background": 0, "liver": 1, "tumour": 2, "absent": 3})
    assert set(m) == {"background", "liver", "tumour", "absent"}
    assert all(v["dice"] == 1.0 and v["hd95"] == 0.0 for v in m.values())


def test_semantic_errors():
    with pytest.raises(ValueError, match=r"pred shape \(4, 4\) does not match ref shape \(4, 5\)"):
        semantic_metrics(np.zeros((4, 4)), np.zeros((4, 5)), [1])
    with pytest.raises(ValueError, match="one positive number per axis"):
        semantic_metrics(np.zeros((4, 4)), np.zeros((4, 4)), [1], spacing=(1.0, 1.0, 1.0))


# -- semantic, all classes ----------------------------------------------------------------------------------


def test_overall_metrics_by_hand():
    ref = np.array([[0, 1, 2, 2]])
    pred = np.array([[0, 1, 1, 2]])
    m = overall_metrics(pred, ref, num_classes=4)  # class 3 absent: left out of MPA, weight 0 in FWIoU
    assert m["pixel_accuracy"] == pytest.approx(3 / 4)
    assert m["mean_pixel_accuracy"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    # IoU: class 0 = 1, class 1 = 1/2, class 2 = 1/2; frequencies 1/4, 1/4, 1/2.
    assert m["fw_iou"] == pytest.approx(1 / 4 * 1 + 1 / 4 * 1 / 2 + 1 / 2 * 1 / 2)
    assert overall_metrics(ref, ref, 4) == {"pixel_accuracy": 1.0, "mean_pixel_accuracy": 1.0, "fw_iou": 1.0}


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"pred labels must lie in \[0, 2\].*max 5"):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 3)


# -- instance -----------------------------------------------------------------------------------------------


def _three_cells_two_found(ids=(7, 9, 4)):
    """3 reference cells of 100 px; 2 predicted at IoU 0.8 (80 px inside), 1 false positive."""
    ref = np.zeros((40, 40), np.int64)
    pred = np.zeros_like(ref)
    ref[0:10, 0:10], ref[15:25, 0:10], ref[30:40, 30:40] = 1, 2, 3
    pred[0:10, 0:8], pred[15:25, 0:8], pred[30:35, 0:5] = ids
    return pred, ref


def test_instance_metrics_by_hand():
    m = instance_metrics(*_three_cells_two_found())
    assert m["ap_50"] == pytest.approx(2 / 4)  # TP 2, FP 1, FN 1
    assert m["ap_80"] == pytest.approx(2 / 4)  # IoU exactly 0.8 still counts at 0.8
    assert m["ap_85"] == 0.0
    assert m["map"] == pytest.approx(7 * 0.5 / 10)  # thresholds 0.50 .. 0.80 of 0.50 .. 0.95
    assert m["f1_50"] == pytest.approx(2 / 3)
    assert (m["tp_50"], m["fp_50"], m["fn_50"], m["n_pred"], m["n_ref"]) == (2, 1, 1, 3, 3)
    assert m["sq"] == pytest.approx(0.8) and m["rq"] == pytest.approx(2 / 3)
    assert m["pq"] == pytest.approx(0.8 * 2 / 3)


def test_instance_ids_do_not_matter_and_the_measure_is_symmetric():
    reference = instance_metrics(*_three_cells_two_found())
    assert instance_metrics(*_three_cells_two_found(ids=(10**9, 5, 2**40))) == pytest.approx(reference)
    pred, ref = _three_cells_two_found()
    swapped = instance_metrics(ref, pred)
    assert swapped["map"] == pytest.approx(reference["map"]) and swapped["pq"] == pytest.approx(reference["pq"])


def test_matching_is_one_to_one_at_an_iou_tie():
    ref = np.zeros((10, 10), np.int64)
    ref[:, :] = 1
    pred = np.zeros_like(ref)
    pred[:, :5], pred[:, 5:] = 1, 2  # two halves, each IoU exactly 0.5 with the one reference cell
    m = instance_metrics(pred, ref)
    assert m["ap_50"] == pytest.approx(1 / 2)  # one TP, one FP, not two TPs
    assert m["pq"] == 0.0 and math.isnan(m["sq"])  # PQ needs IoU > 0.5


def test_instance_empty_conventions():
    empty, cells = np.zeros((8, 8), np.int64), np.zeros((8, 8), np.int64)
    cells[1:3, 1:3], cells[5:7, 5:7] = 1, 2
    both = instance_metrics(empty, empty)
    assert all(both[k] == 1.0 for k in ("ap_50", "ap_95", "map", "f1_50", "pq", "sq", "rq"))
    for pred, ref in [(empty, cells), (cells, empty)]:
        one = instance_metrics(pred, ref)
        assert all(one[k] == 0.0 for k in ("ap_50", "map", "f1_50", "pq", "rq")) and math.isnan(one["sq"])


def test_instance_metrics_in_3d():
    ref = np.zeros((6, 10, 10), np.int64)
    ref[1:5, 1:5, 1:5], ref[1:5, 6:9, 6:9] = 1, 2
    m = instance_metrics(ref.copy(), ref)
    assert m["map"] == 1.0 and m["pq"] == 1.0 and m["n_ref"] == 2


def test_sparse_ious_equal_the_naive_loop():
    rng = np.random.default_rng(1)
    ref_inst, pred_inst = (rng.integers(0, 6, (16, 16)) for _ in range(2))
    ref, n_ref = _relabel(ref_inst, "ref")
    pred, n_pred = _relabel(pred_inst, "pred")
    rows, cols, ious = _pair_ious(ref, n_ref, pred, n_pred)
    fast = np.zeros((n_ref, n_pred))
    fast[rows, cols] = ious
    naive = np.array(
        [
            [((ref == i) & (pred == j)).sum() / ((ref == i) | (pred == j)).sum() for j in range(1, n_pred + 1)]
            for i in range(1, n_ref + 1)
        ]
    )
    np.testing.assert_allclose(fast, naive)


def _merge_and_split_scene(shape):
    """Five touching reference cells along the last axis; one prediction merges cells 1+2, cell 3 is cut in
    two, cell 4 is found, and one prediction spreads thinly over cell 5 and the background."""
    ref = np.zeros(shape, np.int64)
    pred = np.zeros_like(ref)
    inner = (slice(2, 10),) * (len(shape) - 1)
    for i in range(5):
        ref[(*inner, slice(2 + 10 * i, 12 + 10 * i))] = i + 1  # no background between neighbours
    pred[(*inner, slice(2, 22))] = 40  # covers cells 1 and 2 entirely: a merge of 2
    pred[(*inner, slice(22, 27))], pred[(*inner, slice(27, 32))] = 7, 8  # cell 3 in two halves: a split of 2
    pred[(*inner, slice(32, 42))] = 3  # cell 4 exactly
    pred[(*inner, slice(48, 60))] = 9  # 4 of cell 5's 10 columns (< 0.5 of it) plus 8 of background
    return pred, ref


@pytest.mark.parametrize("shape", [(12, 64), (12, 12, 64)], ids=["2d", "3d"])
def test_merges_and_splits_by_hand(shape):
    pred, ref = _merge_and_split_scene(shape)
    expected = {"merges": 1, "merged_refs": 2, "splits": 1, "split_preds": 2}
    assert merges_and_splits(pred, ref) == expected
    m = instance_metrics(pred, ref)
    assert {k: m[k] for k in expected} == expected
    # The merge and a half reach IoU 0.5 exactly with one cell each; at 0.75 only cell 4 is found.
    assert m["tp_50"] == 3 and m["ap_75"] == pytest.approx(1 / (5 + 5 - 1))
    # Swapping prediction and reference turns every merge into a split and back.
    assert merges_and_splits(ref, pred) == {"merges": 1, "merged_refs": 2, "splits": 1, "split_preds": 2}


def test_merges_and_splits_follow_the_coverage_threshold():
    ref = np.zeros((10, 20), np.int64)
    ref[:, :10], ref[:, 10:] = 1, 2
    pred = np.zeros_like(ref)
    pred[:, 3:15] = 5  # 7/10 of cell 1 and 5/10 of cell 2 (exactly half counts)
    assert merges_and_splits(pred, ref)["merges"] == 1
    assert merges_and_splits(pred, ref, coverage=0.6) == {"merges": 0, "merged_refs": 0, "splits": 0,
                                                         "split_preds": 0}
    assert merges_and_splits(np.zeros_like(ref), ref)["merges"] == 0
    with pytest.raises(ValueError, match="coverage"):
        merges_and_splits(pred, ref, coverage=0)


def test_merges_and_splits_equal_the_naive_count():
    rng = np.random.default_rng(3)
    seen = {"merges": 0, "splits": 0}
    for k in range(20):
        # Blocky random maps, coarse on one side, so that merges and splits both occur.
        fine, coarse = rng.integers(0, 9, (6, 6)), rng.integers(0, 5, (3, 3))
        fine, coarse = np.kron(fine, np.ones((2, 2), np.int64)), np.kron(coarse, np.ones((4, 4), np.int64))
        ref, pred = (fine, coarse) if k % 2 else (coarse, fine)
        ids_r, ids_p = np.unique(ref[ref > 0]), np.unique(pred[pred > 0])
        inter = np.array([[((ref == i) & (pred == j)).sum() for j in ids_p] for i in ids_r]).reshape(len(ids_r), -1)
        area_r = np.array([(ref == i).sum() for i in ids_r])[:, None]
        area_p = np.array([(pred == j).sum() for j in ids_p])[None, :]
        refs_per_pred = ((inter >= 0.5 * area_r) & (inter > 0)).sum(0)
        preds_per_ref = ((inter >= 0.5 * area_p) & (inter > 0)).sum(1)
        naive = {"merges": (refs_per_pred >= 2).sum(), "merged_refs": refs_per_pred[refs_per_pred >= 2].sum(),
                 "splits": (preds_per_ref >= 2).sum(), "split_preds": preds_per_ref[preds_per_ref >= 2].sum()}
        assert merges_and_splits(pred, ref) == naive
        seen = {key: seen[key] + naive[key] for key in seen}
    assert seen["merges"] > 0 and seen["splits"] > 0  # the comparison was not only of zeros


def test_instance_errors():
    with pytest.raises(ValueError, match="integer instance ids"):
        instance_metrics(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int64))
    with pytest.raises(ValueError, match="non-negative"):
        instance_metrics(-np.ones((4, 4), np.int64), np.zeros((4, 4), np.int64))


# -- fast torch Dice ----------------------------------------------------------------------------------------


def test_dice_per_class_matches_the_numpy_metric_and_marks_absent_classes():
    rng = np.random.default_rng(2)
    pred, ref = rng.integers(0, 3, (2, 12, 12)), rng.integers(0, 3, (2, 12, 12))
    dice = dice_per_class(torch.from_numpy(pred), torch.from_numpy(ref), num_classes=4)
    assert dice.shape == (2, 4)
    for b in range(2):
        expected = semantic_metrics(pred[b], ref[b], [0, 1, 2])
        for c in range(3):
            assert dice[b, c].item() == pytest.approx(expected[str(c)]["dice"], rel=1e-6)
    assert torch.isnan(dice[:, 3]).all()  # class 3 absent from both


def test_dice_per_class_errors():
    with pytest.raises(ValueError, match="does not match"):
        dice_per_class(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5), 2)
    with pytest.raises(ValueError, match=r"\[0, 1\].*max 2"):
        dice_per_class(torch.full((1, 4, 4), 2), torch.zeros(1, 4, 4), 2)


def test_equivalent_diameter_of_a_disc_and_a_ball():
    assert equivalent_diameter(np.pi * 5.0**2, 2) == pytest.approx(10.0)
    assert equivalent_diameter(4.0 / 3.0 * np.pi * 3.0**3, 3) == pytest.approx(6.0)
