"""Instance figures of an instance model's training: AP at every validation (with the post-processing
thresholds training starts from), and, as the last step, the thresholds tuned on the validation cases."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.config import ExperimentConfig
from medseg.engine.checkpoint import load_checkpoint, save_checkpoint
from medseg.instances import Representation, tune_thresholds
from medseg.metrics import instance_metrics
from medseg.tracking import Tracker
from pipelines.common import instances_metadata

log = logging.getLogger("medseg.train")


def tune_instances(cfg: ExperimentConfig, rep: Representation, model: torch.nn.Module, predictor, val_loader,
                   tracker: Tracker, ckpt_dir: Path, step: int) -> dict[str, Any]:
    """Choose the post-processing thresholds on the validation cases with the best weights (a small grid
    maximising AP@0.5:0.95; thresholds set in ``instances.postprocess`` stay fixed), log them and the validation
    instance scores to MLflow, and write them into the checkpoints' metadata, so ``predict --instances`` uses
    them. With ``instances.tune: false`` the configured thresholds are only scored.

    Returns:
        the metadata entry ``instances`` (:func:`pipelines.common.instances_metadata` plus ``tuning``).
    """
    weights = ckpt_dir / "best.pt" if (ckpt_dir / "best.pt").is_file() else ckpt_dir / "last.pt"
    model.load_state_dict(load_checkpoint(weights)["model"])
    cases = _validation_outputs(predictor, val_loader, len(cfg.data.classes))
    fixed = dict(cfg.instances.postprocess) if cfg.instances.tune else rep.check_thresholds(cfg.instances.postprocess)
    started = time.perf_counter()
    result = tune_thresholds(rep, cases, min_size=cfg.inference.min_instance_size, fixed=fixed)
    meta = instances_metadata(cfg, result.thresholds)
    meta["tuning"] = {"cases": len(cases), "map": result.score, "ap_50": result.ap50,
                      "default_map": result.default_score, "combinations": len(result.table),
                      "seconds": round(time.perf_counter() - started, 2),
                      # the outputs tuned on, as `medseg predict` makes them (TTA, precision)
                      "tta": predictor.tta, "precision": str(predictor.amp_dtype or torch.float32)}
    log.info("instances (%s): thresholds %s, validation AP@0.5 %.4f, AP@0.5:0.95 %.4f (defaults %.4f) on %d cases",
             rep.name, result.thresholds, result.ap50, result.score, result.default_score, len(cases))
    tracker.log_params({f"instances.thresholds.{n}": v for n, v in result.thresholds.items()})
    if cases:
        tracker.log_metrics({"val/instance_ap50": result.ap50, "val/instance_map": result.score,
                             "val/instance_map_default_thresholds": result.default_score}, step=step)
    for name in ("best", "last"):
        path = ckpt_dir / f"{name}.pt"
        if path.is_file():
            state = load_checkpoint(path)
            state["metadata"] = {**state["metadata"], "instances": meta}
            save_checkpoint(path, state)
    return meta


def instance_scorer(cfg: ExperimentConfig, rep: Representation,
                    num_classes: int) -> Callable[[dict, torch.Tensor], dict[str, float]]:
    """Per-case instance figures for each validation (``medseg.engine.loop.evaluate``'s ``case_metrics``).

    The case's output (classes, then regression channels) goes through ``rep``'s post-processing with the
    thresholds training starts from (the representation's defaults, ``instances.postprocess`` over them; the
    tuned ones exist only after the last epoch) and is scored against its reference instances: ``ap``
    (AP@0.5:0.95), ``ap50``, ``merges`` and ``splits``. A case without reference instances gets none.
    """
    thresholds = rep.check_thresholds(cfg.instances.postprocess)
    min_size = cfg.inference.min_instance_size

    def score(batch: dict, output: torch.Tensor) -> dict[str, float]:
        if "instance" not in batch:
            return {}
        out = output.detach().float().cpu().numpy()
        regression = out[num_classes:] if out.shape[0] > num_classes else None
        pred = rep.postprocess(out[:num_classes], regression, min_size=min_size, **thresholds)
        figures = instance_metrics(pred, _reference(batch))
        return {"ap": figures["map"], "ap50": figures["ap_50"], "merges": figures["merges"],
                "splits": figures["splits"]}

    return score


def _reference(batch: dict) -> np.ndarray:
    ref = batch["instance"][0, 0]
    return (ref.as_tensor() if hasattr(ref, "as_tensor") else ref).cpu().numpy().astype(np.int64)


@torch.inference_mode()
def _validation_outputs(predictor, val_loader, num_classes: int) -> list[tuple]:
    """``(probabilities K *S, regression R *S or None, reference instances *S)`` of every validation case."""
    cases = []
    for batch in val_loader:
        if "instance" not in batch:
            continue
        out = predictor(batch["image"][0]).float().cpu().numpy()
        cases.append((out[:num_classes], out[num_classes:] if out.shape[0] > num_classes else None,
                      _reference(batch)))
    return cases
