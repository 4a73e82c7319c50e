# Long on purpose (over 450 lines): the training run as its ordered steps (data, parts, resume, epochs, tuning).
"""`medseg train`: build everything from one config, run the loop, checkpoint, and track the run in MLflow.

The same command runs under ``torchrun --nproc-per-node N`` (DDP): every process trains on its shard of each
epoch's samples, rank 0 alone validates, writes checkpoints and talks to MLflow.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medseg.config import ExperimentConfig, config_to_dict, load_config
from medseg.data.datalist import DatasetInfo, to_datalist
from medseg.data.loaders import make_dataset, make_eval_loader, make_train_loader, seed_epoch
from medseg.engine import distributed as dist
from medseg.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from medseg.engine.loop import StepSettings, evaluate, resolve_amp, train_one_epoch
from medseg.engine.optim import build_optimizer, build_scheduler
from medseg.errors import ConfigError, DataError
from medseg.inference import SlidingWindowPredictor
from medseg.instances import Representation
from medseg.instances.loss import InstanceLoss
from medseg.losses import DiceWeightedCELoss, deep_supervision_weights
from medseg.metrics import dice_per_class
from medseg.nets import build_network
from medseg.tracking import Tracker
from pipelines.common import (
    ensure_writable,
    expected_channels,
    load_experiment,
    model_metadata,
    representation,
    resolve_dataset,
    training_transform,
    validation_transform,
)
from pipelines.cv import fold_dir, split_for
from pipelines.progress import Progress, StopFlag
from pipelines.train_report import log_epoch, log_run_artifacts, start_tracking
from pipelines.tune_instances import instance_scorer, tune_instances

log = logging.getLogger("medseg.train")


@dataclass
class TrainResult:
    output_dir: Path
    epochs_run: int
    best_metric: float | None  # the validation figure that selects the best checkpoint (``monitor``)
    best_epoch: int | None
    best_foreground_dice: float | None  # all foreground classes as one, at the best epoch
    run_id: str | None
    interrupted: str | None  # the signal's name when a signal stopped the run
    monitor: str = "dice_mean"  # dice_mean (mean foreground-class Dice) or ap (instance AP@0.5:0.95)


def run_train_cli(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    if args.fold is not None:
        overrides.append(f"data.fold={args.fold}")
    cfg = load_experiment(args.config, overrides)
    result = train(cfg, output_dir=args.output, resume=args.resume)
    if result.interrupted:
        print(f"interrupted by {result.interrupted}; checkpoint saved. Continue with: --resume auto")
        return 128 + int(getattr(signal, result.interrupted))
    if result.best_metric is not None and result.best_foreground_dice is not None:
        if result.monitor == "ap":
            print(f"best validation instance AP@0.5:0.95 {result.best_metric:.4f} (untuned post-processing; "
                  f"foreground Dice {result.best_foreground_dice:.4f}) at epoch {result.best_epoch}")
        else:
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


def _fresh_folder(folder: Path) -> Path:
    """``folder``, or ``folder-2``, ``folder-3``... when it already holds a training (checkpoints or config)."""
    def used(path: Path) -> bool:
        return (path / "config.yaml").exists() or any((path / "checkpoints").glob("*.pt"))

    candidate, n = folder, 1
    while used(candidate):
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    if candidate != folder:
        log.warning("%s holds an earlier training; this one goes to %s (continue the earlier one with --resume auto)",
                    folder, candidate)
    return candidate


def _iterations_per_epoch(cfg: ExperimentConfig, n_train: int) -> int:
    return cfg.train.iterations_per_epoch or max(1, math.ceil(n_train / cfg.train.batch_size))


@dataclass
class _Data:
    """The dataset and its loaders (the validation loader on rank 0 only)."""

    dataset: DatasetInfo
    class_names: list[str]
    n_train: int
    n_val: int
    in_channels: int
    iterations: int  # per epoch and process
    loader: Any
    val_loader: Any | None


@dataclass
class _Components:
    """What one optimisation step needs; ``net`` is ``model`` wrapped in DDP when there are several processes."""

    model: torch.nn.Module
    net: torch.nn.Module
    loss_fn: DiceWeightedCELoss | InstanceLoss
    optimizer: Any
    scheduler: Any
    scaler: torch.amp.GradScaler
    settings: StepSettings
    representation: Representation | None = None  # instance datasets: how instances are learned and split


@dataclass
class _State:
    """Everything a checkpoint carries besides the weights and optimiser state; ``epoch`` counts finished ones."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0  # steps of epoch ``epoch`` already taken (a run interrupted mid-epoch)
    best: float | None = None
    best_epoch: int | None = None
    best_foreground: float | None = None
    monitor: str = "dice_mean"  # the validation figure ``best`` is of (checkpoints before it: dice_mean)
    run_id: str | None = None
    dataset_digest: str | None = None  # content digest, computed once per run
    history: dict[str, list[float]] = field(default_factory=dict)
    finished_epochs: int | None = None  # train.epochs of a run that ended (all epochs or early stopping)
    interrupted: str | None = None  # the signal's name
    since_best: int = 0
    examples: list = field(default_factory=list)  # validation (image, reference, prediction) for the montage
    per_case: list = field(default_factory=list)  # validation rows of the last validation
    best_metrics: dict[str, float] = field(default_factory=dict)  # best/epoch, best/dice_<class>, ...
    best_per_case: list = field(default_factory=list)  # validation rows of the best epoch
    best_examples: list = field(default_factory=list)  # its montage examples (not in checkpoints)


