"""What the cell and lesion generators share: seeded random fields, blob outlines, argument checks, the
MSD folder writer (with stale-case clean-up) and the file writers."""

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

from medseg.errors import ConfigError

GENERATOR = "medseg.data.synth"  # written to dataset.json; only folders carrying it are cleaned up


def case_rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells) -> np.ndarray:
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


def grain(rng: np.random.Generator, shape: tuple[int, ...], sigma) -> np.ndarray:
    """Zero-mean, unit-std fine texture: white noise blurred by ``sigma`` pixels."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def radial_factor(rng: np.random.Generator, strength: float, harmonics: int = 12) -> Callable:
    """Random boundary modulation ``f(angle)`` of a star-shaped blob (irregular, noisy outline)."""
    k = np.arange(2, harmonics + 1)
    amp = rng.normal(0.0, strength, k.size) / k**0.7  # low harmonics shape the blob, high ones roughen it
    phase = rng.uniform(0, 2 * np.pi, k.size)

    def factor(angle: np.ndarray) -> np.ndarray:
        return np.clip(1 + np.cos(k * angle[..., None] + phase) @ amp, 0.7, 1.3)

    return factor


def blob_distance(dy, dx, a, b, theta, factor) -> np.ndarray:
    """Normalised distance of offsets (dy, dx) to an irregular ellipse: <= 1 inside, 1 on the border."""
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return np.hypot(u / a, v / b) / factor(np.arctan2(v / b, u / a))


def check_arguments(n: int, n_test: int, seed: int, size, ndim: int) -> tuple[int, ...]:
    """Validate the common arguments; return the array shape to render, rows first.

    ``size`` follows medseg's axis convention, ``x y [z]`` (the order of a loaded array's spatial axes and of
    ``transforms.patch_size``); the renderers draw numpy arrays indexed ``[z,] y, x``, so the shape is reversed.
    """
    if not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError("n", f"expected an integer >= 1, received {n!r}")
    if not isinstance(n_test, int | np.integer) or n_test < 0:
        raise ConfigError("n_test", f"expected an integer >= 0, received {n_test!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError("seed", f"expected an integer >= 0, received {seed!r}")
    size = tuple(int(s) for s in size)
    if len(size) != ndim or min(size) < 8:
        axes = " ".join("xyz"[:ndim])
        raise ConfigError("size", f"expected {ndim} sizes ({axes}) of at least 8, received {size}")
    return size[::-1]


def write_dataset(
    out, *, meta: dict, prefix: str, n: int, n_test: int, seed: int, render: Callable, write: Callable
) -> Path:
    """Render and write every case, then dataset.json; returns the folder.

    Args:
        render: ``rng -> (image, label, geometry)``, arrays indexed rows first.
        write: ``(path, array, geometry) -> None`` for one file.
    """
    out = Path(out)
    ending = meta["file_ending"]
    lists: dict[str, list] = {"training": [], "test": []}
    for split, (key, tag, count) in enumerate((("training", "Tr", n), ("test", "Ts", n_test))):
        for i in range(count):
            case = f"{prefix}_{i:03d}" if split == 0 else f"{prefix}_test_{i:03d}"
            image, label, geometry = render(case_rng(seed, split, i))
            entry = {"image": f"images{tag}/{case}_0000{ending}", "label": f"labels{tag}/{case}{ending}"}
            write(out / entry["image"], image, geometry)
            write(out / entry["label"], label, geometry)
            lists[key].append(entry)
    _remove_stale(out, lists)
    dataset = {**meta, "numTraining": n, "numTest": n_test, "generator": GENERATOR, "seed": int(seed), **lists}
    tmp = out / ".dataset.json.tmp"
    tmp.write_text(json.dumps(dataset, indent=2) + "\n")
    os.replace(tmp, out / "dataset.json")
    return out


def _remove_stale(out: Path, lists: dict) -> None:
    """Delete cases an earlier run of this generator listed but this run did not write."""
    old = out / "dataset.json"
    try:
        previous = json.loads(old.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(previous, dict) or previous.get("generator") != GENERATOR:
        return  # never delete files this module did not write
    keep = {p for entries in lists.values() for e in entries for p in e.values()}
    for entries in (previous.get("training", []), previous.get("test", [])):
        for entry in entries:
            for rel in entry.values():
                if rel not in keep and ".." not in Path(rel).parts:
                    (out / rel).unlink(missing_ok=True)


def write_tiff(path: Path, array: np.ndarray, _geometry=None) -> None:
    """A ``y x`` array as a TIFF of that many rows and columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, photometric="minisblack")


def write_png(path: Path, array: np.ndarray, _geometry=None) -> None:
    """A ``y x [rgb]`` array as a PNG of that many rows and columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """``z y x`` array -> NIfTI stored as (i, j, k) = (x, y, z), slices along k as scanners write them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
