"""Synthetic datasets for demos and tests: fluorescence nuclei (instances) and lesions (2D and 3D).

Nothing is downloaded. Each generator writes an MSD / nnU-Net style folder::

    out/dataset.json  out/preview.png
    out/imagesTr/<case>_0000<ext>   out/labelsTr/<case><ext>
    out/imagesTs/<case>_0000<ext>   out/labelsTs/<case><ext>     (only when n_test > 0)

Every case draws from its own generator seeded by ``(seed, split, index)``, so a call is
deterministic, ``n=4`` writes exactly the first four cases of ``n=8``, and the held-out cases do
not depend on ``n``. Rendering is vectorised numpy/scipy; loops run over objects, never pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation
from scipy.special import expit
from skimage.draw import bezier_curve
from skimage.segmentation import relabel_sequential

from medseg.errors import ConfigError
from medseg.visualize import middle_slice, overlay_montage

__all__ = ["make_cells", "make_lesions"]

_GENERATOR = "medseg.data.synth"
_PREVIEW_CASES = 6
_SKIN_LIGHT, _SKIN_TAN = np.array([236, 198, 176]) / 255, np.array([186, 132, 102]) / 255
_PIGMENTS = np.array([[150, 100, 62], [96, 58, 36], [52, 34, 28], [98, 100, 124], [160, 86, 74]]) / 255


# ----------------------------------------------------------------------------------------- shared
def _case_rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], cells) -> np.ndarray:
    """Zero-mean, unit-std random field varying over about ``cells`` periods per axis (``shape``).

    White noise on a coarse grid, spread by a separable Gaussian kernel: one small matrix product
    per axis, much faster than spline zooming in 3D.
    """
    field = rng.standard_normal(tuple(max(2, round(c)) + 3 for c in np.broadcast_to(cells, len(shape))))
    field = field.astype(np.float32)
    for axis, (n_out, n_in) in enumerate(zip(shape, field.shape)):
        x = np.linspace(1, n_in - 2, n_out)  # the outer coarse nodes only pad the edges
        weights = np.exp(-0.5 * ((x[:, None] - np.arange(n_in)[None]) / 0.7) ** 2).astype(np.float32)
        field = np.moveaxis(np.tensordot(weights, field, axes=([1], [axis])), 0, axis)
    return (field - field.mean()) / (field.std() + 1e-8)


def _grain(rng: np.random.Generator, shape: tuple[int, ...], sigma) -> np.ndarray:
    """Zero-mean, unit-std fine texture: white noise blurred by ``sigma`` pixels."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def _radial_factor(rng: np.random.Generator, strength: float, harmonics: int = 12) -> Callable:
    """Random boundary modulation ``f(angle)`` of a star-shaped blob (irregular, noisy outline)."""
    k = np.arange(2, harmonics + 1)
    amp = rng.normal(0.0, strength, k.size) / k**0.7  # low harmonics shape the blob, high ones roughen it
    phase = rng.uniform(0, 2 * np.pi, k.size)

    def factor(angle: np.ndarray) -> np.ndarray:
        return np.clip(1 + np.cos(k * angle[..., None] + phase) @ amp, 0.7, 1.3)

    return factor


def _blob_distance(dy, dx, a, b, theta, factor) -> np.ndarray:
    """Normalised distance of offsets (dy, dx) to an irregular ellipse: <= 1 inside, 1 on the border."""
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return np.hypot(u / a, v / b) / factor(np.arctan2(v / b, u / a))


