"""Cross-validation: the parent MLflow run that gathers the folds, and ``medseg cv RUNS``, the summary.

A fold run lives in ``<output_dir>/fold_K`` and is an MLflow child (``mlflow.parentRunId``) of one parent run
recorded in ``<output_dir>/cv_parent.json``; the first fold to start creates it (under a file lock, so folds
started in parallel agree). ``medseg cv <output_dir | CONFIG.yaml>`` reads each fold's validation per-case
metrics (``fold_K/artifacts/validation_cases.csv``) and, for instance models, the fold's validation instance
scores (AP@0.5, AP@0.5:0.95 with the tuned thresholds, from the best checkpoint's metadata), prints per-fold
and overall means and logs them to the parent run.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import logging
import math
import re
import sys
from pathlib import Path

from medseg.config import ExperimentConfig
from medseg.data.loaders import split_cases
from medseg.data.splits import load_or_create_folds
from medseg.engine.checkpoint import load_checkpoint
from medseg.errors import ConfigError, DataError
from medseg.tracking import Tracker

log = logging.getLogger("medseg.cv")

PARENT_FILE = "cv_parent.json"


def fold_dir(output_dir: Path, fold: int) -> Path:
    return Path(output_dir) / f"fold_{fold}"


def parent_run(cfg: ExperimentConfig, cv_dir: Path) -> str | None:
    """The id of the cross-validation parent run of ``cv_dir``, created (and recorded) on first use."""
    if not cfg.tracking.enabled:
        return None
    cv_dir.mkdir(parents=True, exist_ok=True)
    record = cv_dir / PARENT_FILE
    with open(cv_dir / ".cv_parent.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.is_file():
            return json.loads(record.read_text())["run_id"]
        name = cfg.tracking.experiment or cfg.experiment.name
        tracker = Tracker(cfg.tracking.uri, name, run_name=f"{cfg.experiment.run_name or name} cv")
        run_id = tracker.start()
        tracker.set_tags({"medseg.cv": "parent", "medseg.folds": cfg.data.folds, "medseg.output_dir": str(cv_dir)})
        tracker.end("FINISHED")
        record.write_text(json.dumps({"run_id": run_id, "uri": tracker.uri, "experiment": name}) + "\n")
        return run_id


def fold_tags(cfg: ExperimentConfig, parent: str | None) -> dict[str, str]:
    tags = {"medseg.fold": str(cfg.data.fold), "medseg.folds": str(cfg.data.folds)}
    if parent:
        tags["mlflow.parentRunId"] = parent  # MLflow's own nesting: the UI shows the folds under the parent
    return tags


def splits_path(cfg: ExperimentConfig) -> Path:
    return Path(cfg.data.splits) if cfg.data.splits else Path(cfg.data.root) / "splits.json"


def split_for(cfg: ExperimentConfig, names: list[str]) -> tuple[list[int], list[int]]:
    """Training and validation case indices: fold ``data.fold`` of the dataset's folds, else a seeded split."""
    if cfg.data.folds is not None:
        if cfg.data.fold is None:
            raise ConfigError("data.fold", f"data.folds is {cfg.data.folds}: train one fold at a time with "
                                           f"--fold K (K = 0..{cfg.data.folds - 1})")
        try:
            folds = load_or_create_folds(splits_path(cfg), names, cfg.data.folds, cfg.experiment.seed)
        except ValueError as err:
            if isinstance(err, DataError):
                raise
            raise ConfigError("data.folds", str(err)) from None
        val = set(folds[cfg.data.fold]["val"])
        train = set(folds[cfg.data.fold]["train"])
        return [i for i, n in enumerate(names) if n in train], [i for i, n in enumerate(names) if n in val]
    try:
        return split_cases(names, cfg.data.val_fraction, cfg.data.val_cases, cfg.experiment.seed)
    except ValueError as err:
        raise ConfigError("data.val_cases", str(err)) from None


# -- medseg cv -----------------------------------------------------------------------------------------


