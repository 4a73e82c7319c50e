"""Synthetic instance maps for the representation tests: dense clusters of touching objects, 2D and 3D."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def touching_cells(shape, n: int, radius: float, seed: int = 0, spacing: float = 1.4) -> np.ndarray:
    """``n`` round objects of about ``radius`` whose discs overlap, split along the bisectors of their
    centres (a Voronoi partition of the union of discs): neighbours touch with no background between them.
    Centres lie at least ``spacing * radius`` apart so every object keeps a body."""
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    centres: list[np.ndarray] = []
    lo, hi = radius * 0.8, np.asarray(shape) - radius * 0.8
    for _ in range(10_000):
        if len(centres) == n:
            break
        c = rng.uniform(lo, hi)
        apart = all(np.linalg.norm(c - o) >= spacing * radius for o in centres)
        # each new object overlaps an earlier one: a cluster
        if apart and (not centres or min(np.linalg.norm(c - o) for o in centres) <= 2 * radius * 0.95):
            centres.append(c)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    dist = np.stack([np.linalg.norm(grid - c, axis=-1) for c in centres])
    nearest = dist.argmin(0)
    inside = dist.min(0) <= radius
    inst = np.where(inside, nearest + 1, 0)
    # keep only the largest piece of each id (a Voronoi cell cut by another disc could split)
    out = np.zeros(shape, np.int32)
    for i in range(1, len(centres) + 1):
        parts, count = ndimage.label(inst == i)
        if count:
            sizes = np.bincount(parts.ravel())[1:]
            out[parts == sizes.argmax() + 1] = i
    return out


def touches(inst: np.ndarray) -> bool:
    """Whether two different objects share a face somewhere (no background between them)."""
    for axis in range(inst.ndim):
        a = np.moveaxis(inst, axis, 0)
        x, y = a[1:], a[:-1]
        if np.any((x > 0) & (y > 0) & (x != y)):
            return True
    return False


def one_hot(classes: np.ndarray, k: int) -> np.ndarray:
    """Perfect probabilities ``K *S`` of a class map."""
    return (np.arange(k).reshape(-1, *[1] * classes.ndim) == classes[None]).astype(np.float32)
