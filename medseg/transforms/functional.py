"""Pure operations behind the transforms: border weight map, label conversion, warps and colour.

Arrays are channel-free here (``H W [D]`` for label maps, ``nd H W [D]`` for sampling coordinates);
the channel-first wrappers live in :mod:`medseg.transforms.array`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

# The border term is dropped where it is below this; the fast weight map equals the exact one within it.
BORDER_TOL = 1e-6


# ---------------------------------------------------------------------------------------------- label maps
def as_label_array(labels, name: str = "instance map") -> np.ndarray:
    """Integer numpy copy of a label map (no channel); float maps must hold whole, non-negative numbers."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold whole numbers (label ids), got non-integer values")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer or float array, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative (0 = background), got minimum {arr.min()}")
    return arr


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
    col = np.ascontiguousarray(np.moveaxis(colours, -1, 0)).astype(keys.dtype)
    none = keys.dtype(keys.cap << keys.bits)
    nearest = col + none * (col == 0)
    other = np.full_like(nearest, none)
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


def instances_to_semantic(instance, mode: str = "cell_border", border_width: int = 1) -> np.ndarray:
    """Semantic target from instance ids, uint8.

    Args:
        instance: instance ids ``H W [D]``.
        mode: ``"foreground"``: 0 background, 1 object. ``"cell_border"``: 0 background, 1 cell interior,
            2 border = object pixels within ``border_width`` steps (face neighbours) of a pixel with another
            id, background included; touching cells thus get separated interiors. The image edge is not
            a border.
        border_width: border thickness in pixels.
    """
    inst = as_label_array(instance)
    if mode == "foreground":
        return (inst > 0).astype(np.uint8)
    if mode != "cell_border":
        raise ValueError(f"mode must be 'cell_border' or 'foreground', got {mode!r}")
    if border_width < 1:
        raise ValueError(f"border_width must be >= 1, got {border_width}")
    cross = ndi.generate_binary_structure(inst.ndim, 1)
    hi, lo = inst, inst
    for _ in range(border_width):
        hi = ndi.maximum_filter(hi, footprint=cross, mode="nearest")
        lo = ndi.minimum_filter(lo, footprint=cross, mode="nearest")
    out = (inst > 0).astype(np.uint8)
    out[(inst > 0) & ((hi != inst) | (lo != inst))] = 2
    return out


# -------------------------------------------------------------------------------------------------- warps
def identity_coords(shape: Sequence[int], device=None) -> torch.Tensor:
    """Pixel coordinates ``nd H W [D]`` (float32) of a grid of ``shape``."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def upsample_field(field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Cubic upsampling of a coarse field ``C h w [d]`` to ``C *shape``; the corners stay aligned.

    3D uses bicubic over (H, W) and then over (W, D) with W unchanged (an exact identity there), i.e.
    separable cubic interpolation, which torch lacks as a single call.
    """
    shape = tuple(int(s) for s in shape)
    if field.ndim == 3:
        return F.interpolate(field[None], size=shape, mode="bicubic", align_corners=True)[0]
    c, h, w, d = field.shape
    big_h, big_w, big_d = shape
    x = field.permute(0, 3, 1, 2).reshape(1, c * d, h, w)
    x = F.interpolate(x, size=(big_h, big_w), mode="bicubic", align_corners=True)
    x = x.reshape(c, d, big_h, big_w).permute(0, 2, 3, 1).reshape(1, c * big_h, big_w, d)
    x = F.interpolate(x, size=(big_w, big_d), mode="bicubic", align_corners=True)
    return x.reshape(c, big_h, big_w, big_d)


def elastic_coords(shape: Sequence[int], control: torch.Tensor) -> torch.Tensor:
    """Sampling coordinates ``nd *shape``: identity plus a displacement (pixels) interpolated from
    ``control`` (``nd *control_grid``), whose corners sit on the image corners."""
    return identity_coords(shape, control.device) + upsample_field(control, shape)


def optical_coords(shape: Sequence[int], k: float, center: Sequence[float]) -> torch.Tensor:
    """Sampling coordinates of a radial (barrel/pincushion) distortion, ``nd *shape``.

    An output pixel ``p`` samples ``c + (p - c) * (1 + k * r^2)`` with ``r = |p - c| / R``, ``c`` the
    centre (pixels) and ``R`` half the largest extent. ``k > 0``: barrel (the border is squeezed in),
    ``k < 0``: pincushion.
    """
    coords = identity_coords(shape)
    c = torch.as_tensor(center, dtype=torch.float32).reshape(-1, *([1] * len(shape)))
    radius = max(max((n - 1) / 2.0 for n in shape), 1.0)
    rel = coords - c
    r2 = (rel / radius).pow(2).sum(0, keepdim=True)
    return c + rel * (1.0 + k * r2)


def warp(img: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "reflection"):
    """Sample a channel-first image ``C *spatial`` at pixel coordinates ``nd *spatial``.

    ``padding_mode="reflection"`` mirrors about the edge pixels, so image and labels get the same context.
    Non-float inputs come back in their dtype (use ``mode="nearest"`` for them).
    """
    shape = img.shape[1:]
    coords = coords.to(img.device)
    norm = [coords[a] * (2.0 / (n - 1)) - 1.0 if n > 1 else torch.zeros_like(coords[a]) for a, n in enumerate(shape)]
    grid = torch.stack(norm[::-1], dim=-1)[None]  # grid_sample wants (x, y[, z]) = reversed axes
    src = torch.as_tensor(img)
    out = F.grid_sample(
        src.float()[None].as_subclass(torch.Tensor), grid, mode=mode, padding_mode=padding_mode, align_corners=True
    )[0]
    if not src.dtype.is_floating_point:
        out = out.round().to(src.dtype)
    elif out.dtype != src.dtype:
        out = out.to(src.dtype)
    return out


# ------------------------------------------------------------------------------------------------- colour
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def color_jitter(
    img: torch.Tensor, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0, hue: float = 0.0
) -> torch.Tensor:
    """Brightness, contrast, saturation and hue changes of an image ``C *spatial``, in that order.

    Factors of 1 (hue 0) change nothing. Brightness multiplies; contrast scales about the mean grey
    level; saturation blends with the grey image (luma); hue rotates the chroma plane of YIQ by
    ``hue`` turns (a linear stand-in for an HSV hue shift). Saturation and hue need 3 channels (RGB) and
    are skipped for other channel counts. Values are not clipped.
    """
    out = img.float() * brightness if brightness != 1.0 else img.float()
    rgb = out.shape[0] == 3
    weights = _RGB_TO_YIQ[0].to(out.device).reshape(3, *([1] * (out.ndim - 1))) if rgb else None
    if contrast != 1.0:
        mean = (out * weights).sum(0).mean() if rgb else out.mean()
        out = mean + (out - mean) * contrast
    if rgb and saturation != 1.0:
        grey = (out * weights).sum(0, keepdim=True)
        out = grey + (out - grey) * saturation
    if rgb and hue != 0.0:
        t = _RGB_TO_YIQ.to(out.device)
        cos, sin = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
        rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], device=out.device)
        matrix = torch.linalg.inv(t) @ rot @ t
        out = torch.einsum("ij,j...->i...", matrix, out)
    return out.to(img.dtype) if img.dtype.is_floating_point else out
