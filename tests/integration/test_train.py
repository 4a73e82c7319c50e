"""`medseg train` end to end through the real CLI: tiny 2D and 3D runs, MLflow (sqlite and a real server),
SIGKILL/SIGTERM then resume, and a 2-process torchrun run."""

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from medseg.engine.checkpoint import load_checkpoint

from .conftest import MEDSEG, run_medseg

pytestmark = pytest.mark.slow


def tiny_config(tmp_path: Path, data: Path, dims: int = 2, **train) -> Path:
    patch = [32, 32] if dims == 2 else [16, 16, 16]
    cfg = {
        "experiment": {"name": f"tiny{dims}d", "seed": 1, "output_dir": str(tmp_path / "run")},
        "data": {"root": str(data), "spatial_dims": dims, "val_fraction": 0.34, "num_workers": 0},
        "transforms": {
            "patch_size": patch,
            "weight_map": {"enabled": dims == 2},
            "augmentation": {"preset": "cells2d" if dims == 2 else "lesions3d"},
        },
        "model": {"name": "unet", "params": {"features": 4, "depth": 2}},
        "train": {"epochs": 2, "batch_size": 2, "iterations_per_epoch": 2, "val_every": 1, **train},
        "inference": {"overlap": 0.25, "sw_batch_size": 2},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "cells"
    run_medseg("synth", "cells", "--out", out, "--n", "3", "--n-test", "1", "--size", "64", "64", "--seed", "2")
    return out


@pytest.fixture(scope="module")
def lesions(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "lesions"
    run_medseg("synth", "lesions", "--out", out, "--n", "3", "--size", "16", "32", "32", "--seed", "2")
    return out


def _run_of(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} not in {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _artifacts(client, run_id, path=None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def _assert_complete_run(uri: str, experiment: str, epochs: int, monitor: str = "ap"):
    client, run = _run_of(uri, experiment)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == str(epochs)
    assert run.data.params["model.name"] == "unet"
    for tag in ("medseg.version", "torch.version", "monai.version", "medseg.dataset_digest", "medseg.device"):
        assert tag in run.data.tags, tag
    assert re.fullmatch(rf"{experiment}-unet-\d{{8}}-\d{{6}}", run.info.run_name), run.info.run_name
    for metric in ("train/loss", "train/loss_dice", "train/loss_ce", "val/dice_mean", "val/dice_cell", "train/lr",
                   "time/samples_per_s", "time/data_s"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert len(history) == epochs, metric
    # best/*: the epoch whose checkpoint is the model (the best by train.monitor), and its scores
    scores = [m.value for m in sorted(client.get_metric_history(run.info.run_id, f"val/{monitor}"),
                                      key=lambda m: m.step)]
    assert len(scores) == epochs
    assert run.data.metrics[f"best/{monitor}"] == pytest.approx(max(scores))
    assert run.data.metrics["best/epoch"] == scores.index(max(scores)) + 1
    # the dataset, with its absolute source and a content digest
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == run.data.tags["medseg.dataset_digest"]
    assert len(dataset_input.dataset.digest) == 16
    assert Path(run.data.tags["medseg.dataset"]).is_absolute()
    assert Path(run.data.tags["medseg.dataset"]).resolve().as_uri() in dataset_input.dataset.source
    files = _artifacts(client, run.info.run_id)
    for name in ("config.yaml", "learning_curves.png", "validation_cases.csv", "validation_overlay.png"):
        assert name in files, (name, files)
    assert any(f.startswith("checkpoints/") for f in files)
    from medseg.tracking import load_model

    model, meta = load_model(f"runs:/{run.info.run_id}/model", tracking_uri=uri)
    assert meta["patch_size"] and meta["classes"] and meta["normalize"]
    assert isinstance(model, torch.nn.Module)
    return run


def test_tiny_2d_run_is_tracked_in_sqlite(cells, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # chosen by Dice here (instance labels choose by instance AP unless asked: AP is 0 at this budget)
    cfg = tiny_config(tmp_path, cells, epochs=3, monitor="dice")
    res = run_medseg("train", cfg, "--tracking-uri", uri, "--set", "tracking.registered_model_name=tiny-cells",
                     env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    assert "best validation foreground Dice" in res.stdout
    run = _assert_complete_run(uri, "tiny2d", epochs=3, monitor="dice_mean")
    client = MlflowClient(uri)
    assert any(key.startswith("system/cpu") for key in run.data.metrics), sorted(run.data.metrics)
    # the validation CSV is the best checkpoint's: its mean is best/dice_mean
    csv_file = client.download_artifacts(run.info.run_id, "validation_cases.csv", str(tmp_path))
    with open(csv_file, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert np.nanmean([float(r["dice_mean"]) for r in rows]) == pytest.approx(run.data.metrics["best/dice_mean"])
    # the logged model carries the best/* metrics; the registered version says what it is
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert {m.key: m.value for m in logged.metrics}["best/dice_mean"] == run.data.metrics["best/dice_mean"]
    version = client.get_model_version("tiny-cells", "1")
    assert "best validation Dice" in version.description and run.info.run_id in version.description
    assert version.tags["dataset.digest"] == run.data.tags["medseg.dataset_digest"]
    assert float(version.tags["val_dice_mean"]) == pytest.approx(run.data.metrics["best/dice_mean"], abs=1e-4)
    assert "git.commit" in version.tags

    # evaluate --run-id adds eval/* metrics and leaves the training's status and times alone
    run_medseg("predict", "--model", tmp_path / "run", "--input", cells / "imagesTs", "--output", tmp_path / "pred",
               "--instances")
    run_medseg("evaluate", "--pred", tmp_path / "pred", "--ref", cells / "labelsTs", "--run-id", run.info.run_id,
               "--tracking-uri", uri, "--instances")
    after = client.get_run(run.info.run_id)
    assert (after.info.start_time, after.info.end_time, after.info.status) == (
        run.info.start_time, run.info.end_time, "FINISHED")
    assert "eval/foreground/dice" in after.data.metrics and "eval/instances/ap_50" in after.data.metrics
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["classes"] == {"background": 0, "cell": 1, "border": 2}
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["mlflow_run_id"] == run.info.run_id


def test_tiny_3d_run_without_tracking(lesions, tmp_path):
    cfg = tiny_config(tmp_path, lesions, dims=3, epochs=1)
    run_medseg("train", cfg, "--no-tracking")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["metadata"]["spatial_dims"] == 3 and state["finished"]
    assert not (tmp_path / "mlflow.db").exists()
    again = run_medseg("train", cfg, "--no-tracking", "--resume", "auto")  # idempotent: nothing left to do
    assert "nothing to do" in again.stderr
    assert _same_weights(_weights(tmp_path / "run" / "checkpoints" / "last.pt"), state["model"])
    fresh = run_medseg("train", cfg, "--no-tracking")  # a new training: its own folder, the first one kept
    assert "run-2" in fresh.stdout
    assert _same_weights(_weights(tmp_path / "run" / "checkpoints" / "last.pt"), state["model"])
    assert (tmp_path / "run-2" / "checkpoints" / "last.pt").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tiny_run_against_a_real_mlflow_server(cells, tmp_path):
    port = _free_port()
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    server = subprocess.Popen(
        [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)
        cfg = tiny_config(tmp_path, cells)
        run_medseg("train", cfg, "--tracking-uri", uri)
        _assert_complete_run(uri, "tiny2d", epochs=2)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: the graceful stop is not what this test checks
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def test_unreachable_tracking_server_fails_fast(cells, tmp_path):
    cfg = tiny_config(tmp_path, cells)
    start = time.time()
    res = run_medseg("train", cfg, "--tracking-uri", f"http://127.0.0.1:{_free_port()}", check=False)
    assert res.returncode == 2
    assert time.time() - start < 60  # start-up of torch + MONAI included; the probe itself takes seconds
    assert "127.0.0.1" in res.stderr and "Traceback" not in res.stderr


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_weights(cells, tmp_path, sig):
    settings = {"epochs": 4, "iterations_per_epoch": 3}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir()
    run_dir.mkdir()
    ref_cfg = tiny_config(ref_dir, cells, **settings)
    cfg = tiny_config(run_dir, cells, **settings)
    for path in (ref_cfg, cfg):
        raw = yaml.safe_load(path.read_text())
        raw["experiment"]["deterministic"] = True
        path.write_text(yaml.safe_dump(raw))
    run_medseg("train", ref_cfg, "--no-tracking")

    last = run_dir / "run" / "checkpoints" / "last.pt"
    proc = subprocess.Popen([MEDSEG, "train", str(cfg), "--no-tracking"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
    deadline = time.time() + 300
    while not last.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    output = proc.stdout.read()
    epoch_at_kill = load_checkpoint(last)["epoch"]
    assert epoch_at_kill < settings["epochs"], "the run finished before it could be interrupted"
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, output
        assert "resume" in output and "Traceback" not in output
    else:
        assert proc.returncode == -signal.SIGKILL
    run_medseg("train", cfg, "--no-tracking", "--resume", "auto")
    assert load_checkpoint(last)["epoch"] == settings["epochs"]
    assert _same_weights(_weights(last), _weights(ref_dir / "run" / "checkpoints" / "last.pt"))


def test_two_process_torchrun(cells, tmp_path):
    cfg = tiny_config(tmp_path, cells)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), MEDSEG, "train", str(cfg),
         "--no-tracking"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600, env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] == 2
    assert "2 processes" in res.stderr + res.stdout
