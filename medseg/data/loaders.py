"""Datasets and loaders for training: MONAI (Cache)Dataset + DataLoader, epochs that are pure functions of a seed.

Every epoch's sample order and every worker's augmentation seed are derived from ``(seed, epoch)``, so an epoch
replayed after a resume draws exactly the same patches and augmentations as the first time (the basis of the
bit-exact SIGKILL/resume guarantee on CPU in deterministic mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.data.utils import set_rnd
from monai.data.utils import worker_init_fn as monai_worker_init
from torch.utils.data import Sampler


def split_cases(
    names: Sequence[str], val_fraction: float, val_cases: Sequence[str] | None = None, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Indices of training and validation cases.

    Args:
        names: case names, one per case.
        val_fraction: share of cases held out when ``val_cases`` is not given (at least one when > 0 and there
            are two cases or more).
        val_cases: explicit validation case names.
        seed: the split is a deterministic function of the names and the seed.

    Raises:
        ValueError: an explicit validation case that does not exist.
    """
    if val_cases:
        missing = sorted(set(val_cases) - set(names))
        if missing:
            raise ValueError(f"data.val_cases: unknown case names {missing}; known: {sorted(names)[:10]}...")
        val = [i for i, n in enumerate(names) if n in set(val_cases)]
    else:
        n_val = 0 if val_fraction == 0 or len(names) < 2 else max(1, round(len(names) * val_fraction))
        order = sorted(range(len(names)), key=lambda i: names[i])
        rng = np.random.default_rng(seed)
        val = sorted(int(i) for i in rng.permutation(order)[:n_val])
    train = [i for i in range(len(names)) if i not in set(val)]
    return train, val


class EpochSampler(Sampler[int]):
    """Draws ``num_samples`` indices per epoch from shuffled passes over the dataset, sharded across processes.

    The order depends only on ``(seed, epoch)`` and the process' rank, so a replayed epoch is identical.
    With more samples than cases it cycles through fresh permutations (small datasets, fixed epoch length).
    """

    def __init__(self, n: int, num_samples: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.per_rank = math.ceil(num_samples / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.per_rank * self.world_size
        passes = [rng.permutation(self.n) for _ in range(math.ceil(total / self.n))]
        order = np.concatenate(passes)[:total]
        return iter(order[self.rank :: self.world_size].tolist())


def make_dataset(data: list[dict[str, Any]], transform: Callable, cache: bool, num_workers: int = 0) -> Dataset:
    """A MONAI dataset; with ``cache`` the deterministic prefix of ``transform`` (up to the first random
    transform) is computed once and kept in memory, the random rest runs every time an item is drawn."""
    if cache:
        return CacheDataset(data, transform, num_workers=max(1, num_workers), progress=False, copy_cache=True)
    return Dataset(data, transform)


def make_train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    samples_per_epoch: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    sampler = EpochSampler(len(dataset), samples_per_epoch, seed=seed, rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        generator=torch.Generator(),
        persistent_workers=False,
        worker_init_fn=_worker_init,
    )


def _worker_init(worker_id: int) -> None:
    """One intra-op thread per loader worker (the main process' threads already use the cores), then MONAI's
    per-worker seeding of the random transforms."""
    torch.set_num_threads(1)
    monai_worker_init(worker_id)


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make the coming epoch a pure function of ``(seed, epoch)``: sample order, worker seeds, and (without
    workers) the random transforms' own states."""
    epoch_seed = (seed * 100_003 + epoch) % (2**31)
    if isinstance(loader.sampler, EpochSampler):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)
    if loader.num_workers == 0:
        set_rnd(loader.dataset, seed=epoch_seed)


def make_eval_loader(dataset: Dataset, num_workers: int = 0) -> DataLoader:
    """Whole cases one at a time (sizes differ between cases), for validation with sliding windows."""
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers)
