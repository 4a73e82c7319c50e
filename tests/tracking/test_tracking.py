"""The MLflow adapter against real stores: a SQLite file and a real `mlflow server` subprocess (no mocks)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from medseg.nets import build_network
from medseg.tracking import (
    FALLBACK_FILE,
    Tracker,
    TrackingError,
    environment_tags,
    flatten,
    load_model,
    resolve_tracking_uri,
)
from medseg.tracking.models import fluent_scope


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No tracking URI from the environment, and a cwd where a stray mlflow.db or mlruns/ would show."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network("unet", {"features": 2, "depth": 1}, spatial_dims=2, in_channels=1, num_classes=2)


METADATA = {"model": {"name": "unet", "params": {"features": 2, "depth": 1}}, "spatial_dims": 2, "in_channels": 1,
            "classes": {"background": 0, "cell": 1}, "label_kind": "semantic", "spacing": [0.5, 0.5],
            "normalize": {"mode": "zscore"}, "patch_size": [16, 16]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tracking_uri_comes_from_argument_then_environment_then_cwd_default(monkeypatch, tmp_path):
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(None) == "http://tracking:5000"
    assert resolve_tracking_uri("sqlite:///other.db") == "sqlite:///other.db"


def test_flatten_joins_nested_keys_with_dots():
    config = {"train": {"lr": 0.001, "amp": True, "optim": {"name": "adam"}}, "patch": [96, 96], "aug": {}}
    assert flatten(config) == {
        "train.lr": "0.001", "train.amp": "True", "train.optim.name": "adam", "patch": "[96, 96]", "aug": "{}",
    }


@pytest.mark.parametrize("build", ["installed", "2.13.0+cu130", "2.13.0"])
def test_torch_tag_names_the_running_build_with_its_local_version(monkeypatch, build):
    # A CUDA wheel from PyPI says 2.13.0 in its package metadata and 2.13.0+cu130 in torch.__version__;
    # the tag must say which build ran, whichever wheel (CPU, CUDA, local or not) is installed.
    if build != "installed":
        monkeypatch.setattr(torch, "__version__", build)
    assert environment_tags()["torch.version"] == torch.__version__


def test_environment_tags_name_versions_and_the_git_commit(tmp_path):
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, encoding="utf-8", errors="replace", check=True)
        return done.stdout.strip()

    outside = environment_tags()
    assert outside["medseg.version"] and outside["torch.version"] == torch.__version__
    assert "mlflow.source.git.commit" not in outside  # tmp_path is no work tree
    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    (tmp_path / "f.txt").write_text("x")
    git("add", "f.txt")
    git("commit", "-q", "-m", "init")
    tags = environment_tags()
    assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD")
    assert tags["medseg.git.dirty"] == "false"


def test_disabled_tracker_does_nothing_and_touches_no_store(tmp_path):
    tracker = Tracker(None, "cells", enabled=False, fallback_dir=tmp_path / "run")
    with tracker:
        tracker.log_params({"a": 1})
        tracker.set_tags({"b": 2})
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_artifact(tmp_path / "missing.txt")
        assert tracker.log_model(_tiny_model(), METADATA) is None
    assert tracker.run_id is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_run_keeps_params_tags_metrics_artifacts_and_a_loadable_model(store, tmp_path):
    (tmp_path / "config.yaml").write_text("train: {lr: 0.001}\n")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "curve.txt").write_text("1 2 3")
    config = {"train": {"lr": 0.001, "epochs": 3}, "note": "x" * 7000, "many": {f"p{i}": i for i in range(250)}}
    metadata = {**METADATA, "instances": {"target": "distance", "thresholds": {"foreground": 0.4}}}
    model = _tiny_model()

    with Tracker(store, "cells", run_name="unet-fold0", fallback_dir=tmp_path / "run") as tracker:
        run_id = tracker.start()  # a second start() is harmless
        tracker.log_params(config)
        tracker.set_tags({**environment_tags(), "dataset.fingerprint": "abc123", "device": "cpu"})
        for epoch in range(3):
            tracker.log_metrics({"train.loss": 1.0 / (epoch + 1), "val.dice": 0.5 + 0.1 * epoch, "hd95": None},
                                step=epoch)
        tracker.log_artifact(tmp_path / "config.yaml")
        tracker.log_artifact(tmp_path / "figures", "figures")
        model_uri = tracker.log_model(model, metadata, registered_model_name="medseg-test-cells")

    run = MlflowClient(store).get_run(run_id)
    assert run.info.run_name == "unet-fold0" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["many.p249"] == "249"
    assert len(run.data.params["note"]) == 6000  # cut to MLflow's limit instead of failing the batch
    assert run.data.tags["dataset.fingerprint"] == "abc123" and run.data.tags["medseg.version"]
    history = MlflowClient(store).get_metric_history(run_id, "val.dice")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert "hd95" not in run.data.metrics
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(run_id)}
    assert {"config.yaml", "figures"} <= artifacts
    assert not (tmp_path / "run" / FALLBACK_FILE).exists()
    assert not (tmp_path / "mlruns").exists()  # artifacts live beside the database, not in the cwd

    x = torch.rand(1, 1, 17, 19)
    for uri in (model_uri, f"runs:/{run_id}/model"):
        loaded, loaded_metadata = load_model(uri, tracking_uri=store)
        assert loaded_metadata == metadata
        assert not loaded.training
        assert torch.equal(loaded(x), model.eval()(x))
    assert model_uri == "models:/medseg-test-cells/1"
    # Pinned to public versions: no index serves torch==2.13.0+cpu (or +cu130) by that name.
    with fluent_scope(store):  # MLflow resolves models:/ through its process-wide URI
        files = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model"))
    requirements = (Path(files) / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert not [r for r in requirements if "+" in r]


def test_a_resumed_run_continues_the_same_mlflow_run(store, tmp_path, caplog):
    first = Tracker(store, "resume", fallback_dir=tmp_path)
    run_id = first.start()
    first.log_params({"train": {"lr": 0.1}})
    first.log_metrics({"loss": 1.0}, step=0)
    first.end("KILLED")

    second = Tracker(store, "ignored-when-resuming", run_id=run_id, fallback_dir=tmp_path)
    assert second.start() == run_id
    assert MlflowClient(store).get_run(run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="medseg.tracking"):
        second.log_params({"train": {"lr": 0.1, "epochs": 5}})  # the same config again: fine
        assert not caplog.records
        second.log_params({"train": {"lr": 0.2}})
    assert "train.lr" in caplog.text
    second.log_metrics({"loss": 0.5}, step=1)
    second.end()

    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.1", "train.epochs": "5"}
    assert [m.step for m in MlflowClient(store).get_metric_history(run_id, "loss")] == [0, 1]


def test_a_failing_block_marks_the_run_failed(store):
    with pytest.raises(ZeroDivisionError), Tracker(store, "failed") as tracker:
        1 / 0  # noqa: B018
    assert MlflowClient(store).get_run(tracker.run_id).info.status == "FAILED"


def test_bad_input_is_named_at_the_boundary(store):
    tracker = Tracker(store, "bad-input")
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.start()
    with pytest.raises(TypeError, match="'val.dice'"):
        tracker.log_metrics({"val.dice": "high"}, step=0)
    with pytest.raises(TypeError):
        tracker.log_model(_tiny_model(), {**METADATA, "transform": object()})
    with pytest.raises(ValueError, match="missing patch_size"):
        tracker.log_model(_tiny_model(), {k: v for k, v in METADATA.items() if k != "patch_size"})
    with pytest.raises(ValueError, match="FINISHED"):
        tracker.end("DONE")
    with pytest.raises(TrackingError, match="not in this store"):
        Tracker(store, "x", run_id="0" * 32).start()


def test_an_unreachable_server_fails_start_within_seconds():
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        Tracker(uri, "cells").start()
    assert time.monotonic() - started < 10
    assert uri in str(caught.value)


def test_a_server_that_never_answers_fails_start_within_seconds():
    with socket.socket() as silent:  # accepts connections in the kernel backlog, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingError, match=uri):
            Tracker(uri, "cells").start()
        assert time.monotonic() - started < 10


@pytest.fixture
def server(tmp_path):
    """A real `mlflow server` on a free local port, killed (process group) at the end if still alive."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers: faster start
    log_file = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # generous: a loaded CI machine needs long to import the server
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def kill() -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the group: uvicorn runs in a child process
            process.wait(timeout=30)

    yield uri, kill
    kill()
    log_file.close()


