"""Checkpoints: full training state round-trips under weights_only=True, saves are atomic, bad files are named."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medseg.config import OptimizerConfig, SchedulerConfig
from medseg.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from medseg.engine.optim import SCHEDULERS, build_optimizer, build_scheduler
from medseg.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _training_state(optimizer_name: str, scheduler_name: str) -> dict:
    """The state dict the training pipeline saves, after a few real steps."""
    torch.manual_seed(0)
    model = _tiny_net()
    optimizer = build_optimizer(model.parameters(), OptimizerConfig(name=optimizer_name, lr=1e-2))
    scheduler = build_scheduler(
        optimizer, SchedulerConfig(name=scheduler_name, warmup_epochs=1, patience=0), epochs=4, steps_per_epoch=2
    )
    scaler = torch.amp.GradScaler("cpu")
    for step in range(4):
        loss = model(torch.randn(2, 1, 8, 8)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step_iteration()
        if step % 2 == 1:
            scheduler.step_epoch(0.5)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": 2,
        "step": 4,
        "step_in_epoch": 0,
        "best_metric": None,
        "rng": capture_rng_state(),
        "config": {"train": {"epochs": 4, "lr": 1e-2, "patch": [8, 8]}, "name": "demo", "flag": True, "x": None},
        "mlflow_run_id": "0123abcd",
        "history": {"train_loss": [0.9, 0.5], "val_dice_mean": [float("nan"), 0.5]},
    }


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("optimizer_name", ["adam", "adamw"])
@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
def test_full_training_state_round_trips_with_weights_only(tmp_path, optimizer_name, scheduler_name):
    state = _training_state(optimizer_name, scheduler_name)
    path = save_checkpoint(tmp_path / "last.pt", state)

    raw = torch.load(path, weights_only=True)  # the file itself is weights-only loadable
    loaded = load_checkpoint(path)

    assert raw["format"] == loaded["format"] == CHECKPOINT_FORMAT
    assert "format" not in state, "the caller's dict must not be modified"
    _assert_same(state, {k: v for k, v in loaded.items() if k != "format"})
    # ... and every part loads back into fresh objects.
    model = _tiny_net()
    model.load_state_dict(loaded["model"])
    optimizer = build_optimizer(model.parameters(), OptimizerConfig(name=optimizer_name, lr=1e-2))
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler = build_scheduler(
        optimizer, SchedulerConfig(name=scheduler_name, warmup_epochs=1, patience=0), epochs=4, steps_per_epoch=2
    )
    scheduler.load_state_dict(loaded["scheduler"])
    assert scheduler.lr == state["scheduler"]["lrs"][0]
    torch.amp.GradScaler("cpu").load_state_dict(loaded["scaler"])


def test_saving_again_replaces_the_file_and_creates_folders(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(path, {"epoch": 1})
    save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_saved_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    "value, where",
    [
        ({"history": {"dice": [0.5, np.float64(0.7)]}}, "state['history']['dice'][1]"),
        ({"rng": {"numpy": np.zeros(3)}}, "state['rng']['numpy']"),
        ({"step": np.int64(3)}, "state['step']"),
        ({"fn": len}, "state['fn']"),
    ],
)
def test_values_weights_only_cannot_load_are_refused_before_writing(tmp_path, value, where):
    path = tmp_path / "last.pt"
    with pytest.raises(TypeError, match=rf"^{re.escape(where)}: .*weights_only"):
        save_checkpoint(path, value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keep", [0, 10, 0.5, -10])
def test_truncated_checkpoint_raises_data_error_naming_the_file(tmp_path, keep):
    path = save_checkpoint(tmp_path / "last.pt", _training_state("adamw", "poly"))
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:n])
    with pytest.raises(DataError, match="truncated or corrupt|cannot be loaded") as info:
        load_checkpoint(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_missing_folder_foreign_and_future_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(DataError, match="folder"):
        load_checkpoint(tmp_path)
    torch.save(_tiny_net().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(DataError, match="not a medseg checkpoint"):
        load_checkpoint(tmp_path / "weights.pt")
    torch.save({"format": "medseg-checkpoint-v9"}, tmp_path / "future.pt")
    with pytest.raises(DataError, match="unsupported checkpoint format 'medseg-checkpoint-v9'"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "arr": np.zeros(3)}, tmp_path / "numpy.pt")
    with pytest.raises(DataError, match="cannot be loaded.*numpy"):
        load_checkpoint(tmp_path / "numpy.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint at all")
    with pytest.raises(DataError):
        load_checkpoint(tmp_path / "text.pt")


def test_failure_during_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"epoch": 1, "weights": torch.arange(1000.0)})
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save({"half": torch.zeros(100)}, f)  # bytes really reach the temporary file ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(DataError, match="No space left on device") as err:  # names the path and the OS reason
        save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(1000)})
    assert err.value.path == str(path) and "previous checkpoint" in str(err.value)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(1000.0))


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL a real process in the middle of writing: the destination still holds the previous save."""
    path = tmp_path / "last.pt"
    mid_save = tmp_path / "mid_save"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import torch
        from medseg.engine.checkpoint import save_checkpoint

        path = Path({str(path)!r})
        save_checkpoint(path, {{"epoch": 1, "weights": torch.arange(100.0)}})
        real_save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            f.write(b"PK" + bytes(4096))  # a partial write is on its way to disk
            f.flush()
            Path({str(mid_save)!r}).touch()
            time.sleep(60)

        torch.save = slow_save
        save_checkpoint(path, {{"epoch": 2, "weights": torch.zeros(100)}})
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not mid_save.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never reached the middle of its save"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()

    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(100.0))
    # A hard kill cannot clean up: what is left is a hidden temporary file, never a half-written last.pt.
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("last.pt", "mid_save")]
    assert all(name.startswith(".last.pt.") and name.endswith(".tmp") for name in leftovers)


def _draws() -> list:
    return [
        random.random(),
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    ]


def test_rng_state_round_trips_exactly_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Leave a cached Gaussian in Python's and NumPy's generators: part of the state, easily forgotten.
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = _draws()

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draws() != expected
    restore_rng_state(load_checkpoint(path)["rng"])
    assert _draws() == expected


def test_rng_state_is_plain(tmp_path):
    state = capture_rng_state()
    assert set(state) == {"python", "numpy", "torch", "cuda"}
    assert (state["cuda"] is None) == (not torch.cuda.is_available())
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})  # would raise TypeError if anything were not plain
