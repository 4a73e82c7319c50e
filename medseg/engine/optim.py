"""Optimizers and learning-rate schedules built from the ``train.optimizer`` / ``train.scheduler`` config.

Every schedule is driven through one :class:`Scheduler` so the training loop never special-cases a name:

    for epoch in range(start_epoch, epochs):
        for batch in loader:
            ...
            optimizer.step()
            scheduler.step_iteration()     # after every optimizer step
        scheduler.step_epoch(val_metric)  # after every epoch; None when there was no validation

When the learning rate changes:

* ``poly``, ``cosine`` and ``none`` are closed-form functions of the iteration, so they move every
  iteration: smoother than nnU-Net's once-per-epoch poly and independent of ``epochs`` being small.
  ``poly`` is nnU-Net's ``lr0 * (1 - t) ** power`` with ``t`` running from 0 to 1 over the iterations after
  warmup; ``cosine`` goes from ``lr0`` to ``min_lr`` on half a cosine over the same range.
* ``step`` multiplies by ``gamma`` every ``step_size`` epochs (counted after warmup): its unit is the epoch.
* ``plateau`` is torch's ``ReduceLROnPlateau`` (mode max, factor ``gamma``): it can only move when a
  validation metric arrives, so ``patience`` counts validations, not epochs.
* Warmup (``warmup_epochs`` > 0) is linear and per iteration for every schedule: ``lr0 * (i + 1) / W``
  for the first ``W = warmup_epochs * steps_per_epoch`` iterations, so the first step is never taken at 0.
* ``min_lr`` is a floor for ``poly``, ``cosine``, ``step`` and ``plateau``.

The closed forms run in a ``LambdaLR`` rather than ``SequentialLR`` chains: the learning rate is then a pure
function of the iteration counter, which is all a resumed run needs to continue the exact same sequence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from medseg.config import OptimizerConfig, SchedulerConfig
from medseg.errors import ConfigError

log = logging.getLogger(__name__)

SCHEDULERS = ("poly", "cosine", "step", "plateau", "none")


def build_optimizer(params: Iterable[Any], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.name``.

    Args:
        params: ``model.parameters()`` or a list of parameter-group dicts.
        cfg: ``train.optimizer``. ``adam`` applies ``weight_decay`` as an L2 penalty, ``adamw`` decoupled;
            ``sgd`` uses ``momentum`` and ``nesterov`` (nnU-Net: momentum 0.99, Nesterov).

    Raises:
        ConfigError: unknown name, or Nesterov momentum with ``momentum: 0``.
    """
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum == 0:
            raise ConfigError("train.optimizer.nesterov", "Nesterov needs momentum > 0; set nesterov: false")
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    raise ConfigError("train.optimizer.name", f"unknown optimizer {cfg.name!r}; expected one of: adam, adamw, sgd")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, epochs: int, steps_per_epoch: int
) -> Scheduler:
    """Build the learning-rate schedule named by ``cfg.name`` (see the module docstring for its timing).

    Args:
        optimizer: the current ``lr`` of each parameter group is that group's peak rate ``lr0``.
        cfg: ``train.scheduler``.
        epochs: planned number of epochs (``train.epochs``).
        steps_per_epoch: optimizer steps per epoch, the number of ``step_iteration`` calls per epoch.

    Raises:
        ConfigError: unknown name, warmup not shorter than training, ``min_lr`` not below ``lr``, or
            ``plateau`` with ``gamma: 1``.
    """
    if cfg.name not in SCHEDULERS:
        raise ConfigError(
            "train.scheduler.name",
            f"unknown scheduler {cfg.name!r}; expected one of: {', '.join(SCHEDULERS)}",
        )
    if epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"epochs and steps_per_epoch must be positive, got {epochs} and {steps_per_epoch}")
    if cfg.warmup_epochs >= epochs and cfg.warmup_epochs > 0:
        raise ConfigError(
            "train.scheduler.warmup_epochs",
            f"expected fewer warmup epochs than train.epochs ({epochs}), got {cfg.warmup_epochs}",
        )
    lr0 = min(group.get("initial_lr", group["lr"]) for group in optimizer.param_groups)
    if cfg.name != "none" and cfg.min_lr >= lr0:
        raise ConfigError("train.scheduler.min_lr", f"expected a floor below the learning rate {lr0}, got {cfg.min_lr}")
    if cfg.name == "plateau" and cfg.gamma >= 1.0:
        raise ConfigError(
            "train.scheduler.gamma", f"plateau multiplies the lr by gamma, so it must be < 1, got {cfg.gamma}"
        )
    return Scheduler(optimizer, cfg, epochs, steps_per_epoch)


