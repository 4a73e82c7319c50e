"""DDP helpers: a single process is a cheap no-op, and a real 2-process torchrun (Gloo on CPU) agrees.

Run as a script, this file is the worker that torchrun starts: ``python test_distributed.py OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medseg.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
    shard,
)
from medseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single_process(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_without_torchrun_everything_is_a_single_process_no_op(single_process):
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), enabled=False)
    assert info.is_main
    assert all_reduce_mean(2.5, info) == 2.5
    assert all_reduce_mean(torch.tensor([1.5]), info) == 1.5
    payload = {"run_id": "abc"}
    assert broadcast_object(payload, info) is payload
    assert shard([3, 1, 2], info) == [3, 1, 2]
    barrier(info)
    cleanup_distributed()
    cleanup_distributed()  # safe twice
    assert not torch.distributed.is_initialized()


def test_auto_device_is_cuda_when_available_else_cpu(single_process):
    info = init_distributed("auto")
    assert info.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error(single_process):
    with pytest.raises(ConfigError, match="CUDA is not available") as info:
        init_distributed("cuda")
    assert info.value.key == "train.device"


def test_bad_device_and_environment_are_named(single_process, monkeypatch):
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        init_distributed("gpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        init_distributed("cpu")


def test_all_reduce_mean_wants_a_scalar():
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        all_reduce_mean(torch.ones(2), DistInfo())


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover_every_item(world_size):
    items = [f"case_{i}" for i in range(10)]
    shards = [shard(items, DistInfo(rank=r, world_size=world_size, enabled=world_size > 1)) for r in range(world_size)]
    assert sorted(x for s in shards for x in s) == sorted(items)
    assert sum(len(s) for s in shards) == len(items)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three Python processes importing torch: ~5 s idle, ~20 s on a busy machine
def test_two_processes_under_torchrun_agree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",  # Gloo on CPU, whatever the machine has
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run",  # what the torchrun script runs
        "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        __file__, str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["info"] == {
            "rank": rank, "world_size": 2, "local_rank": rank, "device": "cpu", "enabled": True,
            "is_main": rank == 0, "backend": "gloo",
        }  # fmt: skip
        assert res["mean_float"] == 2.0  # (1 + 3) / 2
        assert res["mean_tensor"] == 0.75  # (0.5 + 1.0) / 2
        assert res["from_rank0"] == {"run_id": "run-of-rank-0", "n": [1, 2]}
        assert res["from_rank1"] == "sent by rank 1"
        assert res["initialized_after_cleanup"] is False
    assert results[0]["shard"] == [0, 2, 4] and results[1]["shard"] == [1, 3]


def _worker(out_dir: Path) -> None:
    """One torchrun process: exercise every helper and write what it saw."""
    info = init_distributed("cpu")
    res = {
        "info": {
            "rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
            "device": str(info.device), "enabled": info.enabled, "is_main": info.is_main,
            "backend": torch.distributed.get_backend(),
        },
        "mean_float": all_reduce_mean(1.0 + 2 * info.rank, info),
        "mean_tensor": all_reduce_mean(torch.tensor(0.5 * (info.rank + 1), requires_grad=True), info),
        "from_rank0": broadcast_object({"run_id": "run-of-rank-0", "n": [1, 2]} if info.is_main else None, info),
        "from_rank1": broadcast_object("sent by rank 1" if info.rank == 1 else "ignored", info, src=1),
        "shard": shard(list(range(5)), info),
    }  # fmt: skip
    barrier(info)
    cleanup_distributed()
    res["initialized_after_cleanup"] = torch.distributed.is_initialized()
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
