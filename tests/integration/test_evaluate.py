"""`medseg evaluate` on hand-made cases whose Dice, HD95 and AP are known."""

import csv
import json

import numpy as np
import pytest
import tifffile

from .conftest import run_medseg


def _write(folder, name, array):
    folder.mkdir(exist_ok=True)
    tifffile.imwrite(folder / f"{name}.tif", array.astype(np.uint16))


def test_semantic_figures_match_the_hand_computed_ones(tmp_path):
    ref = np.zeros((40, 40))
    ref[10:20, 10:20] = 1
    pred = np.zeros((40, 40))
    pred[10:20, 12:22] = 1  # shifted by 2 px: overlap 80 of 100 + 100
    _write(tmp_path / "ref", "a", ref)
    _write(tmp_path / "pred", "a", pred)
    _write(tmp_path / "ref", "b", ref)  # no prediction: scored as empty and listed
    res = run_medseg("evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref", check=False)
    assert res.returncode == 1 and "missing predictions (scored as empty): b" in res.stdout
    with open(tmp_path / "pred" / "metrics.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert float(rows["a"]["dice"]) == pytest.approx(0.8)
    assert float(rows["a"]["iou"]) == pytest.approx(80 / 120)
    assert float(rows["a"]["hd95"]) == pytest.approx(2.0)
    assert float(rows["b"]["dice"]) == 0.0
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["per_class"]["class_1"]["dice"] == pytest.approx(0.4)
    assert summary["per_class"]["class_1"]["n_empty_mismatch"] == 1
    assert "Dice" in res.stdout and "class_1" in res.stdout


def test_instance_ap_f1_pq(tmp_path):
    ref = np.zeros((30, 60))
    ref[2:10, 2:10], ref[2:10, 20:28], ref[15:25, 40:50] = 1, 2, 3
    pred = np.zeros((30, 60))
    pred[2:10, 2:10], pred[2:10, 20:28] = 5, 9  # two exact matches, other ids
    pred[20:28, 2:10] = 7  # one false positive; ref 3 is missed
    _write(tmp_path / "ref", "c", ref)
    _write(tmp_path / "pred", "c_instances", pred)
    _write(tmp_path / "pred", "c", (pred > 0))
    run_medseg("evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--instances",
               "--out", tmp_path / "eval")
    inst = json.loads((tmp_path / "eval" / "summary.json").read_text())["instances"]
    assert inst["ap_50"] == pytest.approx(2 / 4)
    assert inst["ap_95"] == pytest.approx(2 / 4)  # exact matches survive every threshold
    assert inst["f1_50"] == pytest.approx(2 * 2 / 6)
    assert inst["pq"] == pytest.approx(1.0 * (2 * 2 / 6))
