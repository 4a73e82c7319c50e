"""`medseg export` and `medseg predict --model EXPORT_DIR` through the real CLI."""

import json

import numpy as np
import pytest
import tifffile

from medseg.export import METADATA_FILE

from .conftest import run_medseg
from .test_predict import make_model


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    for name, size in (("a", (45, 37)), ("b", (30, 61))):  # not multiples of anything, one under the patch
        tifffile.imwrite(folder / f"{name}.tif", rng.integers(0, 4000, size=size, dtype=np.uint16))
    return folder


def _predict(model, scans, out):
    # fp32: the torch checkpoint would otherwise run bf16 on a CPU that has it, the ONNX network never
    run_medseg("predict", "--model", model, "--input", scans, "--output", out, "--instances", "--save-probabilities",
               "--tta", "--precision", "fp32")
    return {name: (tifffile.imread(out / f"{name}.tif"), tifffile.imread(out / f"{name}_instances.tif"),
                   np.load(out / f"{name}_probabilities.npz")["probabilities"].astype(np.float32))
            for name in ("a", "b")}


@pytest.fixture(scope="module")
def trained(scans, tmp_path_factory):
    """A checkpoint and what `medseg predict` makes of the scans with it."""
    folder = tmp_path_factory.mktemp("torch")
    checkpoint = make_model(folder / "m.pt", 2, seed=3)
    return checkpoint, _predict(checkpoint, scans, folder / "pred")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_predict_with_an_export_equals_predict_with_the_checkpoint(fmt, scans, trained, tmp_path):
    checkpoint, want = trained
    res = run_medseg("export", "--model", checkpoint, "--format", fmt, "--out", tmp_path / "export")
    assert "largest difference to torch" in res.stdout
    meta = json.loads((tmp_path / "export" / METADATA_FILE).read_text())
    assert meta["export"]["format"] == fmt and meta["export"]["max_abs_difference"] <= 1e-4
    assert meta["classes"] == {"background": 0, "cell": 1, "border": 2}

    got = _predict(tmp_path / "export", scans, tmp_path / "exported")
    for name in want:
        labels, instances, probs = want[name]
        labels_x, instances_x, probs_x = got[name]
        np.testing.assert_allclose(probs_x, probs, atol=2e-3)  # float16 files
        # labels agree wherever the two best classes are not within float noise of a tie
        top2 = np.sort(probs, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 1e-3
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(labels_x[clear.T], labels[clear.T])
        if clear.all():
            np.testing.assert_array_equal(instances_x, instances)


def test_export_errors_are_one_clear_line(tmp_path):
    checkpoint = make_model(tmp_path / "m.pt", 2)
    res = run_medseg("export", "--model", checkpoint, "--format", "onnx", "--out", tmp_path / "m.pt", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "m.pt: exists and is not a folder" in res.stderr
    res = run_medseg("export", "--model", tmp_path / "missing.pt", "--format", "onnx", "--out", tmp_path / "e",
                     check=False)
    assert res.returncode == 2 and "missing.pt" in res.stderr and "Traceback" not in res.stderr
