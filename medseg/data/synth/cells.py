"""Synthetic fluorescence nuclei: isolated nuclei and dense clusters of touching ones (no background between
them), under uneven illumination, blur and camera noise."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

from medseg.data.synth.shared import (
    blob_distance,
    check_arguments,
    grain,
    radial_factor,
    smooth_field,
    write_dataset,
    write_tiff,
)
from medseg.errors import ConfigError

_ASPECT = (1.0, 1.8)  # axis ratio of the ellipses
_GAP = np.ones((3, 3), bool)  # separate groups keep at least one background pixel between them (8-connected)


class _Nucleus(NamedTuple):
    """An irregular ellipse: semi-axes ``a >= b`` (pixels), orientation ``theta`` and an outline modulation."""

    a: float
    b: float
    theta: float
    factor: object

    def distance(self, dy, dx) -> np.ndarray:
        """Normalised distance of offsets from the centre: <= 1 inside, 1 on the outline."""
        return blob_distance(dy, dx, self.a, self.b, self.theta, self.factor)

    def extent(self, direction: np.ndarray) -> float:
        """Distance from the centre to the outline along the unit vector ``(dy, dx)`` (the distance is
        homogeneous of degree 1, so one evaluation gives it)."""
        return float(1 / self.distance(np.asarray(direction[0]), np.asarray(direction[1])))


def _draw_nucleus(rng, diameter) -> _Nucleus:
    r = np.exp(rng.uniform(np.log(diameter[0]), np.log(diameter[1]))) / 2  # log-uniform: more small ones
    aspect = rng.uniform(*_ASPECT)
    return _Nucleus(r * np.sqrt(aspect), r / np.sqrt(aspect), rng.uniform(0, np.pi), radial_factor(rng, 0.06))


def _render_group(nuclei: list[_Nucleus], centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids ``1..m`` and normalised distances of a group in its own box (1 px margin all round).

    A pixel inside several outlines goes to the nucleus it is relatively nearest to, so overlapping nuclei
    share a border with no background between them.
    """
    reach = 1.3 * max(n.a for n in nuclei)  # the outline modulation stays within 1.3
    origin = np.floor(centres.min(0) - reach).astype(int) - 1
    label = np.zeros(tuple(np.ceil(centres.max(0) + reach).astype(int) + 2 - origin), np.int32)
    dist = np.full(label.shape, np.inf, np.float32)
    for i, (nucleus, c) in enumerate(zip(nuclei, centres - origin), start=1):
        lo, hi = np.floor(c - 1.3 * nucleus.a).astype(int), np.ceil(c + 1.3 * nucleus.a).astype(int) + 1
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
        dy, dx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1]]
        d = nucleus.distance(dy - c[0], dx - c[1])
        win = (d <= 1) & (d < dist[box])
        dist[box][win], label[box][win] = d[win], i
    return label, dist


def _valid_group(label: np.ndarray, m: int, min_area: float) -> bool:
    """Every nucleus is one 4-connected piece of at least ``min_area`` pixels, and the group is one 4-connected
    component (so each nucleus of a cluster shares an edge with another one, without background between)."""
    area = np.bincount(label.ravel(), minlength=m + 1)[1:]
    if area.size != m or area.min() < min_area:
        return False
    if ndi.label(label > 0)[1] != 1:
        return False
    return all(ndi.label(label[box] == i)[1] == 1 for i, box in enumerate(ndi.find_objects(label), start=1))


def _draw_group(rng, m: int, diameter, tries: int = 12) -> tuple[np.ndarray, np.ndarray] | None:
    """A cluster of ``m`` touching nuclei (``m = 1``: one nucleus), grown by attaching each new nucleus to a
    placed one so that their outlines overlap by 8-30 % of the gap between their centres; None if no valid
    cluster came out of ``tries`` attempts."""
    min_area = np.pi / 4 * (0.8 * diameter[0]) ** 2
    for _ in range(tries):
        nuclei, centres = [_draw_nucleus(rng, diameter)], [np.zeros(2)]
        while len(nuclei) < m:
            new, j = _draw_nucleus(rng, diameter), rng.integers(len(nuclei))
            angle = rng.uniform(0, 2 * np.pi)
            e = np.array([np.sin(angle), np.cos(angle)])
            c = centres[j] + rng.uniform(0.7, 0.92) * (nuclei[j].extent(e) + new.extent(-e)) * e
            r_new = np.sqrt(new.a * new.b)
            if all(np.hypot(*(c - ck)) >= 0.75 * (np.sqrt(n.a * n.b) + r_new) for n, ck in zip(nuclei, centres)):
                nuclei.append(new)
                centres.append(c)
        label, dist = _render_group(nuclei, np.array(centres))
        if _valid_group(label, m, min_area):
            return label, dist
    return None


