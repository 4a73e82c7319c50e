"""Synthetic lesions: CT-like 3D volumes (anisotropic, rotated affine) and dermoscopy-like 2D RGB images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation
from scipy.special import expit
from skimage.draw import bezier_curve

from medseg.data.synth.shared import (
    blob_distance,
    check_arguments,
    grain,
    radial_factor,
    smooth_field,
    write_dataset,
    write_nifti,
    write_png,
)
from medseg.errors import ConfigError

_SKIN_LIGHT, _SKIN_TAN = np.array([236, 198, 176]) / 255, np.array([186, 132, 102]) / 255
_PIGMENTS = np.array([[150, 100, 62], [96, 58, 36], [52, 34, 28], [98, 100, 124], [160, 86, 74]]) / 255


def _separated(centre, reach, placed, margin) -> bool:
    return all(np.linalg.norm(centre - c) > reach + r + margin for c, r in placed)


def _lesion_radius_range(extent: np.ndarray, spacing: np.ndarray) -> tuple[float, float]:
    """Lesion radii (mm) that fit the volume with a margin: 4-12 mm, less in small volumes."""
    fits = float(np.min(extent / 2 - spacing)) / (1.35 * 1.25) - 0.01
    return min(4.0, 0.5 * fits), min(12.0, fits)


def _render_volume(rng, size, spacing):
    """CT-like ``z y x`` volume in HU (int16), lesion mask (uint8) and a rotated, shifted affine.

    ``size`` and ``spacing`` are given rows first (``z y x``), as the arrays are drawn.
    """
    spacing = np.asarray(spacing, float)
    extent = np.asarray(size) * spacing  # mm
    zz, yy, xx = np.meshgrid(*(np.arange(s) * sp for s, sp in zip(size, spacing)), indexing="ij", sparse=True)
    grid = (zz, yy, xx)
    # Background: fat and muscle mixed by a smooth field; an organ with parenchyma texture and vessels.
    muscle = expit(3 * smooth_field(rng, size, extent / 30))
    hu = -95 + 145 * muscle + 8 * smooth_field(rng, size, extent / 10)
    centre = extent * rng.uniform(0.35, 0.65, 3)
    radii = extent * rng.uniform(0.55, 0.9, 3)
    organ_d = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)))
    organ_d = organ_d / (1 + 0.12 * smooth_field(rng, size, extent / 25))
    organ = expit((1 - organ_d) * 25)
    parenchyma = rng.uniform(45, 70) + 6 * smooth_field(rng, size, extent / 6)
    # Vessels: where two smooth fields are both near zero, i.e. along curves (tubes), not sheets.
    vessels = np.exp(-(smooth_field(rng, size, extent / 14) ** 2 + smooth_field(rng, size, extent / 14) ** 2) / 0.06)
    parenchyma += rng.choice([-1, 1]) * rng.uniform(40, 90) * vessels
    hu = hu * (1 - organ) + parenchyma * organ
    # Lesions: irregular ellipsoids inside the organ, kept apart so each is its own component.
    label = np.zeros(size, np.uint8)
    lobes = smooth_field(rng, size, extent / 6)
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
        hu = hu + profile * (contrast + 8 * grain(rng, size, 1.0))
        label[mask] = 1
        placed.append((c, reach))
    hu = ndi.gaussian_filter(hu, 0.5 / spacing) + rng.normal(0, rng.uniform(6, 14), size)
    world = Rotation.from_rotvec(np.deg2rad(rng.uniform(5, 20)) * _unit(rng)).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = world @ np.diag(spacing[::-1])  # columns follow the stored (x, y, z) axes
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
    shade = 1 + 0.05 * smooth_field(rng, size, 5) + 0.02 * grain(rng, size, 0.8)
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
        d = blob_distance(
            yy - c[0],
            xx - c[1],
            r * np.sqrt(aspect),
            r / np.sqrt(aspect),
            rng.uniform(0, np.pi),
            radial_factor(rng, 0.1),
        )
        first, second = _PIGMENTS[rng.choice(len(_PIGMENTS), 2, replace=False)]
        mix = expit(2 * smooth_field(rng, size, rng.uniform(3, 8)))[..., None]
        colour = first * (1 - mix) + second * mix
        colour *= (0.8 + 0.2 * np.clip(d, 0, 1))[..., None]  # darker centre
        dots = grain(rng, size, 1.2) > 1.8  # globules
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


def make_lesions(
    out, n: int = 6, size=None, seed: int = 0, n_test: int = 0, dims: int = 3, spacing=(0.8, 0.8, 2.5)
) -> Path:
    """Write a synthetic lesion dataset with semantic labels (0 background, 1 lesion).

    ``dims=3``: CT-like int16 NIfTI volumes (HU) of fat, muscle and a textured organ with vessels,
    holding 1-3 hypo- or hyper-intense lesions with soft edges. Spacing is anisotropic (thick slices along
    z) and the affine rotated and shifted (per case); the file's voxel axes (i, j, k) are ``x y z``, so
    nibabel and medseg read shape ``size``. ``dims=2``: RGB dermoscopy-like PNGs with 1-3 pigmented
    lesions; labels are 8-bit PNGs holding 0/1.

    Args:
        out: dataset folder (created).
        n: training cases. seed: dataset seed (>= 0). n_test: held-out cases (imagesTs/labelsTs).
        size: ``x y z`` for 3D (default 96 96 32), ``x y`` (width, height) for 2D (default 256 192).
        dims: 2 or 3.
        spacing: voxel size in mm along ``x y z`` (3D only).

    Returns:
        ``out`` as a Path.
    """
    if dims not in (2, 3):
        raise ConfigError("dims", f"expected 2 or 3, received {dims!r}")
    shape = check_arguments(n, n_test, seed, size or ((96, 96, 32) if dims == 3 else (256, 192)), dims)
    meta = {
        "name": f"lesions{dims}d",
        "tensorImageSize": f"{dims}D",
        "labels": {"background": 0, "lesion": 1},
        "label_kind": "semantic",
    }
    if dims == 3:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ConfigError("spacing", f"expected 3 positive sizes in mm (x y z), received {spacing}")
        zyx_spacing = spacing[::-1]
        if _lesion_radius_range(np.multiply(shape, zyx_spacing), np.array(zyx_spacing))[0] < 1.0:
            raise ConfigError("size", f"volume {shape[::-1]} (x y z) at spacing {spacing} mm is too small to hold "
                                      "a lesion")
        meta |= {
            "description": "Synthetic CT-like lesions, anisotropic spacing, rotated affine (medseg)",
            "channel_names": {"0": "CT"},
            "file_ending": ".nii.gz",
        }
        render, write = (lambda rng: _render_volume(rng, shape, zyx_spacing)), write_nifti
    else:
        meta |= {
            "description": "Synthetic dermoscopy-like pigmented skin lesions (medseg)",
            "channel_names": {"0": "rgb"},
            "file_ending": ".png",
        }
        render, write = (lambda rng: _render_skin(rng, shape)), write_png
    return write_dataset(out, meta=meta, prefix="lesions", n=n, n_test=n_test, seed=seed, render=render, write=write)
