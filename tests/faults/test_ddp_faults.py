"""Row 12 of the fault matrix (issue 10), with real torchrun and two CPU (gloo) processes.

A rank that stalls (SIGSTOP) ends the job within ``train.ddp_timeout`` (5 s here) with a clear error naming the
setting, instead of the other rank waiting forever; killing torchrun -- politely (SIGTERM) or not (SIGKILL, which
it cannot forward) -- leaves no worker behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..integration.conftest import MEDSEG
from .conftest import tiny_config

pytestmark = pytest.mark.slow
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping is left


def _rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _start(trained, tmp_path) -> tuple[subprocess.Popen, dict[int, int]]:
    """torchrun with 2 training processes, once both train (the first checkpoint exists)."""
    cfg = tiny_config(tmp_path, trained["data"], epochs=200, ddp_timeout=5)
    proc = subprocess.Popen(
        [TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_free_port()), MEDSEG, "train", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.1)
    workers = {_rank(pid): pid for pid in _children(proc.pid)}
    assert set(workers) == {0, 1}, workers
    return proc, workers


def _wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _cleanup(proc: subprocess.Popen, workers: dict[int, int]) -> None:
    for pid in [proc.pid, *workers.values()]:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_a_stalled_rank_ends_the_job_within_ddp_timeout(trained, tmp_path):
    proc, workers = _start(trained, tmp_path)
    try:
        os.kill(workers[1], signal.SIGSTOP)
        stopped_at = time.time()
        output, _ = proc.communicate(timeout=300)
        took = time.time() - stopped_at
        assert proc.returncode != 0
        assert "train.ddp_timeout" in output and "rank 0 of 2" in output, output
        # torchrun prints its own ChildFailedError traceback; none may come from our code
        assert not re.search(r'File ".*/(medseg|pipelines)/', output), output
        assert _wait_gone(workers.values(), 60) == []
        assert took < 120, f"the job took {took:.0f} s to end after a rank stalled"
    finally:
        _cleanup(proc, workers)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_torchrun_leaves_no_worker(trained, tmp_path, sig):
    proc, workers = _start(trained, tmp_path)
    try:
        proc.send_signal(sig)
        proc.wait(timeout=120)
        assert _wait_gone(workers.values(), 60) == [], f"workers outlived torchrun killed by {sig.name}"
    finally:
        _cleanup(proc, workers)