def train(cfg: ExperimentConfig, output_dir: Path | None = None, resume: str | None = None) -> TrainResult:
    """Train from a validated config. Returns where the run is and how it went."""
    dist_info = dist.init_distributed(cfg.train.device, timeout_s=cfg.train.ddp_timeout)
    try:
        folder = Path(output_dir or cfg.output_dir)
        if cfg.data.fold is not None:  # each fold its own run folder; the folder above gathers them (medseg cv)
            folder = fold_dir(folder, cfg.data.fold)
        with dist.collective_errors(dist_info, "train.ddp_timeout"):
            if resume is None:  # a new training never writes into an earlier one's folder
                folder = dist.broadcast_object(_fresh_folder(folder), dist_info)
            return _train(cfg, folder, resume, dist_info)
    finally:
        dist.cleanup_distributed()


def _train(cfg: ExperimentConfig, output_dir: Path, resume: str | None, dist_info: dist.DistInfo) -> TrainResult:
    """The steps of a training run, in order."""
    if dist_info.is_main:  # before any compute, not on config.yaml once the data is cached and the model built
        ensure_writable(output_dir, "run")
    _set_up_torch(cfg, dist_info.device)
    cfg, data = _build_data(cfg, dist_info)
    parts = _build_components(cfg, data, dist_info)
    resume_from = _resume_path(resume, output_dir)
    state = _resume(resume_from, parts, dist_info.device) if resume_from is not None else _State()
    _set_monitor(state, _monitor(cfg, parts.representation))
    if resume == "auto" and resume_from is None:
        log.info("no checkpoint in %s: starting from scratch", output_dir / "checkpoints")
    if _nothing_left(state, cfg):
        log.info("%s already finished (%d epochs): nothing to do", output_dir, state.epoch)
        return _result(output_dir, state)
    metadata = model_metadata(cfg, data.in_channels)
    tracker, version_tags = start_tracking(cfg, output_dir, data.dataset, state, dist_info,
                                           fresh=resume_from is None)
    checkpoints = _Checkpoints(output_dir / "checkpoints", parts, cfg, metadata)
    _run_epochs(cfg, data, parts, state, checkpoints, tracker, dist_info)
    if dist_info.is_main:
        if state.interrupted is None:
            checkpoints.save("last", state, state.epoch, 0, finished=True)  # --resume auto has nothing left to do
            if parts.representation is not None and data.val_loader is not None:  # thresholds for --instances
                predictor = _predictor(cfg, data, parts, dist_info, as_predict=True)
                metadata["instances"] = tune_instances(cfg, parts.representation, parts.model, predictor,
                                                       data.val_loader, tracker, checkpoints.folder, state.epoch)
        log_run_artifacts(output_dir, tracker, parts.model, metadata, state, cfg.tracking.registered_model_name,
                          version_tags)
    dist.barrier(dist_info)
    return _result(output_dir, state)


