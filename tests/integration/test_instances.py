"""Each instance representation end to end through the real CLI: a tiny training run (thresholds tuned on
its validation cases), then `predict --instances --save-probabilities`, 2D and 3D. Quality is not the point
at this budget; the pipeline, the channels and the geometry are."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
import yaml
from mlflow.tracking import MlflowClient

from medseg.config import load_config
from medseg.engine.checkpoint import load_checkpoint
from medseg.errors import ConfigError
from pipelines.common import resolve_dataset
from pipelines.predict import load_trained_model, predict_batch
from pipelines.train import retune_run
from tests.instances.clusters import touching_cells

from .conftest import run_medseg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cells2d(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "cells"
    run_medseg("synth", "cells", "--out", out, "--n", "3", "--n-test", "1", "--size", "48", "48", "--seed", "3")
    return out


@pytest.fixture(scope="module")
def cells3d(tmp_path_factory):
    """Three 3D volumes of touching nuclei (nnU-Net layout, instance labels)."""
    out = tmp_path_factory.mktemp("data") / "cells3d"
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    training = []
    for i in range(3):
        inst = touching_cells((20, 24, 22), 5, 5.0, seed=10 + i).astype(np.uint16)
        image = (inst > 0) * 1.0 + np.random.default_rng(i).normal(0, 0.2, inst.shape)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), out / "imagesTr" / f"c{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(inst, np.eye(4)), out / "labelsTr" / f"c{i}.nii.gz")
        training.append({"image": f"imagesTr/c{i}_0000.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
    spec = {"channel_names": {"0": "fluorescence"}, "labels": {"background": 0, "cell": 1}, "label_kind": "instance",
            "file_ending": ".nii.gz", "numTraining": 3, "training": training}
    (out / "dataset.json").write_text(json.dumps(spec))
    return out


def _config(tmp_path: Path, data: Path, target: str, dims: int) -> Path:
    cfg = {
        "experiment": {"name": f"inst_{target}{dims}d", "seed": 0, "output_dir": str(tmp_path / "run")},
        "data": {"root": str(data), "spatial_dims": dims, "val_fraction": 0.34, "num_workers": 0,
                 "instance_target": target,
                 "instance_to_semantic": "cell_border" if target == "border" else "foreground"},
        "transforms": {"patch_size": [32, 32] if dims == 2 else [16, 16, 16], "weight_map": {"enabled": dims == 2},
                       "augmentation": {"preset": "cells2d" if dims == 2 else "none"}},
        "model": {"name": "unet", "params": {"features": 4, "depth": 2, "deep_supervision": True}},
        "train": {"epochs": 1, "batch_size": 2, "iterations_per_epoch": 2},
        "inference": {"overlap": 0.25, "sw_batch_size": 2, "min_instance_size": 0, "tta": target == "distance"},
        "instances": {"msge_weight": 0.5},
        # MLflow once (the tuned thresholds are logged there), the other runs skip its start-up cost
        "tracking": {"enabled": target == "distance", "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj) if path.name.endswith(".nii.gz") else tifffile.imread(path)


# flows in 3D (its three components), the others in 2D: the CLI runs cost the suite most of its time
@pytest.mark.parametrize("target,dims", [("border", 2), ("distance", 2), ("flows", 3)])
def test_train_then_predict_instances(tmp_path, cells2d, cells3d, target, dims):
    data = cells2d if dims == 2 else cells3d
    run_medseg("train", _config(tmp_path, data, target, dims))
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    meta, meta_weights = trained["metadata"], trained["model"][next(iter(trained["model"]))]
    inst_meta = meta["instances"]
    channels = {"border": 0, "distance": 1, "flows": dims}[target]
    assert inst_meta["target"] == target and inst_meta["regression_channels"] == channels
    assert inst_meta["tuned"] and inst_meta["tuning"]["cases"] == 1 and inst_meta["tuning"]["combinations"] > 1
    # tuned on outputs made as `predict` makes them: with its mirror TTA where the model predicts with TTA
    assert inst_meta["tuning"]["tta"] is (target == "distance")
    # validated by instance AP, which chose the best checkpoint (train.monitor auto)
    assert trained["monitor"] == "ap" and {"val/ap", "val/ap50", "val/merges"} <= set(trained["history"])
    assert trained["best_metric"] == max(trained["history"]["val/ap"])
    if target == "distance":
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        run = client.search_runs([client.get_experiment_by_name("inst_distance2d").experiment_id])[0]
        assert float(run.data.params["instances.thresholds.marker"]) == inst_meta["thresholds"]["marker"]
        assert "val/instance_map" in run.data.metrics
        assert run.data.metrics["best/ap"] == trained["best_metric"]
    assert set(inst_meta["thresholds"]) == {"border": {"foreground"}, "distance": {"foreground", "marker"},
                                             "flows": {"foreground", "slope", "marker_size", "smooth"}}[target]
    if target == "distance":  # tuned again on the trained weights (after a post-processing change)
        retuned = retune_run(tmp_path / "run")
        assert retuned["tuning"]["cases"] == 1 and set(retuned["thresholds"]) == set(inst_meta["thresholds"])
        best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
        assert best["metadata"]["instances"]["thresholds"] == retuned["thresholds"]
        assert torch.equal(best["model"][next(iter(best["model"]))], meta_weights)

    scans = data / ("imagesTs" if dims == 2 else "imagesTr")
    out = tmp_path / "pred"
    run_medseg("predict", "--model", tmp_path / "run", "--input", scans, "--output", out, "--instances",
               "--save-probabilities")
    for scan in sorted(scans.iterdir())[:1]:
        stem = scan.name.split("_0000")[0]
        ending = scan.name.split("_0000")[1]
        image = _read(scan)
        inst = _read(out / f"{stem}_instances{ending}")
        labels = _read(out / f"{stem}{ending}")
        assert inst.shape == labels.shape == image.shape[: inst.ndim]
        assert np.issubdtype(inst.dtype, np.integer) and inst.min() >= 0
        ids = np.unique(inst[inst > 0])
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # consecutive ids
        saved = np.load(out / f"{stem}_probabilities.npz")
        assert saved["probabilities"].shape[0] == len(meta["classes"])
        assert ("regression" in saved) == (channels > 0)
        if channels:
            assert saved["regression"].shape[0] == channels

    if target == "distance":  # a threshold overridden at prediction time (in process): everything is foreground
        model, meta = load_trained_model(str(tmp_path / "run"))
        again = tmp_path / "pred_all"
        again.mkdir()
        records = predict_batch(model, meta, sorted(scans.iterdir())[:1], again, device=torch.device("cpu"),
                                instances=True, overrides=["instances.postprocess.foreground=0"], show_progress=False)
        assert [r.status for r in records] == ["ok"]
        assert (_read(sorted(again.glob("*_instances*"))[0]) > 0).all()
        with pytest.raises(ConfigError, match="instances.postprocess.slope"):
            predict_batch(model, meta, [], again, device=torch.device("cpu"), instances=True,
                          overrides=["instances.postprocess.slope=0"])


def test_bad_representation_settings_are_clear(tmp_path, cells2d):
    cfg = _config(tmp_path, cells2d, "flows", 2)
    proc = run_medseg("train", cfg, "--set", "data.instance_target=stardist", check=False)
    assert proc.returncode == 2 and "border, distance, flows" in proc.stderr and "data.instance_target" in proc.stderr
    with pytest.raises(ConfigError, match="slope") as err:
        resolve_dataset(load_config(cfg, ["instances.postprocess.marker=0.3"]))
    assert err.value.key == "instances.postprocess.marker"
    with pytest.raises(ConfigError, match="cell_border") as err:
        resolve_dataset(load_config(cfg, ["data.instance_target=border"]))
    assert err.value.key == "data.instance_to_semantic"
    with pytest.raises(ConfigError, match="border_width") as err:
        resolve_dataset(load_config(cfg, ["instances.border_width=0"]))
