"""`medseg plan` end to end: fingerprint, plan, write YAML; the YAML validates and trains one epoch as is."""

import json

import pytest

from medseg.data.synth import make_cells, make_lesions


@pytest.fixture
def env(tmp_path):
    return {"MEDSEG_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def test_plan_anisotropic_lesions_then_train(medseg, tmp_path, env):
    root = make_lesions(tmp_path / "lesions", n=3, size=(40, 40, 10), spacing=(0.8, 0.8, 4.0))
    out = tmp_path / "planned.yaml"
    proc = medseg("plan", root, "--out", out, "--memory", "0.05", "--hours", "0.01", cwd=tmp_path, env=env)
    assert "patch x batch" in proc.stdout and out.is_file()
    assert (root / "fingerprint.json").is_file()
    text = out.read_text()
    assert "strides: [[2, 2, 1]" in text.replace("\n", " ") or "[[2, 2, 1]," in text
    run = tmp_path / "run"
    medseg("train", out, "--fold", "0", "--set", "train.epochs=1", "--set", "train.iterations_per_epoch=1",
           "--no-tracking", "--output", run, cwd=tmp_path, env=env)
    assert (run / "fold_0" / "config.yaml").is_file()


def test_plan_cells_then_train(medseg, tmp_path, env):
    root = make_cells(tmp_path / "cells", n=3, size=(64, 64))
    out = tmp_path / "cells.yaml"
    medseg("plan", root, "--out", out, "--memory", "0.05", "--hours", "0.01", cwd=tmp_path, env=env)
    text = out.read_text()
    assert "weight_map" in text and "min_instance_size" in text and "instance_target:" in text
    run = tmp_path / "run"
    medseg("train", out, "--fold", "1", "--set", "train.epochs=1", "--set", "train.iterations_per_epoch=1",
           "--no-tracking", "--output", run, cwd=tmp_path, env=env)
    assert (run / "fold_1" / "checkpoints" / "last.pt").is_file()
    fp = json.loads((root / "fingerprint.json").read_text())
    assert fp["objects"]["count"] > 0


def test_plan_errors_are_one_line(medseg, tmp_path):
    proc = medseg("plan", tmp_path / "missing", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "missing" in proc.stderr