def retune_run(run_dir: Path) -> dict[str, Any]:
    """Tune a finished run's post-processing thresholds again on its validation cases, as its training's last
    step did: for a model trained before the post-processing changed (the weights stay as they are).

    Returns:
        the new metadata entry ``instances``, also written into ``run_dir/checkpoints``.

    Raises:
        ConfigError: the run has no instance representation or no validation cases.
    """
    cfg = load_config(Path(run_dir) / "config.yaml")
    info = dist.DistInfo()
    cfg, data = _build_data(cfg, info)
    parts = _build_components(cfg, data, info)
    if parts.representation is None or data.val_loader is None:
        raise ConfigError("data.instance_target", f"{run_dir} has no instance representation or no validation "
                                                  "cases to tune its post-processing on")
    tracker = Tracker(None, cfg.experiment.name, fallback_dir=Path(run_dir), enabled=False)
    return tune_instances(cfg, parts.representation, parts.model, _predictor(cfg, data, parts, info, as_predict=True),
                          data.val_loader, tracker, Path(run_dir) / "checkpoints", step=0)


def _set_up_torch(cfg: ExperimentConfig, device: torch.device) -> None:
    if device.type == "cpu":  # denormal floats made some CPU steps ~50x slower at random (benchmarks/train_step.py)
        torch.set_flush_denormal(True)
    if cfg.experiment.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _build_data(cfg: ExperimentConfig, dist_info: dist.DistInfo) -> tuple[ExperimentConfig, _Data]:
    """Find the cases, split train/validation, build the datasets and loaders; fills classes into ``cfg``."""
    cfg, dataset = resolve_dataset(cfg)
    names = [c.name for c in dataset.cases]
    train_idx, val_idx = split_for(cfg, names)
    records = to_datalist(dataset.cases)
    train_data = [records[i] for i in train_idx]
    val_data = [records[i] for i in val_idx]
    torch.manual_seed(cfg.experiment.seed)
    in_channels = expected_channels(dataset)  # every case must have as many: a clear error names one that differs
    train_ds = make_dataset(train_data, training_transform(cfg, in_channels), cfg.data.cache, cfg.data.num_workers)
    iterations = _iterations_per_epoch(cfg, len(train_data))
    loader = make_train_loader(
        train_ds,
        batch_size=cfg.train.batch_size,
        samples_per_epoch=iterations * cfg.train.batch_size * dist_info.world_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.experiment.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        pin_memory=dist_info.device.type == "cuda",
    )
    val_loader = None
    if val_data and dist_info.is_main:
        val_ds = make_dataset(val_data, validation_transform(cfg, in_channels), cfg.data.cache, cfg.data.num_workers)
        val_loader = make_eval_loader(val_ds)
    class_names = sorted(cfg.data.classes, key=cfg.data.classes.get)
    return cfg, _Data(dataset, class_names, len(train_data), len(val_data), in_channels, iterations, loader,
                      val_loader)


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


