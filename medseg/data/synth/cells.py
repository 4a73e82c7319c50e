"""Synthetic fluorescence nuclei: touching, clustered instances under uneven illumination and camera noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

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


def _place_nuclei(rng, size, diameter, nuclei) -> tuple[np.ndarray, np.ndarray]:
    """Centres and nominal radii: clusters grown by attaching nuclei to placed ones, overlap limited."""
    h, w = size
    target = max(1, round(rng.integers(nuclei[0], nuclei[1] + 1) * h * w / 256**2))
    centres, radii = np.zeros((target, 2)), np.zeros(target)
    count = 0
    for _ in range(60 * target):
        if count == target:
            break
        r = np.exp(rng.uniform(np.log(diameter[0]), np.log(diameter[1]))) / 2
        angle = rng.uniform(0, 2 * np.pi)
        if count and rng.random() < 0.55:  # touch a placed nucleus: this is what makes clusters
            j = rng.integers(count)
            c = centres[j] + (radii[j] + r) * rng.uniform(0.8, 0.95) * np.array([np.sin(angle), np.cos(angle)])
        else:
            c = rng.uniform(0, 1, 2) * size
        reach = 1.75 * r  # longest semi-axis (aspect <= 1.8) times the largest outline bulge
        if not (reach <= c[0] < h - reach and reach <= c[1] < w - reach):
            continue
        if count and np.any(np.hypot(*(centres[:count] - c).T) < 0.78 * (radii[:count] + r)):
            continue
        centres[count], radii[count] = c, r
        count += 1
    return centres[:count], radii[:count]


def _cells_labels(rng, size, diameter, nuclei) -> tuple[np.ndarray, np.ndarray]:
    """Instance map (overlaps go to the nearer nucleus, so clusters share borders) and distance map."""
    centres, radii = _place_nuclei(rng, size, diameter, nuclei)
    label = np.zeros(size, np.int32)
    dist = np.full(size, np.inf, np.float32)
    for i, (c, r) in enumerate(zip(centres, radii), start=1):
        aspect = rng.uniform(1.0, 1.8)
        a, b, theta = r * np.sqrt(aspect), r / np.sqrt(aspect), rng.uniform(0, np.pi)
        factor = radial_factor(rng, 0.06)
        lo, hi = np.floor(c - 1.35 * a).astype(int), np.ceil(c + 1.35 * a).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, size)
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
        dy, dx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1]]
        d = blob_distance(dy - c[0], dx - c[1], a, b, theta, factor)
        win = (d <= 1) & (d < dist[box])
        dist[box][win] = d[win]
        label[box][win] = i
    # A nucleus carved by its neighbours keeps only its largest piece; heavily eaten ones are dropped.
    for i, box in enumerate(ndi.find_objects(label), start=1):
        if box is None:
            continue
        pieces, count = ndi.label(label[box] == i)
        if count > 1:
            largest = np.argmax(np.bincount(pieces.ravel())[1:]) + 1
            label[box][(pieces != largest) & (pieces > 0)] = 0
    area = np.bincount(label.ravel(), minlength=len(radii) + 1)
    small = np.flatnonzero(np.sqrt(4 * area / np.pi) < 0.8 * diameter[0])
    label[np.isin(label, small[small > 0])] = 0
    return relabel_sequential(label)[0].astype(np.uint16), dist


def _render_cells(rng, size, diameter, nuclei):
    label, dist = _cells_labels(rng, size, diameter, nuclei)
    k = int(label.max())
    fg = label > 0
    brightness = np.concatenate([[0.0], rng.uniform(0.3, 1.0, k)]).astype(np.float32)
    dome = np.where(fg, 1 - 0.35 * np.minimum(dist, 1) ** 2, 0)  # nuclei are brighter in the middle
    chromatin = 1 + 0.22 * grain(rng, size, rng.uniform(0.8, 1.6))
    signal = brightness[label] * dome * chromatin
    # Touching nuclei meet at a slightly dimmer seam: faint, so splitting them stays the hard part.
    seam = np.zeros(size, bool)
    for axis in (0, 1):
        a, b = np.moveaxis(label, axis, 0)[:-1], np.moveaxis(label, axis, 0)[1:]
        diff = (a != b) & (a > 0) & (b > 0)
        np.moveaxis(seam, axis, 0)[:-1] |= diff
        np.moveaxis(seam, axis, 0)[1:] |= diff
    signal[seam] *= 0.8
    signal += 0.05 + 0.02 * smooth_field(rng, size, 8)  # autofluorescence of the cytoplasm
    bias = np.clip(1 + 0.25 * smooth_field(rng, size, 1.5), 0.45, 1.6)  # uneven illumination
    signal = ndi.gaussian_filter(signal * bias, rng.uniform(0.8, 1.5))
    photons = rng.poisson(np.clip(signal, 0, None) * rng.uniform(150, 600))  # shot noise
    counts = 100 + 4 * photons + rng.normal(0, 6, size)  # camera offset, gain, read noise
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16), label, None


def make_cells(
    out, n: int = 8, size=(256, 256), seed: int = 0, n_test: int = 0, diameter=(10, 40), nuclei=(30, 80)
) -> Path:
    """Write a synthetic fluorescence-nuclei dataset with instance labels.

    Clusters of touching nuclei (irregular ellipses sharing borders) under uneven illumination,
    blur, shot and read noise, as 16-bit TIFFs; labels are uint16 TIFFs with 0 background and
    one id per nucleus, 1..K.

    Args:
        out: dataset folder (created).
        n: training cases. seed: dataset seed (>= 0).
        size: image ``x y`` (width, height) in pixels.
        n_test: held-out cases written to imagesTs/labelsTs.
        diameter: range of nucleus equivalent diameters in pixels.
        nuclei: range of nucleus counts per 256 x 256 pixels (scaled with the image area).

    Returns:
        ``out`` as a Path.
    """
    shape = check_arguments(n, n_test, seed, size, 2)
    lo, hi = float(diameter[0]), float(diameter[1])
    if not 2 <= lo <= hi or 2 * lo > min(shape):
        raise ConfigError("diameter", f"expected 2 <= min <= max, min <= {min(shape) / 2} px, received {diameter}")
    if not 1 <= nuclei[0] <= nuclei[1]:
        raise ConfigError("nuclei", f"expected 1 <= min <= max, received {nuclei}")
    meta = {
        "name": "cells",
        "description": "Synthetic fluorescence nuclei: touching, clustered, uneven illumination (medseg)",
        "tensorImageSize": "2D",
        "channel_names": {"0": "fluorescence"},
        "labels": {"background": 0, "cell": 1},
        "label_kind": "instance",
        "file_ending": ".tif",
    }
    return write_dataset(
        out,
        meta=meta,
        prefix="cells",
        n=n,
        n_test=n_test,
        seed=seed,
        render=lambda rng: _render_cells(rng, shape, (lo, hi), nuclei),
        write=write_tiff,
    )