def _cluster_sizes(rng, cluster_size) -> int:
    """Members of a cluster: smaller clusters are commoner (probability proportional to 1 / (m - 1))."""
    sizes = np.arange(cluster_size[0], cluster_size[1] + 1)
    weights = 1 / (sizes - 1)
    return int(rng.choice(sizes, p=weights / weights.sum()))


def _cells_labels(rng, shape, diameter, nuclei, clusters, cluster_size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance map ``1..K``, normalised distance map and each nucleus's group (1-based; 0 = background).

    Groups (clusters of touching nuclei, or single nuclei) are placed at random wholly inside the image and
    never touch one another: a background pixel separates them.
    """
    target = max(1, round(rng.integers(nuclei[0], nuclei[1] + 1) * shape[0] * shape[1] / 256**2))
    in_clusters = round(clusters * target)
    label = np.zeros(shape, np.int32)
    dist = np.full(shape, np.inf, np.float32)
    occupied = np.zeros(shape, bool)
    groups = [0]  # group of each nucleus id; 0 is the background
    placed = clustered = n_groups = 0
    for attempt in range(30 * target):
        if placed >= target:
            break
        # Clusters first (they need the room); if they stop fitting, single nuclei fill the rest.
        m = _cluster_sizes(rng, cluster_size) if clustered < in_clusters and attempt < 15 * target else 1
        group = _draw_group(rng, m, diameter)
        if group is None or any(s > t for s, t in zip(group[0].shape, shape)):
            continue
        g_label, g_dist = group
        mask = g_label > 0
        for _ in range(10):  # a few positions for each drawn group: drawing costs more than trying
            lo = [rng.integers(0, t - s + 1) for s, t in zip(g_label.shape, shape)]
            box = tuple(slice(o, o + s) for o, s in zip(lo, g_label.shape))
            if not (occupied[box] & mask).any():
                break
        else:
            continue
        label[box][mask] = g_label[mask] + placed
        dist[box][mask] = g_dist[mask]
        occupied[box] |= ndi.binary_dilation(mask, _GAP)
        n_groups += 1
        groups.extend([n_groups] * m)
        placed += m
        clustered += m if m > 1 else 0
    return label.astype(np.uint16), dist, np.array(groups, np.int32)


def _seams(label: np.ndarray) -> np.ndarray:
    """Pixels 4-adjacent to a different nucleus (where touching nuclei meet)."""
    seam = np.zeros(label.shape, bool)
    for axis in range(label.ndim):
        a, b = np.moveaxis(label, axis, 0)[:-1], np.moveaxis(label, axis, 0)[1:]
        diff = (a != b) & (a > 0) & (b > 0)
        np.moveaxis(seam, axis, 0)[:-1] |= diff
        np.moveaxis(seam, axis, 0)[1:] |= diff
    return seam


def _render_cells(rng, shape, diameter, nuclei, clusters, cluster_size):
    label, dist, groups = _cells_labels(rng, shape, diameter, nuclei, clusters, cluster_size)
    # Nuclei of one cluster have similar brightness (same cell type and stain uptake), so the intensity step
    # between neighbours rarely gives the border away; groups differ more.
    group_level = rng.uniform(0.3, 1.0, groups.max() + 1)
    brightness = group_level[groups] * rng.uniform(0.85, 1.15, groups.size)
    brightness[0] = 0
    dome = np.where(label > 0, 1 - rng.uniform(0.1, 0.3) * np.minimum(dist, 1) ** 2, 0)  # a brighter middle
    chromatin = 1 + 0.22 * grain(rng, shape, rng.uniform(0.8, 1.6))
    signal = (brightness[label] * dome * chromatin).astype(np.float32)
    signal[_seams(label)] *= rng.uniform(0.85, 1.0)  # touching nuclei meet at most at a faint dip
    signal += 0.05 + 0.02 * smooth_field(rng, shape, 8)  # autofluorescence of the cytoplasm
    bias = np.clip(1 + 0.25 * smooth_field(rng, shape, 1.5), 0.45, 1.6)  # uneven illumination
    signal = ndi.gaussian_filter(signal * bias, rng.uniform(0.8, 1.5))
    photons = rng.poisson(np.clip(signal, 0, None) * rng.uniform(150, 600))  # shot noise
    counts = 100 + 4 * photons + rng.normal(0, 6, shape)  # camera offset, gain, read noise
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16), label, None


def _check_cells(shape, diameter, nuclei, clusters, cluster_size) -> tuple[float, float]:
    lo, hi = float(diameter[0]), float(diameter[1])
    if not 2 <= lo <= hi or 2 * lo > min(shape):
        raise ConfigError("diameter", f"expected 2 <= min <= max, min <= {min(shape) / 2} px, received {diameter}")
    if not 1 <= nuclei[0] <= nuclei[1]:
        raise ConfigError("nuclei", f"expected 1 <= min <= max, received {nuclei}")
    if not 0 <= clusters <= 1:
        raise ConfigError("clusters", f"expected a fraction of the nuclei in [0, 1], received {clusters}")
    if len(cluster_size) != 2 or not 2 <= cluster_size[0] <= cluster_size[1] or int(cluster_size[0]) != \
            cluster_size[0] or int(cluster_size[1]) != cluster_size[1]:
        raise ConfigError("cluster_size", f"expected integers 2 <= min <= max, received {cluster_size}")
    return lo, hi


def make_cells(
    out,
    n: int = 8,
    size=(256, 256),
    seed: int = 0,
    n_test: int = 0,
    diameter=(10, 40),
    nuclei=(30, 80),
    clusters: float = 0.5,
    cluster_size=(2, 5),
) -> Path:
    """Write a synthetic fluorescence-nuclei dataset with instance labels.

    Irregular ellipses of varied size and elongation, isolated or in clusters of touching nuclei that share
    borders with no background between them (the case that merges instances), similar in brightness within a
    cluster and meeting at most at a faint intensity dip; uneven illumination, blur, shot and read noise.
    Images are 16-bit TIFFs; labels are uint16 TIFFs with 0 background and one id per nucleus, 1..K.

    Args:
        out: dataset folder (created).
        n: training cases. seed: dataset seed (>= 0).
        size: image ``x y`` (width, height) in pixels.
        n_test: held-out cases written to imagesTs/labelsTs.
        diameter: range of nucleus equivalent diameters in pixels.
        nuclei: range of nucleus counts per 256 x 256 pixels (scaled with the image area; fewer when they
            no longer fit).
        clusters: fraction of the nuclei placed in clusters of touching nuclei (0: all isolated).
        cluster_size: range of nuclei per cluster (smaller clusters are commoner).

    Returns:
        ``out`` as a Path.
    """
    shape = check_arguments(n, n_test, seed, size, 2)
    lo, hi = _check_cells(shape, diameter, nuclei, clusters, cluster_size)
    cluster_size = (int(cluster_size[0]), int(cluster_size[1]))
    meta = {
        "name": "cells",
        "description": "Synthetic fluorescence nuclei: isolated and in touching clusters, uneven illumination (medseg)",
        "tensorImageSize": "2D",
        "channel_names": {"0": "fluorescence"},
        "labels": {"background": 0, "cell": 1},
        "label_kind": "instance",
        "file_ending": ".tif",
        "clusters": float(clusters),
        "cluster_size": list(cluster_size),
    }
    return write_dataset(
        out,
        meta=meta,
        prefix="cells",
        n=n,
        n_test=n_test,
        seed=seed,
        render=lambda rng: _render_cells(rng, shape, (lo, hi), nuclei, clusters, cluster_size),
        write=write_tiff,
    )
