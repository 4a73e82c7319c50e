"""The U-Net border weight map (Ronneberger et al. 2015): class balance plus a separation term between objects.

``w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``; the separation term is computed exactly where it is
above a tolerance by one separable sweep (cost grows with pixels x reach, not pixels x objects). Arrays are
channel-free (``H W [D]``); :class:`medseg.transforms.array.BorderWeightMap` wraps them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from medseg.transforms.functional import as_label_array

# The border term is dropped where it is below this; the fast weight map equals the exact one within it.
BORDER_TOL = 1e-6


def border_cutoff(w0: float, sigma: float, tol: float = BORDER_TOL) -> float:
    """Distance sum ``d1 + d2`` beyond which ``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` is below ``tol``."""
    if w0 <= tol:
        return 0.0
    return sigma * math.sqrt(2.0 * math.log(w0 / tol))


def border_term(
    instance,
    w0: float = 10.0,
    sigma: float = 5.0,
    spacing: Sequence[float] | None = None,
    tol: float = BORDER_TOL,
) -> np.ndarray:
    """The U-Net separation term ``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` of Ronneberger et al. (2015).

    ``d1``/``d2`` are the distances from a pixel to the nearest and second-nearest object (an object is
    all pixels of one instance id; the distance to it is the Euclidean distance to its nearest pixel, as
    ``scipy.ndimage.distance_transform_edt(instance != id)``). The term lives on background pixels only;
    it is 0 on object pixels, and everywhere when there are fewer than two objects.

    Exact but local: the term is below ``tol`` once ``d1 + d2 >= border_cutoff(w0, sigma, tol)`` (the
    "reach"), so distances only have to be exact below it. One separable sweep over the image finds,
    per pixel, the nearest object and the nearest *other* object (:func:`_two_nearest`); the cost grows
    with pixels x reach, not with pixels x objects. The result differs from the full computation by at
    most ``tol``.

    Args:
        instance: instance ids, ``H W [D]``, 0 = background; any non-negative integer ids.
        w0: weight of the separation term.
        sigma: width of the term, in the units of ``spacing`` (pixels when ``spacing`` is None).
        spacing: physical size of a pixel along each axis, or None for pixel units.
        tol: terms below this are set to 0.

    Returns:
        float32 array ``H W [D]``.
    """
    inst = as_label_array(instance)
    term = np.zeros(inst.shape, np.float32)
    reach = border_cutoff(w0, sigma, tol)
    sampling = np.ones(inst.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    if sampling.shape != (inst.ndim,) or np.any(sampling <= 0):
        raise ValueError(f"spacing must hold {inst.ndim} positive numbers, got {spacing}")
    colours = None if reach == 0.0 else _colour_objects(inst, sampling, reach)
    if colours is None:
        return term
    total = _distance_sum(colours, sampling, reach)
    # w0 * exp(-total^2 / (2 sigma^2)) on background pixels closer than reach, 0 elsewhere
    np.multiply(total, total, out=term)
    term *= -1.0 / (2.0 * sigma**2)
    np.exp(term, out=term)
    term *= w0 * ((inst == 0) & (total < reach))
    return term


# Large images go through in bands of about this many pixels (plus overlap), so the working arrays
# stay in cache and the cost grows linearly with the image size.
_BAND_PIXELS = 2**19


def _distance_sum(colours: np.ndarray, sampling: np.ndarray, reach: float) -> np.ndarray:
    """``d1 + d2`` (float32) of every pixel, see :func:`_two_nearest`; in bands along the first axis.

    A pixel's result depends on pixels less than ``reach`` away only, so bands overlapping by that
    much give exactly the whole-image result.
    """
    rows = colours.shape[0]
    band = max(_BAND_PIXELS * rows // max(colours.size, 1), 1)
    overlap = int(math.ceil(reach / sampling[0])) + 1
    if band >= rows or band < 4 * overlap:
        band = rows
    total = np.empty(colours.shape, np.float32)
    for start in range(0, rows, band):
        lo, stop, hi = max(start - overlap, 0), min(start + band, rows), min(start + band + overlap, rows)
        keys, nearest, other = _two_nearest(colours[lo:hi], sampling, reach)
        part = keys.distance(nearest)
        part += keys.distance(other)
        total[start:stop] = part[start - lo : stop - lo]
    return total


def _colour_objects(inst: np.ndarray, sampling: np.ndarray, reach: float) -> np.ndarray | None:
    """Recolours objects so that any two closer than ``reach`` get different colours (1, 2, ...).

    Where the term matters its two objects are closer than ``reach`` (``dist(o1, o2) <= d1 + d2``), so
    "nearest other colour" is "nearest other object" there, and a few colours pack into few bits, which
    makes the sweep's integer keys small (uint16 for the usual sigma). Closeness is judged from bounding
    boxes (never farther apart than their objects); colours are given greedily. None when there are
    fewer than two objects.
    """
    if inst.max() > 4 * inst.size + 1024:  # find_objects makes one entry per possible id
        ids, inverse = np.unique(inst, return_inverse=True)
        inst = inverse.reshape(inst.shape) + (ids[0] != 0)
    found = [(k + 1, box) for k, box in enumerate(ndi.find_objects(inst)) if box is not None]
    if len(found) < 2:
        return None
    lows = np.array([[s.start for s in box] for _, box in found], dtype=float) * sampling
    highs = np.array([[s.stop - 1 for s in box] for _, box in found], dtype=float) * sampling
    # candidate pairs from box centres, then the exact box-gap test on those only
    half = (highs - lows) / 2
    radius = reach + 2 * float(np.sqrt((half**2).sum(1)).max())
    i, j = cKDTree(lows + half).query_pairs(radius, output_type="ndarray").T
    gap = np.maximum(0.0, np.maximum(lows[j] - highs[i], lows[i] - highs[j]))
    keep = (gap**2).sum(1) < reach**2
    i, j = i[keep], j[keep]
    neighbours: list[list[int]] = [[] for _ in found]
    for a, b in zip(np.concatenate([i, j]).tolist(), np.concatenate([j, i]).tolist()):
        neighbours[a].append(b)
    colour = [0] * len(found)
    for a, near in enumerate(neighbours):
        taken = {colour[b] for b in near}
        colour[a] = next(c for c in range(1, len(near) + 2) if c not in taken)
    lut = np.zeros(int(inst.max()) + 1, np.uint8 if max(colour) < 255 else np.int64)
    lut[[label for label, _ in found]] = colour
    return np.take(lut, inst)


class _Keys:
    """Packs (squared distance, colour) into one integer key, ``squared_distance << bits | colour``.

    Comparing keys compares distances first, so running minima of keys carry the colour along with
    plain integer add/minimum, which numpy runs far faster than masked selects. Squared distances count
    ``unit``: pixel**2 for isotropic spacing (exact integers), else a fine fraction of the smallest
    pixel**2, capped at ``cap`` (the reach squared). Stored keys stay at most ``(cap + 1) << bits`` and a
    key plus one shift step stays representable, which picks the narrowest integer type (uint16 when
    it fits, with wrap-around only in differences that are added back).
    """

    def __init__(self, colours: int, sampling: np.ndarray, reach: float):
        self.bits = (colours + 1).bit_length()  # so the colour mask exceeds every colour
        self.mask = (1 << self.bits) - 1
        if np.allclose(sampling, sampling[0]):
            self.unit = float(sampling[0] ** 2)
        else:  # as fine as 62 bits allow, at most 2**-32 pixel**2: distances move by < 1e-6 pixel
            spare = 61 - self.bits - math.ceil(math.log2((reach / sampling.min()) ** 2 + 2))
            if spare < 12:
                raise ValueError(f"too many colours ({colours}) for this sigma and spacing")
            self.unit = float(sampling.min() ** 2 / 2 ** min(spare, 32))
        self.cap = int(math.ceil(reach**2 / self.unit)) + 1
        top = (self.cap + 1) << self.bits
        fitting = [t for t, limit in ((np.uint16, 2**15), (np.int32, 2**30), (np.int64, 2**62)) if top < limit]
        if not fitting:
            raise ValueError(f"sigma is too large for the image's pixel size (reach {reach})")
        self.dtype = fitting[0]

    def step(self, k: int, pixel: float):
        """Key increment of ``k`` pixels of size ``pixel``."""
        return self.dtype(int(round(k * k * pixel * pixel / self.unit)) << self.bits)

    def distance(self, keys: np.ndarray) -> np.ndarray:
        """Distances (float32, physical units) of keys; at the cap (nothing within reach) >= reach."""
        sq = (keys >> self.bits).astype(np.float32)
        sq *= self.unit
        return np.sqrt(sq, out=sq)


def _two_nearest(colours: np.ndarray, sampling: np.ndarray, reach: float):
    """Keys of the nearest object and of the nearest one of another colour, exact below ``reach``.

    Separable, like an exact Euclidean distance transform, but each pixel carries two keys (distance,
    colour): the nearest colour and the nearest other colour. Two per intermediate pixel suffice: a
    third colour there is beaten, at every pixel it can reach, by the two kept. Each axis takes the
    minimum over shifts up to ``reach`` (a pixel closer than that is that close along every axis).
    Only background pixels count, so ``d1`` is at least the smallest pixel size and ``d2 < reach`` -
    that; on the last pass ``d1`` itself only matters below ``reach / 2``. Values beyond those limits
    may be too large, never too small, so the term from them stays below the tolerance.

    Args:
        colours: ids ``*spatial`` from :func:`_colour_objects`, 0 = background.
        sampling: pixel size per axis.
        reach: the cut-off distance ``d1 + d2``.

    Returns:
        (keys, nearest, other): the key packing (:class:`_Keys`) and two key arrays ``*spatial``.
    """
    keys = _Keys(int(colours.max()), sampling, reach)
    nd = colours.ndim
    # Shifts along the first axis move whole contiguous blocks, the fastest kind, so the last axis
    # (strided shifts) is moved to the front for its pass, and back afterwards.
    colour_keys = np.ascontiguousarray(np.moveaxis(colours, -1, 0)).astype(keys.dtype)
    out_of_reach = keys.dtype(keys.cap << keys.bits)  # the key of "no object within reach"
    nearest = colour_keys + out_of_reach * (colour_keys == 0)
    other = np.full_like(nearest, out_of_reach)
    for i, axis in enumerate([nd - 1, *range(nd - 2, -1, -1)]):
        if i == 1:
            nearest, other = (np.ascontiguousarray(np.moveaxis(a, 0, -1)) for a in (nearest, other))
        step = float(sampling[axis])
        reach_other = (reach - sampling.min()) / step
        reach_near = reach / 2 / step if i == nd - 1 else reach_other
        nearest, other = _shift_pass(nearest, other, keys, 0 if i == 0 else axis, step, reach_near, reach_other)
    if nd == 1:
        nearest, other = (np.moveaxis(a, 0, -1) for a in (nearest, other))
    return keys, nearest, other


def _shift_views(ndim: int, axis: int, k: int):
    """(target, source) index pairs for neighbours ``k`` steps ahead and behind along ``axis``."""

    def along(start, stop):
        index = [slice(None)] * ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    return ((along(0, -k), along(k, None)), (along(k, None), along(0, -k)))


def _shift_pass(nearest, other, keys: _Keys, axis: int, step: float, reach_near: float, reach_other: float):
    """Extends (nearest, nearest other) keys by one more axis: minima over shifts along ``axis`` up to
    ``reach_near`` / ``reach_other`` pixels."""
    n = nearest.shape[axis]
    near_out = nearest.copy()
    moved = np.empty_like(nearest)
    buf = np.empty_like(nearest)
    for k in range(1, min(int(reach_near), n - 1) + 1):
        np.add(nearest, keys.step(k, step), out=moved)
        for dst, src in _shift_views(nearest.ndim, axis, k):
            np.minimum(near_out[dst], moved[src], out=near_out[dst])
    # Nearest other colour: from each neighbour its nearest key, unless that has the colour found
    # nearest here, else its other key, i.e. nearest + (other - nearest) * same.
    ids = nearest & keys.mask
    ids_out = near_out & keys.mask
    gap = other - nearest
    same = np.empty(nearest.shape, bool)
    other_out = nearest + gap * (ids == ids_out)
    for k in range(1, min(int(reach_other), n - 1) + 1):
        np.add(nearest, keys.step(k, step), out=moved)
        for dst, src in _shift_views(nearest.ndim, axis, k):
            np.equal(ids[src], ids_out[dst], out=same[dst])
            np.multiply(gap[src], same[dst], out=buf[dst])
            buf[dst] += moved[src]
            np.minimum(other_out[dst], buf[dst], out=other_out[dst])
    return near_out, other_out


def class_balance_map(classes) -> np.ndarray:
    """``w_c(x) = N / (K * n_c(x))``: inverse class frequency over the map, mean weight 1.

    ``N`` is the number of pixels, ``K`` the number of classes present and ``n_c`` the pixel count of
    the class at ``x``, so every present class carries the same total weight ``N / K``.

    Args:
        classes: class ids ``H W [D]`` (non-negative integers).

    Returns:
        float32 array of the same shape.
    """
    cls = as_label_array(classes, "class map")
    if cls.size == 0:
        return np.zeros(cls.shape, np.float32)
    counts = np.bincount(cls.ravel())
    present = counts > 0
    per_class = np.zeros(counts.shape, np.float64)
    per_class[present] = cls.size / (present.sum() * counts[present])
    return per_class[cls].astype(np.float32)


def border_weight_map(
    instance,
    w0: float = 10.0,
    sigma: float = 5.0,
    spacing: Sequence[float] | None = None,
    classes=None,
    class_balance: bool = True,
    tol: float = BORDER_TOL,
) -> np.ndarray:
    """``w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` (Ronneberger et al. 2015), float32.

    Args:
        instance: instance ids ``H W [D]``.
        w0, sigma, spacing, tol: see :func:`border_term`.
        classes: class map for ``w_c`` (e.g. the semantic target with a border class); None uses
            foreground/background of ``instance``.
        class_balance: False sets ``w_c = 1``.
    """
    inst = as_label_array(instance)
    if class_balance:
        wc = class_balance_map((inst > 0) if classes is None else classes)
        if wc.shape != inst.shape:
            raise ValueError(f"class map shape {wc.shape} does not match instance map shape {inst.shape}")
    else:
        wc = np.ones(inst.shape, np.float32)
    return wc + border_term(inst, w0=w0, sigma=sigma, spacing=spacing, tol=tol)
