"""Cross-validation through the CLI: `medseg train --fold K` per fold, `medseg cv` over them, MLflow nesting."""

import json

import pytest
from mlflow.tracking import MlflowClient

from .test_train import tiny_config

pytestmark = pytest.mark.slow


def test_two_folds_then_cv(medseg, tmp_path):
    data = tmp_path / "cells"
    medseg("synth", "cells", "--out", data, "--n", "4", "--size", "48", "48")
    config = tiny_config(tmp_path, data, epochs=1, iterations_per_epoch=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"OMP_NUM_THREADS": "1"}
    for fold in (0, 1):
        medseg("train", config, "--fold", fold, "--set", "data.folds=2", "--tracking-uri", uri, cwd=tmp_path, env=env)
    splits = json.loads((data / "splits.json").read_text())
    assert sorted(n for f in splits for n in f["val"]) == sorted(f"cells_{i:03d}" for i in range(4))
    run = tmp_path / "run"
    for fold in (0, 1):
        validated = (run / f"fold_{fold}" / "artifacts" / "validation_cases.csv").read_text()
        assert all(name in validated for name in splits[fold]["val"])
    proc = medseg("cv", run, "--tracking-uri", uri, cwd=tmp_path)
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["cases"] == 4 and set(summary["folds"]) == {"fold_0", "fold_1"}
    assert "parent run" in proc.stdout
    # instance models: each fold's validation AP (tuned thresholds) is in the summary, per fold and overall
    for fold in summary["folds"].values():
        assert 0.0 <= fold["instance_map"] <= fold["instance_ap50"] <= 1.0
    assert summary["mean_over_cases"]["instance_ap50"] >= min(f["instance_ap50"] for f in summary["folds"].values())
    # the config file names the same run folder: same summary
    medseg("cv", config, "--no-tracking", cwd=tmp_path)
    assert json.loads((run / "cv_summary.json").read_text())["mean_over_cases"] == summary["mean_over_cases"]

    parent_id = json.loads((run / "cv_parent.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    assert any(k.startswith("cv/dice") for k in parent.data.metrics)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.data.tags["medseg.fold"] for r in children) == ["0", "1"]


def test_cv_of_a_missing_folder_is_a_clear_error(medseg, tmp_path):
    proc = medseg("cv", tmp_path / "nowhere", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "nowhere" in proc.stderr and "fold_0" in proc.stderr
