"""The logged pyfunc runs what `medseg predict` runs, instance representations and tuned thresholds included."""

import warnings

import numpy as np
import pytest
import tifffile
import torch

from medseg.data.readers import load_image
from medseg.engine.checkpoint import save_checkpoint
from medseg.nets import build_network
from medseg.tracking import Tracker
from medseg.tracking.models import fluent_scope
from medseg.tracking.pyfunc import signature_and_example
from medseg.transforms.presets import build_normalization
from pipelines.predict import load_trained_model, predict_batch


def _distance_model(path, foreground: float):
    """A 2D cell model with the distance representation (one regression channel) and non-default thresholds."""
    torch.manual_seed(3)
    params = {"features": 4, "depth": 2}
    net = build_network("unet", params, spatial_dims=2, in_channels=1, num_classes=3)  # 2 classes + 1 distance
    meta = {
        "format": "medseg-model-v1", "model": {"name": "unet", "params": params}, "spatial_dims": 2,
        "in_channels": 1, "classes": {"background": 0, "cell": 1}, "label_kind": "instance",
        "instance_to_semantic": "cell", "spacing": None, "patch_size": [32, 32],
        "normalize": {"mode": "zscore", "lower": 1.0, "upper": 99.8, "per_channel": True, "nonzero": False},
        "inference": {"overlap": 0.25, "sw_batch_size": 2, "tta": False, "min_instance_size": 2,
                      "precision": "fp32"},
        "instances": {"target": "distance", "params": {}, "regression_channels": 1, "vector_axes": [None],
                      "thresholds": {"foreground": foreground, "marker": -1e6}, "tuned": True},
    }
    return save_checkpoint(path, {"model": net.state_dict(), "metadata": meta, "epoch": 1})


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return uri


def test_pyfunc_instances_equal_medseg_predict_with_the_tuned_thresholds(store, tmp_path):
    import mlflow.pyfunc

    rng = np.random.default_rng(0)
    scans = tmp_path / "scans"
    scans.mkdir()
    tifffile.imwrite(scans / "cell.tif", rng.integers(0, 4000, size=(37, 29), dtype=np.uint16))
    image = np.asarray(load_image(scans / "cell.tif"))  # C x y
    answers = []
    for foreground in (0.0, 1.5):  # all cell, none: the thresholds in the metadata must reach the pyfunc
        model, meta = load_trained_model(str(_distance_model(tmp_path / f"m{foreground}.pt", foreground)))
        out = tmp_path / f"pred{foreground}"
        out.mkdir()
        records = predict_batch(model, meta, [scans / "cell.tif"], out, device=torch.device("cpu"), instances=True,
                                show_progress=False)
        assert records[0].status == "ok", records[0].error
        want = np.asarray(load_image(out / "cell_instances.tif"))[0]
        with Tracker(store, "pyfunc", fallback_dir=tmp_path / f"run{foreground}") as tracker:
            uri = tracker.log_model(model, meta)
        with fluent_scope(store):  # mlflow.pyfunc reads runs:/ from the process-wide tracking URI
            served = mlflow.pyfunc.load_model(uri)
        got = served.predict(image.astype(np.float32), params={"instances": True})
        np.testing.assert_array_equal(got["instances"], want)
        np.testing.assert_array_equal(got["labels"], np.asarray(load_image(out / "cell.tif"))[0])
        answers.append(got["instances"])
    assert (answers[0] == 1).all() and (answers[1] == 0).all()


def test_signature_declares_float32_channels_first_and_the_params():
    meta = {"spatial_dims": 3, "in_channels": 2, "classes": {"bg": 0, "lesion": 1}, "patch_size": [64, 48, 16],
            "label_kind": "semantic", "inference": {"tta": True}}
    signature, (example, params) = signature_and_example(meta)
    spec = signature.inputs.inputs[0]
    assert spec.type == np.dtype(np.float32) and spec.shape == (2, -1, -1, -1)
    assert example.shape == (2, 32, 32, 16) and params == {"tta": True, "instances": False}


@pytest.mark.parametrize("mode", ["percentile", "zscore", "ct"])
def test_the_input_example_normalises_without_warnings(mode):
    meta = {"spatial_dims": 2, "in_channels": 1, "classes": {"bg": 0, "cell": 1}, "patch_size": [64, 64],
            "label_kind": "instance", "inference": {}}
    _, (example, _) = signature_and_example(meta)
    normalize = build_normalization({"mode": mode, "window": [0.0, 1.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant example made MONAI warn "Divide by zero (a_min == a_max)"
        out = normalize({"image": torch.from_numpy(example)})["image"]
    assert torch.isfinite(torch.as_tensor(out)).all()