def _build_components(cfg: ExperimentConfig, data: _Data, dist_info: dist.DistInfo) -> _Components:
    """Network (DDP-wrapped when distributed), loss, optimiser, scheduler, gradient scaler and step settings."""
    device = dist_info.device
    rep = representation(cfg)
    n_reg = rep.regression_channels(cfg.data.spatial_dims) if rep is not None else 0
    model = build_network(
        cfg.model.name, cfg.model.params, spatial_dims=cfg.data.spatial_dims, in_channels=data.in_channels,
        num_classes=len(data.class_names) + n_reg,  # the classes, then the representation's regression channels
    ).to(device)
    if cfg.train.channels_last and cfg.data.spatial_dims == 2:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if dist_info.enabled:
        ddp_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ddp_ids)
    if cfg.train.compile:  # the step runs the compiled graph; checkpoints and validation use the plain model
        net = torch.compile(net)
    optimizer = build_optimizer(net.parameters(), cfg.train.optimizer)
    scheduler = build_scheduler(optimizer, cfg.train.scheduler, cfg.train.epochs, data.iterations)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    settings = StepSettings(device, amp_dtype, cfg.train.grad_clip, cfg.train.channels_last)
    loss_fn = build_loss(cfg, model, len(data.class_names))
    if n_reg:
        loss_fn = InstanceLoss(loss_fn, rep, len(data.class_names), n_reg)
    return _Components(model, net, loss_fn, optimizer, scheduler, scaler, settings, rep)


def _resume(path: Path, parts: _Components, device: torch.device) -> _State:
    """Load weights, optimiser, scheduler, scaler and random state from ``path``; return the run's state."""
    saved = load_checkpoint(path, map_location=device)
    load_weights(parts.model, saved["model"], path, what="the model of this config")
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    parts.scaler.load_state_dict(saved["scaler"])
    restore_rng_state(saved["rng"])
    state = _State(
        epoch=int(saved["epoch"]), step=int(saved["step"]), step_in_epoch=int(saved.get("step_in_epoch", 0)),
        best=saved.get("best_metric"), best_epoch=saved.get("best_epoch"),
        best_foreground=saved.get("best_foreground"), monitor=saved.get("monitor", "dice_mean"),
        run_id=saved.get("mlflow_run_id"),
        history=dict(saved.get("history", {})), best_metrics=dict(saved.get("best_metrics") or {}),
        best_per_case=list(saved.get("best_per_case") or []), dataset_digest=saved.get("dataset_digest"),
        finished_epochs=saved["config"]["train"]["epochs"] if saved.get("finished") else None,
    )
    log.info("resumed from %s at epoch %d (+%d steps)", path, state.epoch, state.step_in_epoch)
    return state


def _monitor(cfg: ExperimentConfig, rep: Representation | None) -> str:
    """The ``val/*`` figure that selects the best checkpoint: ``ap`` or ``dice_mean`` (``train.monitor``).

    Raises:
        ConfigError: ``ap`` asked of semantic labels (no instances to score).
    """
    wanted = cfg.train.monitor
    if wanted == "ap" and rep is None:
        raise ConfigError("train.monitor", "'ap' scores instances, but this dataset's labels are "
                                           f"{cfg.data.label_kind or 'semantic'}; use dice (or auto)")
    return "ap" if wanted == "ap" or (wanted == "auto" and rep is not None) else "dice_mean"


def _set_monitor(state: _State, monitor: str) -> None:
    """A resumed run whose best was of another figure starts its best (and early-stopping count) afresh."""
    if state.best is not None and state.monitor != monitor:
        log.warning("the best checkpoint so far was chosen by val/%s, this run chooses by val/%s (train.monitor): "
                    "the next validation becomes the best", state.monitor, monitor)
        state.best, state.since_best = None, 0
    state.monitor = monitor


def _nothing_left(state: _State, cfg: ExperimentConfig) -> bool:
    """All epochs done, or the run stopped early with the same ``train.epochs`` (a longer run may continue)."""
    done = state.epoch >= cfg.train.epochs or state.finished_epochs == cfg.train.epochs
    return done and state.step_in_epoch == 0


