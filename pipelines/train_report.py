"""What a training run reports: the per-epoch log line, and the artifacts and model it leaves in MLflow."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch

from medseg.engine.checkpoint import load_checkpoint
from medseg.tracking import Tracker
from medseg.visualize import learning_curves, overlay_montage
from pipelines.common import display_slice

log = logging.getLogger("medseg.train")


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    val = "  ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items() if k.startswith("val_"))
    log.info(
        "epoch %d: loss %.4f (%s)  %s  lr %.2e  %.1f samples/s  data %.1fs / compute %.1fs",
        epoch, metrics.get("train_loss", float("nan")),
        ", ".join(f"{k[6:]} {v:.4f}" for k, v in metrics.items() if k.startswith("train_") and k != "train_loss"),
        val or "(no validation)", metrics["lr"], metrics["samples_per_second"], metrics["data_seconds"],
        metrics["compute_seconds"],
    )


def log_run_artifacts(output_dir: Path, tracker: Tracker, model: torch.nn.Module, metadata: dict[str, Any],
                      history: dict[str, list[float]], per_case: list[dict], examples: list,
                      registered_model_name: str | None, interrupted: str | None) -> None:
    """Artifacts: resolved config, learning curves, validation montage and CSV, best checkpoint, the model."""
    art = output_dir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    tracker.log_artifact(output_dir / "config.yaml")
    if history:
        tracker.log_artifact(learning_curves(history, art / "learning_curves.png"))
    if per_case:
        with open(art / "validation_cases.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(per_case[0]))
            writer.writeheader()
            writer.writerows(per_case)
        tracker.log_artifact(art / "validation_cases.csv")
    if examples:
        tracker.log_artifact(_montage(examples, art / "validation_overlay.png"))
    best_path = output_dir / "checkpoints" / "best.pt"
    weights = best_path if best_path.is_file() else output_dir / "checkpoints" / "last.pt"
    if weights.is_file() and not interrupted:
        tracker.log_artifact(weights, "checkpoints")
        model.load_state_dict(load_checkpoint(weights)["model"])
        model.cpu().eval()
        tracker.log_model(model, metadata, registered_model_name=registered_model_name)
    tracker.end("KILLED" if interrupted else "FINISHED")


def _montage(examples, out: Path) -> Path:
    images, refs, preds = [], [], []
    for image, ref, pred in examples:
        picture, ref2d, pred2d = display_slice(image, ref, pred)
        images.append(picture)
        refs.append(ref2d)
        preds.append(pred2d)
    return overlay_montage(images, refs, out, preds=preds, titles=[f"val {i}" for i in range(len(images))])

