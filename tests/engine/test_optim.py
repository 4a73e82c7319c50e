"""Optimizers and schedules: the lr curves have the promised shapes, and a resumed run continues exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medseg.config import OptimizerConfig, SchedulerConfig
from medseg.engine.checkpoint import load_checkpoint, save_checkpoint
from medseg.engine.optim import SCHEDULERS, Scheduler, build_optimizer, build_scheduler
from medseg.errors import ConfigError

LR = 0.01


def _optimizer(lr: float = LR, name: str = "sgd") -> torch.optim.Optimizer:
    return build_optimizer(nn.Linear(2, 1).parameters(), OptimizerConfig(name=name, lr=lr, weight_decay=0.0))


def _lrs(scheduler: Scheduler, epochs: int, steps_per_epoch: int, metrics=None) -> list[float]:
    """The lr used by every iteration of a run; ``metrics[e]`` is passed to step_epoch after epoch e."""
    out = []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            out.append(scheduler.lr)
            scheduler.optimizer.step()
            scheduler.step_iteration()
        scheduler.step_epoch(None if metrics is None else metrics[epoch])
    return out


# ------------------------------------------------------------------------------------------------ optimizers


@pytest.mark.parametrize(
    "name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_build_optimizer_applies_the_config(name, cls):
    cfg = OptimizerConfig(name=name, lr=0.02, weight_decay=3e-5, momentum=0.9, nesterov=True)
    optimizer = build_optimizer(nn.Linear(2, 1).parameters(), cfg)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.02 and group["weight_decay"] == 3e-5
    if name == "sgd":
        assert group["momentum"] == 0.9 and group["nesterov"] is True


def test_nesterov_without_momentum_is_a_config_error():
    with pytest.raises(ConfigError, match="train.optimizer.nesterov"):
        build_optimizer(nn.Linear(2, 1).parameters(), OptimizerConfig(name="sgd", momentum=0.0, nesterov=True))
    build_optimizer(nn.Linear(2, 1).parameters(), OptimizerConfig(name="sgd", momentum=0.0, nesterov=False))


# ------------------------------------------------------------------------------------------------ lr shapes


@pytest.mark.parametrize("name", ["poly", "cosine", "step", "plateau", "none"])
def test_warmup_rises_linearly_to_the_peak(name):
    spe, warmup_epochs = 4, 2
    scheduler = build_scheduler(_optimizer(), SchedulerConfig(name=name, warmup_epochs=warmup_epochs), 10, spe)
    lrs = _lrs(scheduler, 10, spe, metrics=[0.5] * 10)
    w = warmup_epochs * spe
    assert lrs[:w] == pytest.approx([LR * (i + 1) / w for i in range(w)])
    assert lrs[0] > 0
    assert lrs[w] == pytest.approx(LR)  # the main schedule starts at the peak


def test_poly_is_nnunets_curve_per_iteration():
    spe, epochs = 5, 10
    scheduler = build_scheduler(_optimizer(), SchedulerConfig(name="poly", power=0.9), epochs, spe)
    lrs = _lrs(scheduler, epochs, spe)
    total = epochs * spe
    assert lrs == pytest.approx([LR * (1 - i / total) ** 0.9 for i in range(total)])
    assert all(b < a for a, b in zip(lrs, lrs[1:]))  # strictly decreasing: moves every iteration
    assert scheduler.lr == pytest.approx(0.0, abs=1e-12)  # reaches 0 after the last step


def test_cosine_goes_from_peak_to_min_lr_through_the_midpoint():
    spe, epochs, min_lr = 4, 12, 1e-4
    cfg = SchedulerConfig(name="cosine", warmup_epochs=2, min_lr=min_lr)
    scheduler = build_scheduler(_optimizer(), cfg, epochs, spe)
    lrs = _lrs(scheduler, epochs, spe)
    decay = lrs[2 * spe :]
    assert decay[0] == pytest.approx(LR)
    assert decay[len(decay) // 2] == pytest.approx((LR + min_lr) / 2)
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert min(lrs) > min_lr and scheduler.lr == pytest.approx(min_lr)  # reached after the last step


def test_step_multiplies_by_gamma_every_step_size_epochs():
    spe, epochs = 3, 9
    cfg = SchedulerConfig(name="step", step_size=3, gamma=0.5)
    lrs = _lrs(build_scheduler(_optimizer(), cfg, epochs, spe), epochs, spe)
    per_epoch = [lrs[e * spe : (e + 1) * spe] for e in range(epochs)]
    assert all(len(set(epoch)) == 1 for epoch in per_epoch)  # constant within an epoch
    assert [epoch[0] for epoch in per_epoch] == pytest.approx([LR] * 3 + [LR / 2] * 3 + [LR / 4] * 3)


def test_step_and_poly_respect_min_lr():
    cfg = SchedulerConfig(name="step", step_size=1, gamma=0.1, min_lr=1e-4)
    assert min(_lrs(build_scheduler(_optimizer(), cfg, 6, 2), 6, 2)) == pytest.approx(1e-4)
    cfg = SchedulerConfig(name="poly", min_lr=1e-4)
    lrs = _lrs(build_scheduler(_optimizer(), cfg, 6, 2), 6, 2)
    assert min(lrs) > 1e-4


def test_plateau_reduces_only_after_patience_validations_without_improvement():
    cfg = SchedulerConfig(name="plateau", patience=2, gamma=0.5)
    improving = [0.1 * (e + 1) for e in range(8)]
    assert set(_lrs(build_scheduler(_optimizer(), cfg, 8, 2), 8, 2, improving)) == {LR}

    # best at epoch 0, then flat: bad validations 1, 2 are tolerated, the 3rd halves the lr.
    flat = [0.5] * 8
    lrs = _lrs(build_scheduler(_optimizer(), cfg, 8, 2), 8, 2, flat)
    per_epoch = lrs[::2]
    assert per_epoch[:4] == [LR] * 4 and per_epoch[4] == pytest.approx(LR / 2)


def test_plateau_ignores_missing_and_nan_metrics_and_respects_min_lr():
    cfg = SchedulerConfig(name="plateau", patience=0, gamma=0.5, min_lr=LR / 3)
    scheduler = build_scheduler(_optimizer(), cfg, 10, 1)
    assert set(_lrs(scheduler, 4, 1, [0.5, None, math.nan, None])) == {LR}
    _lrs(scheduler, 6, 1, [0.5] * 6)
    assert scheduler.lr == pytest.approx(LR / 3)


def test_none_is_constant_and_lr_reports_the_optimizers_rate():
    scheduler = build_scheduler(_optimizer(), SchedulerConfig(name="none"), 3, 4)
    assert set(_lrs(scheduler, 3, 4)) == {LR}
    assert scheduler.lr == scheduler.optimizer.param_groups[0]["lr"]


def test_each_parameter_group_keeps_its_own_peak():
    net = nn.Linear(2, 1)
    optimizer = torch.optim.SGD([{"params": [net.weight], "lr": 0.1}, {"params": [net.bias], "lr": 0.01}])
    scheduler = build_scheduler(optimizer, SchedulerConfig(name="cosine", warmup_epochs=1), 4, 3)
    for _ in range(7):
        optimizer.step()
        scheduler.step_iteration()
        a, b = (g["lr"] for g in optimizer.param_groups)
        assert a == pytest.approx(10 * b)


# ------------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "cfg, epochs, key",
    [
        (SchedulerConfig(name="cosine", warmup_epochs=5), 5, "train.scheduler.warmup_epochs"),
        (SchedulerConfig(name="plateau", gamma=1.0), 5, "train.scheduler.gamma"),
        (SchedulerConfig(name="poly", min_lr=LR), 5, "train.scheduler.min_lr"),
    ],
)
def test_impossible_schedules_are_config_errors(cfg, epochs, key):
    with pytest.raises(ConfigError) as info:
        build_scheduler(_optimizer(), cfg, epochs, 3)
    assert info.value.key == key


def test_loading_another_schedules_state_is_a_config_error():
    state = build_scheduler(_optimizer(), SchedulerConfig(name="poly"), 5, 3).state_dict()
    scheduler = build_scheduler(_optimizer(), SchedulerConfig(name="cosine"), 5, 3)
    with pytest.raises(ConfigError, match="'poly'.*'cosine'"):
        scheduler.load_state_dict(state)


# ------------------------------------------------------------------------------------------------ resume


SCHEDULE_CASES = {
    "poly": SchedulerConfig(name="poly", warmup_epochs=1),
    "cosine": SchedulerConfig(name="cosine", warmup_epochs=2, min_lr=1e-5),
    "step": SchedulerConfig(name="step", warmup_epochs=1, step_size=2, gamma=0.5),
    "plateau": SchedulerConfig(name="plateau", warmup_epochs=1, patience=1, gamma=0.5, min_lr=1e-4),
    "none": SchedulerConfig(name="none", warmup_epochs=1),
}
assert set(SCHEDULE_CASES) == set(SCHEDULERS)


class _Run:
    """A tiny real training run: model, optimizer, schedule; metrics plateau so ``plateau`` acts."""

    EPOCHS, SPE = 8, 3
    METRICS = [0.1, 0.2, 0.3, 0.3, 0.3, None, 0.3, 0.3]

    def __init__(self, optimizer_name: str, schedule: str):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.optimizer = build_optimizer(self.model.parameters(), OptimizerConfig(name=optimizer_name, lr=LR))
        self.scheduler = build_scheduler(self.optimizer, SCHEDULE_CASES[schedule], self.EPOCHS, self.SPE)
        self.data = torch.randn(self.EPOCHS * self.SPE, 5, 4, generator=torch.Generator().manual_seed(1))
        self.lrs: list[float] = []

    def run(self, start: int, stop: int) -> None:
        """Iterations ``start`` .. ``stop - 1`` (counted over the whole run)."""
        for it in range(start, stop):
            self.lrs.append(self.scheduler.lr)
            loss = self.model(self.data[it]).square().mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step_iteration()
            if (it + 1) % self.SPE == 0:
                self.scheduler.step_epoch(self.METRICS[it // self.SPE])

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
@pytest.mark.parametrize("schedule", SCHEDULERS)
@pytest.mark.parametrize("split", [2, 9, 16])  # in warmup, at an epoch boundary, mid-epoch after a plateau
def test_resumed_run_continues_the_exact_same_lr_sequence(tmp_path, optimizer_name, schedule, split):
    total = _Run.EPOCHS * _Run.SPE
    straight = _Run(optimizer_name, schedule)
    straight.run(0, total)

    first = _Run(optimizer_name, schedule)
    first.run(0, split)
    path = save_checkpoint(tmp_path / "last.pt", first.state())
    resumed = _Run(optimizer_name, schedule)  # a fresh process: everything rebuilt from the config
    resumed.load(load_checkpoint(path))
    resumed.lrs = list(first.lrs)
    resumed.run(split, total)

    assert resumed.lrs == straight.lrs  # exact, not approximately
    assert len(set(straight.lrs)) > 1 or schedule == "none"
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("schedule", SCHEDULERS)
def test_scheduler_state_restores_the_rate_before_or_after_the_optimizer(schedule):
    run = _Run("adamw", schedule)
    run.run(0, 16)
    state = run.state()
    other = _Run("adamw", schedule)
    other.scheduler.load_state_dict(state["scheduler"])  # scheduler first, then optimizer ...
    other.optimizer.load_state_dict(state["optimizer"])
    assert other.scheduler.lr == run.scheduler.lr
    other = _Run("adamw", schedule)
    other.optimizer.load_state_dict(state["optimizer"])  # ... or the other way round
    other.scheduler.load_state_dict(state["scheduler"])
    assert other.scheduler.lr == run.scheduler.lr