def _check(n: int, n_test: int, seed: int, size, ndim: int) -> tuple[int, ...]:
    if not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError("n", f"expected an integer >= 1, received {n!r}")
    if not isinstance(n_test, int | np.integer) or n_test < 0:
        raise ConfigError("n_test", f"expected an integer >= 0, received {n_test!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError("seed", f"expected an integer >= 0, received {seed!r}")
    size = tuple(int(s) for s in size)
    if len(size) != ndim or min(size) < 8:
        raise ConfigError("size", f"expected {ndim} sizes of at least 8, received {size}")
    return size


def _write_dataset(
    out,
    *,
    meta: dict,
    prefix: str,
    n: int,
    n_test: int,
    seed: int,
    render: Callable,
    write: Callable,
    panel: Callable,
    instance: bool,
) -> Path:
    """Render and write every case, then dataset.json and preview.png; returns the folder."""
    out = Path(out)
    ending = meta["file_ending"]
    lists: dict[str, list] = {"training": [], "test": []}
    shown: list[tuple] = []
    for split, (key, tag, count) in enumerate((("training", "Tr", n), ("test", "Ts", n_test))):
        for i in range(count):
            case = f"{prefix}_{i:03d}" if split == 0 else f"{prefix}_test_{i:03d}"
            image, label, geometry = render(_case_rng(seed, split, i))
            entry = {"image": f"images{tag}/{case}_0000{ending}", "label": f"labels{tag}/{case}{ending}"}
            write(out / entry["image"], image, geometry)
            write(out / entry["label"], label, geometry)
            lists[key].append(entry)
            if split == 0 and len(shown) < _PREVIEW_CASES:
                shown.append((case, *panel(image, label)))
    _remove_stale(out, lists)
    dataset = {**meta, "numTraining": n, "numTest": n_test, "generator": _GENERATOR, "seed": int(seed), **lists}
    tmp = out / ".dataset.json.tmp"
    tmp.write_text(json.dumps(dataset, indent=2) + "\n")
    os.replace(tmp, out / "dataset.json")
    names, images, labels = zip(*shown)
    overlay_montage(list(images), list(labels), out / "preview.png", titles=list(names), ncols=3, instance=instance)
    return out


def _remove_stale(out: Path, lists: dict) -> None:
    """Delete cases an earlier run of this generator listed but this run did not write."""
    old = out / "dataset.json"
    try:
        previous = json.loads(old.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(previous, dict) or previous.get("generator") != _GENERATOR:
        return  # never delete files this module did not write
    keep = {p for entries in lists.values() for e in entries for p in e.values()}
    for entries in (previous.get("training", []), previous.get("test", [])):
        for entry in entries:
            for rel in entry.values():
                if rel not in keep and ".." not in Path(rel).parts:
                    (out / rel).unlink(missing_ok=True)


def _write_tiff(path: Path, array: np.ndarray, _geometry=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, photometric="minisblack")


def _write_png(path: Path, array: np.ndarray, _geometry=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """``D H W`` array -> NIfTI stored as (i, j, k) = (W, H, D), slices along k as scanners write them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)


# ------------------------------------------------------------------------------------------ cells
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
        factor = _radial_factor(rng, 0.06)
        lo, hi = np.floor(c - 1.35 * a).astype(int), np.ceil(c + 1.35 * a).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, size)
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
        dy, dx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1]]
        d = _blob_distance(dy - c[0], dx - c[1], a, b, theta, factor)
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
    chromatin = 1 + 0.22 * _grain(rng, size, rng.uniform(0.8, 1.6))
    signal = brightness[label] * dome * chromatin
    # Touching nuclei meet at a slightly dimmer seam: faint, so splitting them stays the hard part.
    seam = np.zeros(size, bool)
    for axis in (0, 1):
        a, b = np.moveaxis(label, axis, 0)[:-1], np.moveaxis(label, axis, 0)[1:]
        diff = (a != b) & (a > 0) & (b > 0)
        np.moveaxis(seam, axis, 0)[:-1] |= diff
        np.moveaxis(seam, axis, 0)[1:] |= diff
    signal[seam] *= 0.8
    signal += 0.05 + 0.02 * _smooth(rng, size, 8)  # autofluorescence of the cytoplasm
    bias = np.clip(1 + 0.25 * _smooth(rng, size, 1.5), 0.45, 1.6)  # uneven illumination
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
        n: training cases. size: image ``H W``. seed: dataset seed (>= 0).
        n_test: held-out cases written to imagesTs/labelsTs.
        diameter: range of nucleus equivalent diameters in pixels.
        nuclei: range of nucleus counts per 256 x 256 pixels (scaled with the image area).

    Returns:
        ``out`` as a Path.
    """
    size = _check(n, n_test, seed, size, 2)
    lo, hi = float(diameter[0]), float(diameter[1])
    if not 2 <= lo <= hi or 2 * lo > min(size):
        raise ConfigError("diameter", f"expected 2 <= min <= max, min <= {min(size) / 2} px, received {diameter}")
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
    return _write_dataset(
        out,
        meta=meta,
        prefix="cells",
        n=n,
        n_test=n_test,
        seed=seed,
        render=lambda rng: _render_cells(rng, size, (lo, hi), nuclei),
        write=_write_tiff,
        panel=lambda im, lab: (im, lab),
        instance=True,
    )


# ---------------------------------------------------------------------------------------- lesions
def _separated(centre, reach, placed, margin) -> bool:
    return all(np.linalg.norm(centre - c) > reach + r + margin for c, r in placed)


def _lesion_radius_range(extent: np.ndarray, spacing: np.ndarray) -> tuple[float, float]:
    """Lesion radii (mm) that fit the volume with a margin: 4-12 mm, less in small volumes."""
    fits = float(np.min(extent / 2 - spacing)) / (1.35 * 1.25) - 0.01
    return min(4.0, 0.5 * fits), min(12.0, fits)


def _render_volume(rng, size, spacing):
    """CT-like ``D H W`` volume in HU (int16), lesion mask (uint8) and a rotated, shifted affine."""
    spacing = np.asarray(spacing, float)
    extent = np.asarray(size) * spacing  # mm
    zz, yy, xx = np.meshgrid(*(np.arange(s) * sp for s, sp in zip(size, spacing)), indexing="ij", sparse=True)
    grid = (zz, yy, xx)
    # Background: fat and muscle mixed by a smooth field; an organ with parenchyma texture and vessels.
    muscle = expit(3 * _smooth(rng, size, extent / 30))
    hu = -95 + 145 * muscle + 8 * _smooth(rng, size, extent / 10)
    centre = extent * rng.uniform(0.35, 0.65, 3)
    radii = extent * rng.uniform(0.55, 0.9, 3)
    organ_d = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)))
    organ_d = organ_d / (1 + 0.12 * _smooth(rng, size, extent / 25))
    organ = expit((1 - organ_d) * 25)
    parenchyma = rng.uniform(45, 70) + 6 * _smooth(rng, size, extent / 6)
    # Vessels: where two smooth fields are both near zero, i.e. along curves (tubes), not sheets.
    vessels = np.exp(-(_smooth(rng, size, extent / 14) ** 2 + _smooth(rng, size, extent / 14) ** 2) / 0.06)
    parenchyma += rng.choice([-1, 1]) * rng.uniform(40, 90) * vessels
    hu = hu * (1 - organ) + parenchyma * organ
    # Lesions: irregular ellipsoids inside the organ, kept apart so each is its own component.
    label = np.zeros(size, np.uint8)
    lobes = _smooth(rng, size, extent / 6)
    placed: list[tuple[np.ndarray, float]] = []
    wanted = rng.integers(1, 4)
    for attempt in range(100):
        if len(placed) == wanted:
            break
        axes_mm = rng.uniform(*_lesion_radius_range(extent, spacing)) * rng.uniform(0.75, 1.25, 3)
        reach = 1.35 * axes_mm.max()
        c = rng.uniform(reach + spacing, extent - reach - spacing)
        in_organ = organ_d[tuple(np.minimum((c / spacing).astype(int), np.array(size) - 1))] <= 0.9
        if not in_organ and attempt < 50:  # late on, a lesion anywhere beats no lesion
            continue
        if not _separated(c, reach, placed, 4.0):  # 4 mm gap > one voxel diagonal (2.75 mm)
            continue
        rot = Rotation.random(random_state=rng).as_matrix()
        local = sum(rot[k][:, None, None, None] * (g - ck) for k, (g, ck) in enumerate(zip(grid, c)))
        d = np.sqrt(((local / axes_mm[:, None, None, None]) ** 2).sum(0)) / np.clip(1 + 0.2 * lobes, 0.7, 1.3)
        mask, count = ndi.label(d < 1, structure=np.ones((3, 3, 3)))
        if count == 0:
            continue
        mask = mask == np.argmax(np.bincount(mask.ravel())[1:]) + 1
        width = rng.uniform(0.5, 2.0) / axes_mm.mean()  # soft edge, in units of the normalised distance
        contrast = rng.uniform(25, 70) * (-1 if rng.random() < 0.6 else 1)
        profile = expit((1 - d) / width)
        hu = hu + profile * (contrast + 8 * _grain(rng, size, 1.0))
        label[mask] = 1
        placed.append((c, reach))
    hu = ndi.gaussian_filter(hu, 0.5 / spacing) + rng.normal(0, rng.uniform(6, 14), size)
    world = Rotation.from_rotvec(np.deg2rad(rng.uniform(5, 20)) * _unit(rng)).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = world @ np.diag(spacing[::-1])  # columns follow the stored (W, H, D) axes
    affine[:3, 3] = rng.uniform(-150, 150, 3)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label, affine


