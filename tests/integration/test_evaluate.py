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


def _touching_row(shape, n=4):
    """``n`` reference cells side by side along the last axis, no background between them."""
    ref = np.zeros(shape)
    inner = (slice(2, 8),) * (len(shape) - 1)
    for i in range(n):
        ref[(*inner, slice(2 + 8 * i, 10 + 8 * i))] = i + 1
    return ref, inner


@pytest.mark.parametrize("dims", [2, 3])
def test_merges_and_splits_per_case_in_total_and_in_mlflow(tmp_path, dims):
    shape = (10,) * (dims - 1) + (40,)
    ref, inner = _touching_row(shape)
    merged = np.where(ref > 0, 1, 0)
    merged[(*inner, slice(18, 34))] = 2  # cells 1+2 merged, cells 3+4 merged: two merges
    split = ref.copy()
    split[(*inner, slice(2, 6))] = 9  # cell 1 cut in two: one split
    ext = "tif" if dims == 2 else "nii.gz"
    for name, arr in (("merged", merged), ("split", split), ("exact", ref)):
        _write_any(tmp_path / "ref", name, ref, ext)
        _write_any(tmp_path / "pred", f"{name}_instances", arr, ext)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = run_medseg("evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--instances",
                     "--out", tmp_path / "eval", "--tracking-uri", uri)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    cases = summary["instance_cases"]
    assert (cases["merged"]["merges"], cases["merged"]["merged_refs"], cases["merged"]["splits"]) == (2, 4, 0)
    assert (cases["split"]["merges"], cases["split"]["splits"], cases["split"]["split_preds"]) == (0, 1, 2)
    assert cases["exact"]["merges"] == cases["exact"]["splits"] == 0 and cases["exact"]["map"] == 1
    totals = summary["instance_totals"]
    assert (totals["merges"], totals["merged_refs"], totals["splits"], totals["n_ref"]) == (2, 4, 1, 12)
    with open(tmp_path / "eval" / "metrics.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert float(rows["merged"]["merges"]) == 2 and float(rows["split"]["splits"]) == 1
    # The printed table: totals and the worst case (AP@0.5 0, two merges) listed first.
    assert "merges 2 (predictions covering >= 2 references, 4 references" in res.stdout
    case_lines = [line.split() for line in res.stdout.splitlines() if line.split()[:1] in (["merged"], ["split"])]
    assert case_lines[0][0] == "merged" and case_lines[0][-2:] == ["2", "0"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medseg-evaluate").experiment_id])
    assert run.data.metrics["eval/instance_totals/merges"] == 2
    assert run.data.metrics["eval/instance_totals/splits"] == 1


def _write_any(folder, name, array, ext):
    if ext == "tif":
        _write(folder, name, array)
        return
    import nibabel as nib

    folder.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.int16), np.eye(4)), str(folder / f"{name}.{ext}"))
