"""`medseg evaluate`: score predicted label maps against references, per case and per class.

Pairs files by case name (``case.nii.gz`` in both folders; with ``--instances`` the prediction's
``case_instances.*`` is used when present). Writes ``metrics.csv`` (one row per case and class) and
``summary.json`` (means, plus instance and overall figures; with ``--instances`` also the merges and splits that
explain a low AP, per case and in total), prints a table, and optionally logs the summary to
an MLflow run. A reference case without a prediction is scored as an empty prediction and listed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.readers import is_hidden, is_image_path, load_image, spacing_of, split_name
from medseg.errors import DataError
from medseg.metrics import (
    aggregate_semantic,
    confusion_matrix,
    instance_metrics,
    overall_from_confusion,
    semantic_metrics,
)

log = logging.getLogger("medseg.evaluate")

# Instance counts that add up over cases (the summary gives their totals beside the per-case means).
COUNT_KEYS = ("n_ref", "n_pred", "tp_50", "fp_50", "fn_50", "merges", "merged_refs", "splits", "split_preds")
# What the per-case instance table shows: enough to see which cases lose AP and whether to merges or splits.
CASE_KEYS = ("n_ref", "n_pred", "ap_50", "map", "pq", "merges", "merged_refs", "splits", "split_preds")
TABLE_CASES = 20  # the per-case table lists at most this many cases, the worst by AP@0.5 first


def _index(folder: Path, suffix: str = "") -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(folder, "expected a folder of label maps")
    out = {}
    for p in sorted(folder.iterdir()):
        if is_hidden(p) or not is_image_path(p):
            continue
        stem, _ = split_name(p)
        if suffix:
            if not stem.endswith(suffix):
                continue
            stem = stem[: -len(suffix)]
        elif stem.endswith("_instances"):
            continue
        out[stem] = p
    return out


def _class_names(ref_dir: Path, values: set[int]) -> dict[str, int]:
    """Names from a dataset.json next to the reference folder, else ``class_<id>``."""
    names: dict[int, str] = {}
    for candidate in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
        if candidate.is_file():
            try:
                labels = json.loads(candidate.read_text()).get("labels", {})
                names = {int(v): k for k, v in labels.items()}
            except (ValueError, AttributeError):
                names = {}
            break
    return {names.get(v, f"class_{v}"): v for v in sorted(values) if v != 0}


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    img = load_image(path)
    arr = np.asarray(img)[0]
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.round(arr)):
        raise DataError(path, "expected a label map of non-negative integers")
    return arr.astype(np.int64), spacing_of(img)


def evaluate_folders(pred_dir: Path, ref_dir: Path, *, instances: bool = False, tolerance: float = 1.0
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-case rows and a summary. With ``instances``, semantic figures are for the foreground (pred > 0 vs
    ref > 0) and instance figures (AP@0.5:0.95, F1, PQ, merges and splits) are added: per case in the rows
    and ``instance_cases``, as means over cases in ``instances``, and summed in ``instance_totals``."""
    refs = _index(ref_dir)
    if not refs:
        raise DataError(ref_dir, "no reference label maps found")
    preds = _index(pred_dir, "_instances") if instances else {}
    plain = _index(pred_dir)
    for case, path in plain.items():
        preds.setdefault(case, path)
    loaded = {}
    for case, path in refs.items():
        loaded[case] = _read(path)
    if instances:
        classes = {"foreground": 1}
    else:
        values: set[int] = set()
        for arr, _ in loaded.values():
            values |= set(np.unique(arr).tolist())
        classes = _class_names(ref_dir, values)
    rows, per_case_sem, per_case_inst, missing = [], [], [], []
    num_classes = max(classes.values()) + 1
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for case, (ref, spacing) in loaded.items():
        if case in preds:
            pred, _ = _read(preds[case])
            if pred.shape != ref.shape:
                raise DataError(preds[case], f"shape {pred.shape} differs from the reference's {ref.shape}")
        else:
            missing.append(case)
            pred = np.zeros_like(ref)
        inst: dict[str, float] = {}
        if instances:
            inst = instance_metrics(pred, ref)
            per_case_inst.append(inst)
            pred_s, ref_s = (pred > 0).astype(np.int64), (ref > 0).astype(np.int64)
        else:
            pred_s, ref_s = pred, ref
        sem = semantic_metrics(pred_s, ref_s, classes, spacing=spacing, tolerance=tolerance)
        per_case_sem.append(sem)
        confusion += confusion_matrix(np.clip(pred_s, 0, num_classes - 1), np.clip(ref_s, 0, num_classes - 1),
                                      num_classes)
        for name, m in sem.items():
            rows.append({"case": case, "class": name, **{k: m[k] for k in m}, **inst,
                         "missing_prediction": int(case in missing)})
    summary: dict[str, Any] = {
        "n_cases": len(loaded),
        "missing_predictions": missing,
        "tolerance": tolerance,
        "per_class": aggregate_semantic(per_case_sem),
        "overall": overall_from_confusion(confusion),  # pooled over all cases' pixels
    }
    if instances:
        keys = per_case_inst[0].keys()
        summary["instances"] = {k: float(np.nanmean([c[k] for c in per_case_inst])) for k in keys}
        summary["instance_totals"] = {k: float(sum(c[k] for c in per_case_inst)) for k in COUNT_KEYS}
        summary["instance_cases"] = {case: {k: c[k] for k in CASE_KEYS} for case, c in zip(loaded, per_case_inst)}
    return rows, summary