def _unit(rng) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _render_skin(rng, size):
    """Dermoscopy-like RGB uint8 image: skin texture, 1-3 pigmented lesions, hairs, vignetting."""
    h, w = size
    short = min(size)
    tone = _SKIN_LIGHT + (_SKIN_TAN - _SKIN_LIGHT) * rng.uniform(0, 1)
    shade = 1 + 0.05 * _smooth(rng, size, 5) + 0.02 * _grain(rng, size, 0.8)
    rgb = tone[None, None, :] * shade[..., None]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    label = np.zeros(size, np.uint8)
    placed: list[tuple[np.ndarray, float]] = []
    wanted = rng.integers(1, 4)
    for _ in range(60):
        if len(placed) == wanted:
            break
        r = short * (rng.uniform(0.15, 0.3) if not placed else rng.uniform(0.06, 0.13))
        aspect = rng.uniform(1.0, 1.6)
        reach = 1.3 * r * np.sqrt(aspect)
        c = rng.uniform([reach, reach], [h - reach, w - reach]) if min(h, w) > 2 * reach else None
        if c is None or not _separated(c, reach, placed, 3.0):
            continue
        d = _blob_distance(
            yy - c[0],
            xx - c[1],
            r * np.sqrt(aspect),
            r / np.sqrt(aspect),
            rng.uniform(0, np.pi),
            _radial_factor(rng, 0.1),
        )
        first, second = _PIGMENTS[rng.choice(len(_PIGMENTS), 2, replace=False)]
        mix = expit(2 * _smooth(rng, size, rng.uniform(3, 8)))[..., None]
        colour = first * (1 - mix) + second * mix
        colour *= (0.8 + 0.2 * np.clip(d, 0, 1))[..., None]  # darker centre
        dots = _grain(rng, size, 1.2) > 1.8  # globules
        colour[dots] *= 0.7
        alpha = expit((1 - d) / rng.uniform(0.02, 0.12))[..., None]
        rgb = rgb * (1 - alpha) + colour * alpha
        label[d < 1] = 1
        placed.append((c, reach))
    hairs = np.zeros(size, bool)
    for _ in range(rng.integers(0, 6)):
        pts = rng.uniform(0, 1, (3, 2)) * np.array(size)
        rr, cc = bezier_curve(*pts.astype(int).ravel(), weight=1.0, shape=size)
        hairs[rr, cc] = True
    if hairs.any() and rng.random() < 0.5:
        hairs = ndi.binary_dilation(hairs)  # thicker hair
    rgb[hairs] = rgb[hairs] * 0.25 + np.array([40, 28, 22]) / 255 * 0.75
    radius = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    rgb *= (1 - 0.45 * np.clip((radius - 0.8) / 0.6, 0, 1) ** 2)[..., None]  # dermoscope vignetting
    rgb += rng.normal(0, 0.012, rgb.shape)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), label, None