class _Checkpoints:
    """Writes ``checkpoints/<name>.pt``: weights, optimiser, scheduler, scaler, random state and the run state."""

    def __init__(self, folder: Path, parts: _Components, cfg: ExperimentConfig, metadata: dict[str, Any]):
        self.folder, self.parts, self.cfg, self.metadata = folder, parts, cfg, metadata

    def save(self, name: str, state: _State, epoch: int, step_in_epoch: int, finished: bool = False) -> Path:
        parts = self.parts
        return save_checkpoint(self.folder / f"{name}.pt", {
            "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
            "epoch": epoch, "step": state.step, "step_in_epoch": step_in_epoch,
            "best_metric": state.best, "best_epoch": state.best_epoch, "best_foreground": state.best_foreground,
            "monitor": state.monitor, "rng": capture_rng_state(), "config": config_to_dict(self.cfg),
            "metadata": self.metadata,
            "mlflow_run_id": state.run_id, "history": state.history, "finished": finished,
            "best_metrics": state.best_metrics, "best_per_case": state.best_per_case,
            "dataset_digest": state.dataset_digest,
        })


def _predictor(cfg: ExperimentConfig, data: _Data, parts: _Components, dist_info: dist.DistInfo,
               as_predict: bool = False):
    """The validation sliding window; it also returns the representation's regression channels.

    ``as_predict``: with the settings ``medseg predict`` applies (mirror TTA when ``inference.tta``, the
    ``inference.precision``), for tuning the post-processing thresholds on outputs like those they will be
    applied to. Validation during training keeps the training precision and no TTA (its cost every epoch).
    """
    rep, dims = parts.representation, cfg.data.spatial_dims
    n_reg = rep.regression_channels(dims) if rep else 0
    return SlidingWindowPredictor(
        parts.model, cfg.transforms.patch_size, len(data.class_names), overlap=cfg.inference.overlap,
        sw_batch_size=cfg.inference.sw_batch_size, device=dist_info.device,
        amp=cfg.inference.precision if as_predict else parts.settings.amp_dtype, regression_channels=n_reg,
        vector_axes=rep.vector_axes(dims) if n_reg else None, tta=as_predict and cfg.inference.tta,
    )


def _run_epochs(cfg: ExperimentConfig, data: _Data, parts: _Components, state: _State, checkpoints: _Checkpoints,
                tracker: Tracker, dist_info: dist.DistInfo) -> None:
    """Train, validate, checkpoint and log epoch after epoch until the last one, early stopping or a signal."""
    predictor = _predictor(cfg, data, parts, dist_info)
    rep = parts.representation
    scorer = instance_scorer(cfg, rep, len(data.class_names)) if rep is not None else None
    log.info(
        "training %s (%s parameters) on %d cases, validating on %d, %d iterations/epoch, device %s%s",
        cfg.model.name, f"{sum(p.numel() for p in parts.model.parameters()):,}", data.n_train, data.n_val,
        data.iterations, dist_info.device, f", {dist_info.world_size} processes" if dist_info.enabled else "",
    )
    patience = cfg.train.early_stopping.patience
    with StopFlag("medseg.train") as stop:
        for epoch in range(state.epoch, cfg.train.epochs):
            metrics = _train_epoch(epoch, cfg, data, parts, state, dist_info, stop)
            if metrics is None:  # a signal stopped it mid-epoch
                if dist_info.is_main:
                    checkpoints.save("last", state, epoch, state.step_in_epoch)
                return
            val_metric = _validate(epoch, cfg, data, predictor, scorer, state, metrics, dist_info)
            parts.scheduler.step_epoch(val_metric)
            improved = _track_best(epoch, cfg, state, metrics, val_metric)
            state.epoch = epoch + 1
            if dist_info.is_main:
                log_epoch(state.epoch, metrics)
                if improved:
                    checkpoints.save("best", state, state.epoch, 0)
                checkpoints.save("last", state, state.epoch, 0)
                tracker.log_metrics(metrics, step=state.epoch)
            if patience is not None and state.since_best >= patience:
                log.info("early stopping: no improvement for %d validations (best val/%s %.4f at epoch %s)",
                         state.since_best, state.monitor, state.best, state.best_epoch)
                return
    state.epoch = cfg.train.epochs


