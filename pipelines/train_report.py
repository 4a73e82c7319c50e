"""What a training run reports: the MLflow run it starts (params, tags, dataset, system metrics), the per-epoch log
line, and the artifacts and model it leaves in MLflow."""

from __future__ import annotations

import csv
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from medseg.config import ExperimentConfig, config_to_dict, dump_config
from medseg.data.datalist import DatasetInfo
from medseg.engine import distributed as dist
from medseg.engine.checkpoint import load_checkpoint
from medseg.tracking import Tracker, environment_tags
from medseg.visualize import learning_curves, overlay_montage
from pipelines.common import dataset_digest, display_slice
from pipelines.cv import fold_tags, parent_run

log = logging.getLogger("medseg.train")


def start_tracking(cfg: ExperimentConfig, output_dir: Path, dataset: DatasetInfo, state: Any,
                    dist_info: dist.DistInfo, fresh: bool) -> tuple[Tracker, dict[str, str]]:
    """Rank 0 writes the resolved config and starts (or resumes) the MLflow run: params, tags, the dataset
    (absolute source, content digest) and system metrics; every rank learns the run id. Also returns the tags a
    registered version of the model gets (dataset digest and source, git commit)."""
    experiment = cfg.tracking.experiment or cfg.experiment.name
    fold = cfg.data.fold
    run_name = cfg.experiment.run_name or f"{experiment}-{cfg.model.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if fold is not None:
        run_name += f"-fold{fold}"
    parent = parent_run(cfg, output_dir.parent) if fold is not None and fresh and dist_info.is_main else None
    tracker = Tracker(cfg.tracking.uri, experiment, run_name=run_name, run_id=state.run_id, fallback_dir=output_dir,
                      enabled=cfg.tracking.enabled and dist_info.is_main, system_metrics=True)
    source = Path(cfg.data.root).resolve()
    version_tags: dict[str, str] = {}
    if dist_info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "config.yaml")
        state.run_id = tracker.start()
        if tracker.enabled and state.dataset_digest is None:
            state.dataset_digest = dataset_digest(dataset)
        env = environment_tags()
        version_tags = {"dataset.digest": state.dataset_digest or "", "dataset.source": str(source),
                        "git.commit": env.get("mlflow.source.git.commit", "unknown")}
        if fresh:
            tracker.log_params(config_to_dict(cfg))
            tracker.set_tags({**env, "medseg.dataset_digest": state.dataset_digest or "",
                              "medseg.device": str(dist_info.device), "medseg.world_size": str(dist_info.world_size),
                              "medseg.dataset": str(source), "medseg.run_folder": str(output_dir.resolve()),
                              **(fold_tags(cfg, parent) if fold is not None else {})})
            profile = {"cases": len(dataset.cases), "label_kind": cfg.data.label_kind,
                       "spatial_dims": cfg.data.spatial_dims}
            tracker.log_dataset(source.name, source, state.dataset_digest or "", profile=profile)
    state.run_id = dist.broadcast_object(state.run_id, dist_info)
    return tracker, version_tags


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    val = "  ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items() if k.startswith("val/"))
    parts = ", ".join(f"{k[11:]} {v:.4f}" for k, v in metrics.items() if k.startswith("train/loss_"))
    log.info(
        "epoch %d: loss %.4f (%s)  %s  lr %.2e  %.1f samples/s  data %.1fs / compute %.1fs",
        epoch, metrics.get("train/loss", float("nan")), parts, val or "(no validation)", metrics["train/lr"],
        metrics["time/samples_per_s"], metrics["time/data_s"], metrics["time/compute_s"],
    )


def log_run_artifacts(output_dir: Path, tracker: Tracker, model: torch.nn.Module, metadata: dict[str, Any],
                      state: Any, registered_model_name: str | None, version_tags: dict[str, str]) -> None:
    """Artifacts: resolved config, learning curves, the best checkpoint's validation montage and CSV, the best
    checkpoint and the model, which carries the ``best/*`` metrics (also the run's, at the best epoch)."""
    art = output_dir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    tracker.log_artifact(output_dir / "config.yaml")
    if state.history:
        tracker.log_artifact(learning_curves(state.history, art / "learning_curves.png", best_epoch=state.best_epoch))
    per_case = state.best_per_case or state.per_case
    if per_case:
        with open(art / "validation_cases.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(per_case[0]))
            writer.writeheader()
            writer.writerows(per_case)
        tracker.log_artifact(art / "validation_cases.csv")
    if state.best_examples:
        classes = sorted(metadata["classes"], key=metadata["classes"].get)
        tracker.log_artifact(_montage(state.best_examples, per_case, classes, state.best_epoch,
                                      art / "validation_overlay.png"))
    elif state.best_epoch is not None:
        log.info("no validation overlay: the best epoch (%d) was before this resumed part of the run", state.best_epoch)
    best_path = output_dir / "checkpoints" / "best.pt"
    weights = best_path if best_path.is_file() else output_dir / "checkpoints" / "last.pt"
    if weights.is_file() and not state.interrupted:
        tracker.log_artifact(weights, "checkpoints")
        model.load_state_dict(load_checkpoint(weights)["model"])
        model.cpu().eval()
        best = state.best_metrics
        description = None
        if best:
            chosen = (f"instance AP@0.5:0.95 {best.get('best/ap', float('nan')):.4f} (untuned post-processing), "
                      if state.monitor == "ap" else "")
            description = (f"{metadata['model']['name']} trained on {version_tags.get('dataset.source', '?')}: best "
                           f"validation {chosen}Dice {best.get('best/dice_mean', float('nan')):.4f} (mean over "
                           f"foreground classes) at epoch {int(best['best/epoch'])}; MLflow run {tracker.run_id}")
        tags = {**version_tags, **{k.replace("best/", "val_"): f"{v:.4f}" for k, v in best.items()
                                   if k != "best/epoch"}}
        tracker.log_model(model, metadata, registered_model_name=registered_model_name, metrics=best,
                          step=state.best_epoch or 0, version_tags=tags, description=description)
    tracker.end("KILLED" if state.interrupted else "FINISHED")


def _montage(examples: list, per_case: list[dict], classes: list[str], epoch: int | None, out: Path) -> Path:
    """Validation panels titled by case and Dice, a legend naming each class's colour."""
    images, refs, preds, titles = [], [], [], []
    for i, (image, ref, pred) in enumerate(examples):
        picture, ref2d, pred2d = display_slice(image, ref, pred)
        images.append(picture)
        refs.append(ref2d)
        preds.append(pred2d)
        row = per_case[i] if i < len(per_case) else {}
        dice = row.get("dice_mean", float("nan"))
        titles.append(f"{row.get('case', f'case {i}')}  Dice {dice:.3f}")
    title = f"validation at the best epoch ({epoch})" if epoch is not None else "validation"
    return overlay_montage(images, refs, out, preds=preds, titles=titles, class_names=classes[1:], title=title)
