"""`medseg train` under bad data and failing storage (issue 10 rows 2, 6, 8, 9, 10 and 11): a clear error
naming the file and the reason before any compute, or a documented recovery; never a traceback.

Row 10 fills no disk: the child gets a real file-size limit (``RLIMIT_FSIZE``, with SIGXFSZ ignored so the write
fails with EFBIG like a full disk fails with ENOSPC). Row 11 locks the real MLflow sqlite file from another
process holding an exclusive transaction.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time

import numpy as np
import yaml

from medseg.engine.checkpoint import load_checkpoint

from ..integration.conftest import MEDSEG
from .conftest import assert_clean_failure, blob_case, make_dataset, run_medseg, save_nifti, tiny_config


def test_training_refuses_nonfinite_scans(tmp_path):
    data = make_dataset(tmp_path / "data", n=3)
    image, _ = blob_case(np.random.default_rng(1))
    image.flat[[5, 6]] = np.nan
    save_nifti(data / "imagesTr" / "case2_0000.nii.gz", image)
    res = run_medseg("train", tiny_config(tmp_path, data), check=False)
    assert_clean_failure(res, 2, "case2_0000.nii.gz", "2 NaN and 0 Inf voxels")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_names_a_case_with_another_channel_count(tmp_path):
    data = make_dataset(tmp_path / "data", n=3)
    image, _ = blob_case(np.random.default_rng(1))
    save_nifti(data / "imagesTr" / "case2_0000.nii.gz", np.stack([image, image], axis=-1))
    res = run_medseg("train", tiny_config(tmp_path, data), check=False)
    assert_clean_failure(res, 2, "case2_0000.nii.gz", "model expects 1 channel", "has 2",
                         "4D NIfTI with 2 volumes")
    assert "stack expects" not in res.stdout + res.stderr


def test_unwritable_run_folder_fails_before_compute(trained, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the run folder should be")
    res = run_medseg("train", tiny_config(tmp_path, trained["data"]), "--output", blocker / "run", check=False)
    text = assert_clean_failure(res, 2, str(blocker / "run"), "cannot write")
    assert "training unet" not in text  # refused before the data was cached and the model built


def test_resume_from_a_checkpoint_of_another_architecture(trained, tmp_path):
    cfg = tiny_config(tmp_path, trained["data"], epochs=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["params"]["features"] = 8
    cfg.write_text(yaml.safe_dump(raw))
    res = run_medseg("train", cfg, "--resume", trained["model"], check=False)
    assert_clean_failure(res, 2, str(trained["model"]), "size mismatch")


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_checkpoint_save_hits_a_file_size_limit(trained, tmp_path):
    cfg = tiny_config(tmp_path, trained["data"], epochs=1)
    run_medseg("train", cfg)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    raw = yaml.safe_load(cfg.read_text())
    raw["train"]["epochs"] = 3
    cfg.write_text(yaml.safe_dump(raw))
    limit = len(before) // 2  # config and logs fit, a checkpoint does not
    res = subprocess.run([MEDSEG, "train", str(cfg), "--resume", "auto"], capture_output=True,
                         encoding="utf-8", errors="replace", preexec_fn=_limit_file_size(limit), timeout=600)
    text = assert_clean_failure(res, 2, str(tmp_path / "run" / "checkpoints"), "File too large",
                                "previous checkpoint")
    assert "enforce fail" not in text
    assert last.read_bytes() == before  # the previous checkpoint is intact...
    assert load_checkpoint(last)["epoch"] == 1  # ...and loads
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]  # no temporary left


LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
con.execute("ROLLBACK")
"""


def test_sqlite_store_locked_mid_run(trained, tmp_path):
    db = tmp_path / "mlflow.db"
    cfg = tiny_config(tmp_path, trained["data"], epochs=6)
    raw = yaml.safe_load(cfg.read_text())
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{db}"}
    cfg.write_text(yaml.safe_dump(raw))
    train = subprocess.Popen([MEDSEG, "train", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             encoding="utf-8", errors="replace")
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoints" / "last.pt").exists():  # the run is tracked and training
        assert train.poll() is None and time.time() < deadline
        time.sleep(0.05)
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, encoding="utf-8", errors="replace")
    assert locker.stdout.readline().strip() == "locked"
    locked_at = time.time()
    try:
        output, _ = train.communicate(timeout=600)
        stalled = time.time() - locked_at
    finally:
        locker.stdin.close()
        locker.wait(timeout=60)
    assert train.returncode == 0, output
    assert "Traceback" not in output, output
    warnings = [line for line in output.splitlines() if "is locked by another process" in line]
    assert len(warnings) == 1, output
    assert "tracking_fallback.jsonl" in warnings[0]
    journal = (tmp_path / "run" / "tracking_fallback.jsonl").read_text().splitlines()
    assert any('"log_metrics"' in line for line in journal)
    assert stalled < 90, f"the locked store stalled training for {stalled:.0f} s"