def _table(summary: dict[str, Any]) -> str:
    lines = [f"{'class':<14}{'Dice':>8}{'IoU':>8}{'HD95':>9}{'ASSD':>9}{'SurfDice':>10}"]
    for name, m in summary["per_class"].items():
        lines.append(f"{name:<14}{m['dice']:>8.4f}{m['iou']:>8.4f}{m['hd95']:>9.3f}{m['assd']:>9.3f}"
                     f"{m['surface_dice']:>10.4f}")
    o = summary["overall"]
    lines.append(f"pixel accuracy {o['pixel_accuracy']:.4f}  mean pixel accuracy {o['mean_pixel_accuracy']:.4f}"
                 f"  frequency-weighted IoU {o['fw_iou']:.4f}")
    if "instances" in summary:
        i = summary["instances"]
        lines.append(f"instances: AP50 {i['ap_50']:.4f}  AP75 {i['ap_75']:.4f}  mAP@0.5:0.95 {i['map']:.4f}"
                     f"  F1@0.5 {i['f1_50']:.4f}  PQ {i['pq']:.4f}")
        lines.extend(_instance_lines(summary))
    return "\n".join(lines)


def _instance_lines(summary: dict[str, Any]) -> list[str]:
    """Totals of TP/FP/FN, merges and splits, then the per-case table, worst AP@0.5 first."""
    t = summary["instance_totals"]
    lines = [f"instances in total: {t['n_ref']:.0f} references, {t['n_pred']:.0f} predictions; at IoU 0.5 "
             f"TP {t['tp_50']:.0f}  FP {t['fp_50']:.0f}  FN {t['fn_50']:.0f}",
             f"merges {t['merges']:.0f} (predictions covering >= 2 references, {t['merged_refs']:.0f} references "
             f"in them)  splits {t['splits']:.0f} (references cut into >= 2 predictions, {t['split_preds']:.0f} "
             f"predictions in them)",
             f"{'case':<24}{'refs':>6}{'preds':>7}{'AP50':>8}{'mAP':>8}{'PQ':>8}{'merges':>8}{'splits':>8}"]
    cases = sorted(summary["instance_cases"].items(), key=lambda kv: kv[1]["ap_50"])
    for case, c in cases[:TABLE_CASES]:
        lines.append(f"{case[:23]:<24}{c['n_ref']:>6.0f}{c['n_pred']:>7.0f}{c['ap_50']:>8.4f}{c['map']:>8.4f}"
                     f"{c['pq']:>8.4f}{c['merges']:>8.0f}{c['splits']:>8.0f}")
    if len(cases) > TABLE_CASES:
        lines.append(f"({len(cases) - TABLE_CASES} more cases in metrics.csv)")
    return lines


def run_evaluate_cli(args: argparse.Namespace) -> int:
    rows, summary = evaluate_folders(args.pred, args.ref, instances=args.instances, tolerance=args.tolerance)
    out = args.out or args.pred
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(_table(summary))
    if summary["missing_predictions"]:
        print(f"missing predictions (scored as empty): {', '.join(summary['missing_predictions'])}")
    print(f"wrote {out / 'metrics.csv'} and {out / 'summary.json'}")
    if not args.no_tracking and (args.run_id or args.tracking_uri):
        from medseg.tracking import Tracker, flatten

        experiment = "medseg-evaluate"
        # --run-id adds to that run (a training's) without touching its status or its start and end times
        with Tracker(args.tracking_uri, experiment, run_name="evaluate", run_id=args.run_id, fallback_dir=out,
                     annotate=args.run_id is not None) as t:
            # grouped names, as in training: eval/<class>/dice, eval/overall/pixel_accuracy, eval/instances/ap_50
            flat = flatten({**summary["per_class"], "overall": summary["overall"],
                            "instances": summary.get("instances", {}),
                            "instance_totals": summary.get("instance_totals", {})})
            metrics = {"eval/" + k.replace(".", "/"): float(v) for k, v in flat.items()}
            t.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=0)
            t.log_artifact(out / "summary.json", "evaluation")
            t.log_artifact(out / "metrics.csv", "evaluation")
            print(f"logged to MLflow run {t.run_id}")
    return 1 if summary["missing_predictions"] else 0