@pytest.mark.slow
def test_a_server_that_goes_away_mid_run_does_not_stop_training(server, tmp_path, caplog):
    uri, kill = server
    run_dir = tmp_path / "run"
    tracker = Tracker(uri, "cells", run_name="remote", fallback_dir=run_dir, retry_every_s=60)
    run_id = tracker.start()
    tracker.log_params({"train": {"lr": 0.01}})
    tracker.log_metrics({"loss": 1.0}, step=0)
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")] == [0]

    kill()
    with caplog.at_level(logging.WARNING, logger="medseg.tracking"):
        started = time.monotonic()
        tracker.log_metrics({"loss": 0.5}, step=1)  # fails (a short retry), warns, goes offline
        assert time.monotonic() - started < 10
        started = time.monotonic()
        tracker.log_metrics({"loss": 0.25}, step=2)  # offline: straight to the fallback file
        tracker.set_tags({"device": "cpu"})
        (tmp_path / "note.txt").write_text("x")
        tracker.log_artifact(tmp_path / "note.txt")
        assert time.monotonic() - started < 2
        local = tracker.log_model(_tiny_model(), METADATA)
        tracker.end()
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1 and uri in unreachable[0].getMessage()

    entries = [json.loads(line) for line in (run_dir / FALLBACK_FILE).read_text().splitlines()]
    assert [e["call"] for e in entries] == ["log_metrics", "log_metrics", "set_tags", "log_artifact",
                                            "log_model", "end"]
    assert [(e["step"], e["metrics"]) for e in entries[:2]] == [(1, {"loss": 0.5}), (2, {"loss": 0.25})]
    assert all(e["run_id"] == run_id for e in entries)
    _, metadata = load_model(local)  # the model kept in the run folder instead
    assert metadata == METADATA