def _lesion_panel(volume: np.ndarray, label: np.ndarray):
    """Slice through the largest lesion of a ``D H W`` volume."""
    parts, count = ndi.label(label)
    largest = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1 if count else label
    z = middle_slice(volume, largest, axis=0)
    return volume[z], label[z]


def make_lesions(
    out, n: int = 6, size=None, seed: int = 0, n_test: int = 0, dims: int = 3, spacing=(2.5, 0.8, 0.8)
) -> Path:
    """Write a synthetic lesion dataset with semantic labels (0 background, 1 lesion).

    ``dims=3``: CT-like int16 NIfTI volumes (HU) of fat, muscle and a textured organ with vessels,
    holding 1-3 hypo- or hyper-intense lesions with soft edges. Spacing is anisotropic and the
    affine rotated and shifted (per case). The file stores the array as NIfTI (i, j, k) =
    (W, H, D), thick slices along k as scanners write them: nibabel reads shape ``W H D``,
    SimpleITK reads ``D H W`` with spacing ``spacing``. ``dims=2``: RGB dermoscopy-like PNGs
    with 1-3 pigmented lesions; labels are 8-bit PNGs holding 0/1.

    Args:
        out: dataset folder (created).
        n: training cases. seed: dataset seed (>= 0). n_test: held-out cases (imagesTs/labelsTs).
        size: ``D H W`` for 3D (default 32 96 96), ``H W`` for 2D (default 192 256).
        dims: 2 or 3.
        spacing: voxel size in mm along ``D H W`` (3D only).

    Returns:
        ``out`` as a Path.
    """
    if dims not in (2, 3):
        raise ConfigError("dims", f"expected 2 or 3, received {dims!r}")
    size = _check(n, n_test, seed, size or ((32, 96, 96) if dims == 3 else (192, 256)), dims)
    meta = {
        "name": f"lesions{dims}d",
        "tensorImageSize": f"{dims}D",
        "labels": {"background": 0, "lesion": 1},
        "label_kind": "semantic",
    }
    if dims == 3:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ConfigError("spacing", f"expected 3 positive sizes in mm (D H W), received {spacing}")
        if _lesion_radius_range(np.multiply(size, spacing), np.array(spacing))[0] < 1.0:
            raise ConfigError("size", f"volume {size} at spacing {spacing} mm is too small to hold a lesion")
        meta |= {
            "description": "Synthetic CT-like lesions, anisotropic spacing, rotated affine (medseg)",
            "channel_names": {"0": "CT"},
            "file_ending": ".nii.gz",
        }
        render, write, panel = (lambda rng: _render_volume(rng, size, spacing)), _write_nifti, _lesion_panel
    else:
        meta |= {
            "description": "Synthetic dermoscopy-like pigmented skin lesions (medseg)",
            "channel_names": {"0": "rgb"},
            "file_ending": ".png",
        }
        render, write, panel = (lambda rng: _render_skin(rng, size)), _write_png, (lambda im, lab: (im, lab))
    return _write_dataset(
        out,
        meta=meta,
        prefix="lesions",
        n=n,
        n_test=n_test,
        seed=seed,
        render=render,
        write=write,
        panel=panel,
        instance=False,
    )
