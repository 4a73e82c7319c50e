"""`medseg train`: build everything from one config, run the loop, checkpoint, and track the run in MLflow.

The same command runs under ``torchrun --nproc-per-node N`` (DDP): every process trains on its shard of each
epoch's samples, rank 0 alone validates, writes checkpoints and talks to MLflow.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.config import ExperimentConfig, config_to_dict, dump_config, load_config
from medseg.data.datalist import to_datalist
from medseg.data.loaders import make_dataset, make_eval_loader, make_train_loader, seed_epoch, split_cases
from medseg.engine import distributed as dist
from medseg.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from medseg.engine.loop import StepSettings, evaluate, resolve_amp, train_one_epoch
from medseg.engine.optim import build_optimizer, build_scheduler
from medseg.errors import ConfigError, DataError
from medseg.inference import SlidingWindowPredictor
from medseg.losses import DiceWeightedCELoss, deep_supervision_weights
from medseg.metrics import dice_per_class
from medseg.nets import build_network
from medseg.tracking import Tracker, environment_tags
from medseg.visualize import learning_curves, overlay_montage
from pipelines.common import (
    dataset_fingerprint,
    display_slice,
    model_metadata,
    resolve_dataset,
    training_transform,
    validation_transform,
)
from pipelines.progress import Progress

log = logging.getLogger("medseg.train")


@dataclass
class TrainResult:
    output_dir: Path
    epochs_run: int
    best_metric: float | None  # validation mean foreground-class Dice (selects the best checkpoint)
    best_epoch: int | None
    best_foreground_dice: float | None  # all foreground classes as one, at the best epoch
    run_id: str | None
    interrupted: str | None  # the signal's name when a signal stopped the run


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current step; it then saves and exits cleanly."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: stopping after this step and saving a checkpoint", self.signal)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_train_cli(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    cfg = load_config(args.config, overrides)
    result = train(cfg, output_dir=args.output, resume=args.resume)
    if result.interrupted:
        print(f"interrupted by {result.interrupted}; checkpoint saved. Continue with: --resume auto")
        return 128 + int(getattr(signal, result.interrupted))
    if result.best_metric is not None and result.best_foreground_dice is not None:
        print(f"best validation foreground Dice {result.best_foreground_dice:.4f} (mean of per-class Dice "
              f"{result.best_metric:.4f}) at epoch {result.best_epoch}")
    print(f"run folder: {result.output_dir}" + (f"   MLflow run: {result.run_id}" if result.run_id else ""))
    return 0


def _resume_path(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        last = output_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise DataError(path, "checkpoint to resume from does not exist")
    return path


def _iterations_per_epoch(cfg: ExperimentConfig, n_train: int) -> int:
    return cfg.train.iterations_per_epoch or max(1, math.ceil(n_train / cfg.train.batch_size))


def build_loss(cfg: ExperimentConfig, model: torch.nn.Module, num_classes: int) -> DiceWeightedCELoss:
    """The training loss, with ``loss.deep_supervision_weights`` (or the network's default) checked against
    the outputs the network returns: one weight per output, and a trained head for the one prediction uses."""
    heads = tuple(model.head_names)
    spec = cfg.loss.deep_supervision_weights or model.default_deep_supervision_weights
    key = "loss.deep_supervision_weights"
    try:
        weights = deep_supervision_weights(spec, len(heads))
    except ValueError as err:
        raise ConfigError(key, f"{err}; the network's outputs are {', '.join(heads)}") from None
    used = getattr(model, "eval_head", heads[0])
    if weights[heads.index(used)] == 0:
        raise ConfigError(key, f"the head on {used}, which prediction uses (model.params.prune_level), gets weight 0 "
                               f"and would never be trained; the outputs are {', '.join(heads)}")
    if len(heads) > 1:
        log.info("deep-supervision weights: %s", ", ".join(f"{h} {w:.3f}" for h, w in zip(heads, weights)))
    return DiceWeightedCELoss(
        num_classes=num_classes,
        dice_weight=cfg.loss.dice_weight,
        ce_weight=cfg.loss.ce_weight,
        include_background=cfg.loss.include_background,
        class_weights=cfg.loss.class_weights,
        ds_weights=weights,
    )


def train(cfg: ExperimentConfig, output_dir: Path | None = None, resume: str | None = None) -> TrainResult:
    """Train from a validated config. Returns where the run is and how it went."""
    info_d = dist.init_distributed(cfg.train.device)
    try:
        return _train(cfg, Path(output_dir or cfg.output_dir), resume, info_d)
    finally:
        dist.cleanup_distributed()


def _train(cfg: ExperimentConfig, output_dir: Path, resume: str | None, dinfo) -> TrainResult:
    device = dinfo.device
    if device.type == "cpu":  # denormal floats made some CPU steps ~50x slower at random (benchmarks/train_step.py)
        torch.set_flush_denormal(True)
    cfg, info = resolve_dataset(cfg)
    names = [c.name for c in info.cases]
    try:
        train_idx, val_idx = split_cases(names, cfg.data.val_fraction, cfg.data.val_cases, cfg.experiment.seed)
    except ValueError as err:
        raise ConfigError("data.val_cases", str(err)) from None
    records = to_datalist(info.cases)
    train_data = [records[i] for i in train_idx]
    val_data = [records[i] for i in val_idx]
    class_names = sorted(cfg.data.classes, key=cfg.data.classes.get)

    if cfg.experiment.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.experiment.seed)

    t_transform = training_transform(cfg)
    train_ds = make_dataset(train_data, t_transform, cfg.data.cache, cfg.data.num_workers)
    first = train_ds[0]
    first = first[0] if isinstance(first, list) else first
    in_channels = int(first["image"].shape[0])
    iters = _iterations_per_epoch(cfg, len(train_data))
    loader = make_train_loader(
        train_ds,
        batch_size=cfg.train.batch_size,
        samples_per_epoch=iters * cfg.train.batch_size * dinfo.world_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.experiment.seed,
        rank=dinfo.rank,
        world_size=dinfo.world_size,
        pin_memory=device.type == "cuda",
    )
    val_loader = None
    if val_data and dinfo.is_main:
        val_ds = make_dataset(val_data, validation_transform(cfg), cfg.data.cache, cfg.data.num_workers)
        val_loader = make_eval_loader(val_ds)

    model = build_network(
        cfg.model.name, cfg.model.params, spatial_dims=cfg.data.spatial_dims, in_channels=in_channels,
        num_classes=len(class_names),
    ).to(device)
    if cfg.train.channels_last and cfg.data.spatial_dims == 2:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dinfo.enabled:
        ddp_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ddp_ids)
    loss_fn = build_loss(cfg, model, len(class_names))
    optimizer = build_optimizer(net.parameters(), cfg.train.optimizer)
    scheduler = build_scheduler(optimizer, cfg.train.scheduler, cfg.train.epochs, iters)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    settings = StepSettings(device, amp_dtype, cfg.train.grad_clip, cfg.train.channels_last)

    # ---- resume
    ckpt_dir = output_dir / "checkpoints"
    start_epoch, step, skip, best, best_epoch, best_fg, run_id = 0, 0, 0, None, None, None, None
    history: dict[str, list[float]] = {}
    resume_from = _resume_path(resume, output_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        skip = int(state.get("step_in_epoch", 0))
        best, best_epoch, best_fg = state.get("best_metric"), state.get("best_epoch"), state.get("best_foreground")
        run_id, history = state.get("mlflow_run_id"), dict(state.get("history", {}))
        restore_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d (+%d steps)", resume_from, start_epoch, skip)
        stopped_early = state.get("finished") and state["config"]["train"]["epochs"] == cfg.train.epochs
        if (start_epoch >= cfg.train.epochs or stopped_early) and skip == 0:
            log.info("%s already finished (%d epochs): nothing to do", output_dir, start_epoch)
            return TrainResult(output_dir, start_epoch, best, best_epoch, best_fg, run_id, None)
    elif resume == "auto":
        log.info("no checkpoint in %s: starting from scratch", ckpt_dir)

    # ---- tracking (rank 0 only)
    metadata = model_metadata(cfg, in_channels)
    tracker = Tracker(
        cfg.tracking.uri,
        cfg.tracking.experiment or cfg.experiment.name,
        run_name=cfg.experiment.run_name,
        run_id=run_id,
        fallback_dir=output_dir,
        enabled=cfg.tracking.enabled and dinfo.is_main,
    )
    if dinfo.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "config.yaml")
        run_id = tracker.start()
        if resume_from is None:
            tracker.log_params(config_to_dict(cfg))
            tags = environment_tags()
            tags.update({
                "medseg.dataset_fingerprint": dataset_fingerprint(info), "medseg.device": str(device),
                "medseg.world_size": str(dinfo.world_size), "medseg.dataset": str(cfg.data.root),
            })
            tracker.set_tags(tags)
    run_id = dist.broadcast_object(run_id, dinfo)

    def save(name: str, epoch: int, step_in_epoch: int, finished: bool = False) -> Path:
        return save_checkpoint(ckpt_dir / f"{name}.pt", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "step": step, "step_in_epoch": step_in_epoch,
            "best_metric": best, "best_epoch": best_epoch, "best_foreground": best_fg, "rng": capture_rng_state(),
            "config": config_to_dict(cfg), "metadata": metadata, "mlflow_run_id": run_id, "history": history,
            "finished": finished,
        })

    predictor = SlidingWindowPredictor(
        model, cfg.transforms.patch_size, len(class_names), overlap=cfg.inference.overlap,
        sw_batch_size=cfg.inference.sw_batch_size, device=device, amp=amp_dtype is not None,
    )
    patience = cfg.train.early_stopping.patience
    since_best = 0
    examples: list = []
    per_case: list = []
    interrupted = None
    epoch = start_epoch
    log.info(
        "training %s (%s parameters) on %d cases, validating on %d, %d iterations/epoch, device %s%s",
        cfg.model.name, f"{sum(p.numel() for p in model.parameters()):,}", len(train_data), len(val_data), iters,
        device, f", {dinfo.world_size} processes" if dinfo.enabled else "",
    )
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.train.epochs):
            seed_epoch(loader, cfg.experiment.seed, epoch)
            progress = Progress(f"epoch {epoch + 1}/{cfg.train.epochs}", iters, enabled=dinfo.is_main)
            t0 = time.perf_counter()
            res = train_one_epoch(
                net, loader, loss_fn, optimizer, scheduler, scaler, settings, skip=skip,
                on_step=progress.update, should_stop=lambda: stop.signal is not None,
            )
            progress.close()
            step += res.iterations
            if res.interrupted:
                interrupted = stop.signal
                if dinfo.is_main:
                    save("last", epoch, skip + res.iterations)
                break
            skip = 0
            metrics = {f"train_{k}": dist.all_reduce_mean(v, dinfo) for k, v in res.losses.items()}
            metrics.update({
                "lr": scheduler.lr, "epoch_seconds": time.perf_counter() - t0,
                "samples_per_second": res.samples_per_second * dinfo.world_size,
                "data_seconds": res.data_seconds, "compute_seconds": res.compute_seconds,
            })
            val_metric = None
            if val_loader is not None and ((epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs):
                vres, examples = evaluate(predictor, val_loader, class_names, dice_per_class, keep=6)
                per_case = vres.per_case
                metrics.update({f"val_{k}": v for k, v in vres.mean.items()})
                val_metric = vres.mean.get("dice_mean")
            val_metric = dist.broadcast_object(val_metric, dinfo)
            scheduler.step_epoch(val_metric)
            improved = val_metric is not None and not math.isnan(val_metric) and (
                best is None or val_metric > best + cfg.train.early_stopping.min_delta
            )
            if improved:
                best, best_epoch, since_best = val_metric, epoch + 1, 0
                best_fg = metrics.get("val_dice_foreground")
            elif val_metric is not None:
                since_best += 1
            for k, v in metrics.items():
                history.setdefault(k, []).append(float(v))
            if dinfo.is_main:
                _log_epoch(epoch + 1, metrics, res)
                if improved:
                    save("best", epoch + 1, 0)
                save("last", epoch + 1, 0)
                tracker.log_metrics(metrics, step=epoch + 1)
            if patience is not None and since_best >= patience:
                log.info("early stopping: no improvement for %d validations (best %.4f at epoch %s)",
                         since_best, best, best_epoch)
                epoch += 1
                break
        else:
            epoch = cfg.train.epochs
    if dinfo.is_main:
        if interrupted is None:
            save("last", epoch, 0, finished=True)  # a later --resume auto has nothing left to do
        _finish(output_dir, tracker, model, metadata, history, per_case, examples, cfg, interrupted)
    dist.barrier(dinfo)
    return TrainResult(output_dir, epoch, best, best_epoch, best_fg, run_id, interrupted)


def _log_epoch(epoch: int, metrics: dict[str, float], res) -> None:
    val = "  ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items() if k.startswith("val_"))
    log.info(
        "epoch %d: loss %.4f (%s)  %s  lr %.2e  %.1f samples/s  data %.1fs / compute %.1fs",
        epoch, metrics.get("train_loss", float("nan")),
        ", ".join(f"{k[6:]} {v:.4f}" for k, v in metrics.items() if k.startswith("train_") and k != "train_loss"),
        val or "(no validation)", metrics["lr"], metrics["samples_per_second"], res.data_seconds,
        res.compute_seconds,
    )


def _finish(output_dir, tracker, model, metadata, history, per_case, examples, cfg, interrupted) -> None:
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
        tracker.log_model(model, metadata, registered_model_name=cfg.tracking.registered_model_name)
    tracker.end("KILLED" if interrupted else "FINISHED")


def _montage(examples, out: Path) -> Path:
    images, refs, preds = [], [], []
    for image, ref, pred in examples:
        picture, ref2d, pred2d = display_slice(image, ref, pred)
        images.append(picture)
        refs.append(ref2d)
        preds.append(pred2d)
    return overlay_montage(images, refs, out, preds=preds, titles=[f"val {i}" for i in range(len(images))])


if __name__ == "__main__":  # `torchrun -m pipelines.train CONFIG ...` works as well as `torchrun $(which medseg) train`
    from pipelines.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