def _read_cases(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def runs_folder(source: Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """The folder holding ``fold_K``: ``source`` itself, or the output folder of the config file ``source``."""
    if source.is_file():
        from pipelines.common import load_experiment  # the config loader of every command

        return load_experiment(source, overrides).output_dir
    if not source.is_dir():
        raise DataError(source, "a run folder holding fold_0 .. fold_K-1, or the experiment's config file")
    return source


def instance_scores(folder: Path) -> dict[str, float]:
    """A fold's validation instance scores (tuned thresholds), from its best (else last) checkpoint."""
    for name in ("best.pt", "last.pt"):
        path = folder / "checkpoints" / name
        if path.is_file():
            tuning = (load_checkpoint(path).get("metadata") or {}).get("instances", {}).get("tuning") or {}
            scores = {"instance_ap50": tuning.get("ap_50"), "instance_map": tuning.get("map")}
            return {k: float(v) for k, v in scores.items() if v is not None}
    return {}


def summarize(cv_dir: Path) -> dict:
    """Per fold and overall means of every numeric column of the folds' validation per-case tables, plus
    the folds' instance scores (per fold only: they are computed over a fold's cases together)."""
    folds = sorted((p for p in Path(cv_dir).glob("fold_*") if re.fullmatch(r"fold_\d+", p.name)),
                   key=lambda p: int(p.name[5:]))
    if not folds:
        raise DataError(cv_dir, "no fold_K run folders (train them with: medseg train CONFIG --fold K)")
    per_fold, cases = {}, []
    for folder in folds:
        table = folder / "artifacts" / "validation_cases.csv"
        if not table.is_file():
            log.warning("%s: no validation table yet (unfinished fold?); skipped", folder)
            continue
        rows = _read_cases(table)
        numeric = [k for k in rows[0] if k != "case" and _is_number(rows[0][k])] if rows else []
        per_fold[folder.name] = {k: _mean([float(r[k]) for r in rows]) for k in numeric}
        per_fold[folder.name].update(instance_scores(folder))
        cases += [{"fold": folder.name, **r} for r in rows]
    if not per_fold:
        raise DataError(cv_dir, "no fold has finished validation yet")
    keys = sorted({k for m in per_fold.values() for k in m})
    # a per-case mean where there are per-case values; a fold-level score is weighted by the fold's cases
    overall = {k: _mean([float(c[k]) for c in cases if k in c and _is_number(c[k])]) for k in keys}
    sizes = {name: sum(c["fold"] == name for c in cases) for name in per_fold}
    for k in keys:
        if math.isnan(overall[k]):
            pairs = [(m[k], sizes[n]) for n, m in per_fold.items() if k in m and not math.isnan(m[k])]
            total = sum(w for _, w in pairs)
            overall[k] = sum(v * w for v, w in pairs) / total if total else float("nan")
    return {"folds": per_fold, "mean_over_cases": overall,
            "mean_over_folds": {k: _mean([m[k] for m in per_fold.values() if k in m]) for k in keys},
            "cases": len(cases), "missing_folds": [p.name for p in folds if p.name not in per_fold]}


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def run_cv_cli(args: argparse.Namespace) -> int:
    cv_dir = runs_folder(Path(args.runs), args.overrides)
    summary = summarize(cv_dir)
    keys = list(summary["mean_over_cases"])
    width = max(len(k) for k in keys) if keys else 4
    sys.stdout.write(f"{'':{width}}  " + "  ".join(f"{f:>8}" for f in summary["folds"]) + "      mean\n")
    for k in keys:
        cells = "  ".join(f"{m.get(k, float('nan')):8.4f}" for m in summary["folds"].values())
        sys.stdout.write(f"{k:{width}}  {cells}  {summary['mean_over_cases'][k]:8.4f}\n")
    (cv_dir / "cv_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['cases']} validation cases in {len(summary['folds'])} folds; wrote {cv_dir / 'cv_summary.json'}")
    record = cv_dir / PARENT_FILE
    if record.is_file() and not args.no_tracking:
        parent = json.loads(record.read_text())
        tracker = Tracker(args.tracking_uri or parent["uri"], parent["experiment"], run_id=parent["run_id"])
        tracker.start()
        tracker.log_metrics({f"cv/{k}": v for k, v in summary["mean_over_cases"].items()}, step=0)
        for name, metrics in summary["folds"].items():
            tracker.log_metrics({f"fold/{k}": v for k, v in metrics.items()}, step=int(name[5:]))
        tracker.log_artifact(cv_dir / "cv_summary.json")
        tracker.end("FINISHED")
        print(f"logged to the cross-validation parent run {parent['run_id']}")
    return 0