def _train_epoch(epoch: int, cfg: ExperimentConfig, data: _Data, parts: _Components, state: _State,
                 dist_info: dist.DistInfo, stop: StopFlag) -> dict[str, float] | None:
    """One epoch of optimisation; its averaged losses and timings, or None when a signal stopped it."""
    seed_epoch(data.loader, cfg.experiment.seed, epoch)
    progress = Progress(f"epoch {epoch + 1}/{cfg.train.epochs}", data.iterations, enabled=dist_info.is_main)
    started = time.perf_counter()
    outcome = train_one_epoch(
        parts.net, data.loader, parts.loss_fn, parts.optimizer, parts.scheduler, parts.scaler, parts.settings,
        skip=state.step_in_epoch, on_step=progress.update, should_stop=lambda: stop.signal is not None,
    )
    progress.close()
    state.step += outcome.iterations
    if outcome.interrupted:
        state.interrupted = stop.signal
        state.step_in_epoch += outcome.iterations
        return None
    state.step_in_epoch = 0
    # grouped names, so MLflow charts losses, scores and timings apart: train/loss, train/loss_dice, time/data_s
    metrics = {("train/loss" if k == "loss" else f"train/loss_{k}"): dist.all_reduce_mean(v, dist_info)
               for k, v in outcome.losses.items()}
    metrics.update({
        "train/lr": parts.scheduler.lr, "time/epoch_s": time.perf_counter() - started,
        "time/samples_per_s": outcome.samples_per_second * dist_info.world_size,
        "time/data_s": outcome.data_seconds, "time/compute_s": outcome.compute_seconds,
    })
    return metrics


def _validate(epoch: int, cfg: ExperimentConfig, data: _Data, predictor: SlidingWindowPredictor, scorer,
              state: _State, metrics: dict[str, float], dist_info: dist.DistInfo) -> float | None:
    """Validate when due (rank 0), adding ``val/*`` to ``metrics`` (Dice per class, and instance AP, merges
    and splits for instance models); every rank gets the monitored figure (or None)."""
    val_metric = None
    due = (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs
    if data.val_loader is not None and due:
        validation, state.examples = evaluate(predictor, data.val_loader, data.class_names, dice_per_class, keep=6,
                                              case_metrics=scorer)
        state.per_case = validation.per_case
        metrics.update({f"val/{k}": v for k, v in validation.mean.items()})
        val_metric = validation.mean.get(state.monitor)
    return dist.broadcast_object(val_metric, dist_info)


def _track_best(epoch: int, cfg: ExperimentConfig, state: _State, metrics: dict[str, float],
                val_metric: float | None) -> bool:
    """Update the best score, the early-stopping count and the history; True when the best improved."""
    improved = val_metric is not None and not math.isnan(val_metric) and (
        state.best is None or val_metric > state.best + cfg.train.early_stopping.min_delta
    )
    if improved:
        state.best, state.best_epoch, state.since_best = val_metric, epoch + 1, 0
        state.best_foreground = metrics.get("val/dice_foreground")
        # the figures of the checkpoint that is logged as the model, not of the last epoch
        state.best_metrics = {"best/epoch": float(epoch + 1)}
        state.best_metrics.update({f"best/{k[4:]}": v for k, v in metrics.items() if k.startswith("val/")})
        state.best_per_case, state.best_examples = list(state.per_case), list(state.examples)
    elif val_metric is not None:
        state.since_best += 1
    for key, value in metrics.items():
        state.history.setdefault(key, []).append(float(value))
    return improved


def _result(output_dir: Path, state: _State) -> TrainResult:
    return TrainResult(output_dir, state.epoch, state.best, state.best_epoch, state.best_foreground, state.run_id,
                       state.interrupted, state.monitor)