class Scheduler:
    """One interface over every schedule: call :meth:`step_iteration` after each optimizer step and
    :meth:`step_epoch` after each epoch; :meth:`state_dict` round-trips through a checkpoint.

    Build it with :func:`build_scheduler`, which checks the config.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, epochs: int, steps_per_epoch: int):
        self.optimizer = optimizer
        self.name = cfg.name
        self.steps_per_epoch = steps_per_epoch
        self.total_iterations = epochs * steps_per_epoch
        self.warmup_iterations = cfg.warmup_epochs * steps_per_epoch
        self.iteration = 0
        self.epoch = 0
        # LambdaLR takes lr0 from "initial_lr" when the optimizer already carries one; so do the floors.
        base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        # plateau: warmup only; after it the factor stays 1 and ReduceLROnPlateau owns the rate.
        kind = "none" if self.name == "plateau" else self.name
        floors = [0.0 if self.name == "plateau" else cfg.min_lr / lr0 for lr0 in base_lrs]
        warmup, total = self.warmup_iterations, self.total_iterations
        self._lambda = LambdaLR(
            optimizer, [_factor_fn(kind, warmup, total, steps_per_epoch, cfg, floor) for floor in floors]
        )
        self._plateau = (
            ReduceLROnPlateau(optimizer, mode="max", factor=cfg.gamma, patience=cfg.patience, min_lr=cfg.min_lr)
            if self.name == "plateau"
            else None
        )

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step will use (first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def step_iteration(self) -> None:
        """Advance one optimizer step."""
        self.iteration += 1
        if self._plateau is None or self._lambda.last_epoch < self.warmup_iterations:
            self._lambda.step()

    def step_epoch(self, metric: float | None = None) -> None:
        """Advance one epoch; ``metric`` (higher is better) drives ``plateau`` and is ignored otherwise.

        ``plateau`` skips a NaN metric (undefined, e.g. Dice without foreground) and any metric that arrives
        during warmup, while the rate is still rising.
        """
        self.epoch += 1
        if self._plateau is None or metric is None or math.isnan(metric):
            return
        if self.iteration >= self.warmup_iterations:
            self._plateau.step(float(metric))

    def state_dict(self) -> dict[str, Any]:
        """Plain containers and numbers only, so it loads with ``torch.load(weights_only=True)``."""
        return {
            "name": self.name,
            "iteration": self.iteration,
            "epoch": self.epoch,
            "total_iterations": self.total_iterations,
            "lrs": [float(group["lr"]) for group in self.optimizer.param_groups],
            "lambda": self._lambda.state_dict(),
            "plateau": None if self._plateau is None else self._plateau.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the optimizer's rates are set too, whatever order things are loaded in.

        Raises:
            ConfigError: the state comes from a different schedule than the configured one.
        """
        if state["name"] != self.name:
            raise ConfigError(
                "train.scheduler.name",
                f"the checkpoint was trained with {state['name']!r}, the config says {self.name!r}",
            )
        if state["total_iterations"] != self.total_iterations:
            log.warning(
                "resuming a schedule planned for %d iterations as one of %d: the learning rate jumps",
                state["total_iterations"],
                self.total_iterations,
            )
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
        self._lambda.load_state_dict(state["lambda"])
        if self._plateau is not None:
            self._plateau.load_state_dict(state["plateau"])
        for group, lr in zip(self.optimizer.param_groups, state["lrs"], strict=True):
            group["lr"] = float(lr)


def _factor_fn(
    name: str, warmup: int, total: int, steps_per_epoch: int, cfg: SchedulerConfig, floor: float = 0.0
) -> Callable[[int], float]:
    """Multiplier of ``lr0`` at an iteration: linear warmup, then the named decay towards ``floor``.

    A plain function (not a bound method or callable object), so ``LambdaLR.state_dict`` stores nothing
    for it: the schedule is rebuilt from the config and only the counters come from the checkpoint.
    """
    decay_iterations = max(1, total - warmup)
    power, gamma, step_size = cfg.power, cfg.gamma, cfg.step_size

    def factor(iteration: int) -> float:
        if iteration < warmup:
            return (iteration + 1) / warmup
        t = min(1.0, (iteration - warmup) / decay_iterations)
        if name == "poly":
            return floor + (1.0 - floor) * (1.0 - t) ** power
        if name == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        if name == "step":
            return max(floor, gamma ** ((iteration - warmup) // steps_per_epoch // step_size))
        return 1.0  # "none"

    return factor
