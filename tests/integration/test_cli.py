"""The CLI as a user runs it: real subprocesses, real files."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile


def test_help_lists_every_command(medseg):
    out = medseg("--help").stdout
    for command in ("synth", "check", "train", "predict", "evaluate", "augment-preview", "config"):
        assert command in out
    assert "--resume" in medseg("train", "--help").stdout
    assert "--skip-existing" in medseg("predict", "--help").stdout


def test_synth_then_check_is_clean(medseg, tmp_path):
    out = tmp_path / "cells"
    medseg("synth", "cells", "--out", out, "--n", "3", "--n-test", "1", "--size", "96", "96", "--seed", "3")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and (out / "preview.png").is_file()
    res = medseg("check", out)
    assert "0 errors" in res.stdout and "ok" in res.stdout


def test_synth_cells_cluster_options(medseg, tmp_path):
    out = tmp_path / "cells"
    medseg("synth", "cells", "--out", out, "--n", "1", "--size", "96", "96", "--clusters", "1",
           "--cluster-size", "2", "3")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["clusters"] == 1.0 and meta["cluster_size"] == [2, 3]
    bad = medseg("synth", "cells", "--out", tmp_path / "bad", "--n", "1", "--clusters", "1.5", check=False)
    assert bad.returncode != 0 and "clusters" in bad.stderr and "Traceback" not in bad.stderr


def test_synth_lesions_3d_and_2d(medseg, tmp_path):
    medseg("synth", "lesions", "--out", tmp_path / "l3", "--n", "2", "--size", "40", "36", "16")
    assert medseg("check", tmp_path / "l3").returncode == 0
    assert nib.load(sorted((tmp_path / "l3" / "imagesTr").iterdir())[0]).shape == (40, 36, 16)  # X Y Z
    assert "X Y Z" in medseg("synth", "lesions", "--help").stdout
    medseg("synth", "lesions", "--dims", "2", "--out", tmp_path / "l2", "--n", "2", "--size", "64", "64")
    assert medseg("check", tmp_path / "l2").returncode == 0


def test_check_fails_on_a_broken_dataset_and_names_the_file(medseg, tmp_path):
    out = tmp_path / "cells"
    medseg("synth", "cells", "--out", out, "--n", "3", "--size", "64", "64")
    victim = sorted((out / "labelsTr").glob("*.tif"))[0]
    victim.unlink()
    image = sorted((out / "imagesTr").glob("*.tif"))[1]
    arr = tifffile.imread(image).astype(np.float32)
    arr[0, 0] = np.nan
    tifffile.imwrite(image, arr)
    res = medseg("check", out, check=False)
    assert res.returncode == 1
    assert victim.stem in res.stdout and image.name in res.stdout
    assert "NOT ready" in res.stdout


def test_bad_config_is_one_clear_line_and_exit_2(medseg, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {root: x}\ntransforms: {patch_size: [64, 64]}\ntrain: {epochz: 3}\n")
    res = medseg("config", cfg, check=False)
    assert res.returncode == 2
    assert "train.epochz: unknown key; expected one of: epochs" in res.stderr
    assert "Traceback" not in res.stderr
    res = medseg("config", cfg, "--set", "train.epochz=", "--set", "train.epochs=4", check=False)
    assert res.returncode == 2  # still unknown: --set goes through the same validation


def test_augment_preview_writes_a_grid(medseg, tmp_path):
    import yaml
    from PIL import Image

    medseg("synth", "cells", "--out", tmp_path / "cells", "--n", "2", "--size", "96", "96")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"root": str(tmp_path / "cells"), "spatial_dims": 2},
        "transforms": {"patch_size": [64, 64], "weight_map": {"enabled": True}, "augmentation": {"preset": "cells2d"}},
    }))
    out = tmp_path / "aug.png"
    medseg("augment-preview", cfg, "--out", out, "--n", "3")
    width, height = Image.open(out).size
    assert width > 200 and height > 100
    res = medseg("check", cfg)  # a config is accepted too: its data.root is checked
    assert "0 errors" in res.stdout


def test_python_m_pipelines_is_the_cli_and_runs_once(tmp_path):
    """`python -m pipelines` (also what `torchrun -m pipelines` starts) runs the command exactly once."""
    config = Path(__file__).resolve().parents[2] / "configs" / "demo_cells.yaml"
    res = subprocess.run([sys.executable, "-m", "pipelines", "config", str(config)],
                         capture_output=True, encoding="utf-8", errors="replace", cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\nmodel:") == 1, res.stdout


def test_config_runs_the_validation_train_runs_and_reports_every_problem(medseg):
    bad = ["--set", "model.params.depth=0", "--set", "model.params.feature=8", "--set", "train.epochs=0"]
    config = Path(__file__).resolve().parents[2] / "configs" / "demo_cells.yaml"
    checked = medseg("config", config, *bad, check=False)
    trained = medseg("train", config, "--no-tracking", *bad, check=False)
    assert checked.returncode == trained.returncode == 2
    lines = checked.stderr.strip().splitlines()
    assert [line.replace("medseg config", "medseg train") for line in lines] == trained.stderr.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in checked.stderr
    for key in ("model.params.depth", "model.params.feature", "train.epochs"):
        assert any(f": {key}: " in line for line in lines), key
    assert not any(arg in checked.stderr for arg in ("spatial_dims", "in_channels", "num_classes"))
