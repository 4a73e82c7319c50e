"""Data-parallel training with PyTorch DDP under ``torchrun``; a plain single process otherwise.

``torchrun --nproc-per-node N -m pipelines train ...`` starts N processes and tells each its place
through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init_distributed` reads it and joins the process group (NCCL on CUDA, Gloo on CPU); without
torchrun it returns a single-process :class:`DistInfo` and every helper here is a cheap no-op, so the
training code calls them unconditionally.

Faults: every collective has a timeout (``train.ddp_timeout``), so a process that stalls or dies ends the job
with a :class:`CollectiveTimeout` naming the setting instead of leaving the others waiting forever; and every
worker asks the kernel for SIGTERM when its parent (torchrun) dies, so a killed torchrun leaves no orphans.

Example:
    >>> info = init_distributed("auto")
    >>> try:
    ...     loss = all_reduce_mean(local_loss, info)
    ...     run_id = broadcast_object(run_id if info.is_main else None, info)
    ... finally:
    ...     cleanup_distributed()
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from medseg.errors import ConfigError, MedsegError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0
"""A collective that waits longer fails the job (rank 0 validating alone must fit in it)."""


class CollectiveTimeout(MedsegError, RuntimeError):
    """A collective operation did not complete: another process stalled, died or left early."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands.

    Attributes:
        rank: global index of this process, 0..world_size-1.
        world_size: number of processes (1 without torchrun).
        local_rank: index on this machine; picks the CUDA device.
        device: the device this process trains on.
        enabled: a process group is running (world_size > 1).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates, writes checkpoints and talks to MLflow."""
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the torchrun process group, or describe a single process when not launched by torchrun.

    Args:
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), ``"cuda"``,
            ``"cuda:N"`` (single process only) or ``"cpu"``.
        timeout_s: how long a collective may wait for the other processes before it fails.

    Returns:
        This process's :class:`DistInfo`. On CUDA the process's current device is set to it.

    Raises:
        ConfigError: CUDA requested but unavailable, or fewer visible GPUs than processes on this machine.
        ValueError: malformed torchrun environment variables.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world_size})")
    torch_device = _resolve_device(device, local_rank, distributed=world_size > 1)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size == 1:
        return DistInfo(0, 1, 0, torch_device, enabled=False)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch")
    _die_with_parent()
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if torch_device.type == "cuda":
            # device_id binds the communicator to our GPU, so collectives never guess a device.
            dist.init_process_group("nccl", device_id=torch_device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        log.info("process group %s: rank %d of %d on %s", dist.get_backend(), rank, world_size, torch_device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, torch_device, enabled=True)


def cleanup_distributed() -> None:
    """Leave the process group, if there is one (safe to call in every process, and twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective_errors(info: DistInfo, setting: str = "train.ddp_timeout") -> Iterator[None]:
    """Turn a failed collective (timeout, a peer gone) into a :class:`CollectiveTimeout` naming ``setting``."""
    try:
        yield
    except RuntimeError as err:
        if not info.enabled or not _collective_failure(err):
            raise
        reason = " ".join(str(err).split())[:200]
        raise CollectiveTimeout(
            f"rank {info.rank} of {info.world_size}: a collective operation failed, another process stalled, died "
            f"or stopped early (the wait is bounded by {setting}): {reason}"
        ) from None


def all_reduce_mean(value: float | torch.Tensor, info: DistInfo) -> float:
    """The mean of a scalar over all processes (the value itself in a single process).

    Every process must call it, in the same order as the others.

    Args:
        value: a Python number or a one-element tensor.
    """
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"all_reduce_mean averages one scalar, got a tensor of shape {tuple(value.shape)}")
    if not info.enabled:
        return float(value)
    # float64 so averaging many losses loses nothing; NCCL needs the tensor on this process's GPU.
    tensor = torch.as_tensor(value).detach().reshape(()).to(device=info.device, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item() / info.world_size


def broadcast_object(obj: T, info: DistInfo, src: int = 0) -> T:
    """``obj`` from process ``src`` in every process (any picklable object, e.g. the MLflow run id).

    Every process must call it; what the other processes pass is ignored.
    """
    if not info.enabled:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=info.device if info.device.type == "cuda" else None)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait until every process gets here."""
    if info.enabled:
        dist.barrier()


def shard(items: list[T], info: DistInfo) -> list[T]:
    """This process's share of ``items``: every ``world_size``-th item from ``rank`` (all when single).

    Round-robin rather than contiguous blocks, so cases sorted by size spread evenly over processes.
    """
    return list(items)[info.rank :: info.world_size]


# ------------------------------------------------------------------------------------------------ helpers


# What gloo and NCCL say when a peer does not answer; gloo raises a plain RuntimeError, not a DistError.
_COLLECTIVE_FAILURES = ("gloo/", "Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                        "NCCL", "Watchdog caught collective operation timeout")


def _collective_failure(err: RuntimeError) -> bool:
    return isinstance(err, dist.DistError) or any(text in str(err) for text in _COLLECTIVE_FAILURES)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (torchrun killed with SIGKILL cannot forward signals)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


def _resolve_device(device: str, local_rank: int, distributed: bool) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        raise ConfigError("train.device", f"expected auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise ConfigError("train.device", f"{device!r} requested but CUDA is not available; use auto or cpu")
    count = torch.cuda.device_count()
    if device.startswith("cuda:"):
        if distributed:
            raise ConfigError("train.device", f"{device!r} pins one GPU; under torchrun use cuda or auto")
        index = int(device.partition(":")[2]) if device.partition(":")[2].isdigit() else -1
        if not 0 <= index < count:
            raise ConfigError("train.device", f"{device!r}: expected cuda:0..cuda:{count - 1}")
        return torch.device("cuda", index)
    if local_rank >= count:
        raise ConfigError(
            "train.device",
            f"LOCAL_RANK={local_rank} needs GPU {local_rank} but {count} are visible: start at most {count} "
            "processes per machine, or train on cpu",
        )
    return torch.device("cuda", local_rank)
