"""The logged model served by a real `mlflow models serve` answers like `medseg predict`."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tifffile

from medseg.data.readers import load_image
from medseg.predictor import load_model_file
from medseg.tracking import Tracker

from .conftest import run_medseg
from .test_predict import make_model

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture
def served(tmp_path):
    """A cell model logged to a SQLite store and served on 127.0.0.1; the server is killed at the end."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoint = make_model(tmp_path / "m.pt", 2, seed=4)
    model, meta = load_model_file(checkpoint)
    with Tracker(store, "serve", fallback_dir=tmp_path / "run") as tracker:
        uri = tracker.log_model(model, meta)
    port = _free_port()
    # the venv's bin first on PATH, as in an activated venv: mlflow starts `uvicorn` by name
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(MLFLOW).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_file = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([MLFLOW, "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port), "-w", "1"], cwd=tmp_path, env=env, stdout=log_file,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("mlflow models serve did not come up:\n" + (tmp_path / "server.log").read_text())
                time.sleep(0.5)
        yield url, checkpoint
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server and the workers it started
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log_file.close()


@pytest.mark.slow
def test_the_served_model_answers_like_medseg_predict(served, tmp_path):
    url, checkpoint = served
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(1)
    tifffile.imwrite(scans / "cell.tif", rng.integers(0, 4000, size=(41, 35), dtype=np.uint16))
    run_medseg("predict", "--model", checkpoint, "--input", scans, "--output", tmp_path / "pred", "--instances")
    want_labels = np.asarray(load_image(tmp_path / "pred" / "cell.tif"))[0]
    want_instances = np.asarray(load_image(tmp_path / "pred" / "cell_instances.tif"))[0]

    image = np.asarray(load_image(scans / "cell.tif"))  # C x y, as medseg reads it
    # JSON numbers are float64; the signature makes the server cast them to float32
    status, answer = _post(f"{url}/invocations", {"inputs": image.astype(np.float64).tolist(),
                                                  "params": {"instances": True}})
    assert status == 200, answer
    labels = np.asarray(answer["predictions"]["labels"])
    instances = np.asarray(answer["predictions"]["instances"])
    assert labels.shape == want_labels.shape == image.shape[1:]
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(instances, want_instances)
    assert want_instances.max() > 0  # there were cells to split

    status, answer = _post(f"{url}/invocations", {"inputs": image[:, :, :, None].tolist()})
    assert status >= 400 and "expected" in json.dumps(answer)  # a 3D array for a 2D model: refused, said why
