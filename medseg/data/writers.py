"""Write images and label maps with the geometry they were read with, atomically.

The inverse of :mod:`medseg.data.readers`: NIfTI gets the affine, MHA/MHD/NRRD spacing/origin/direction,
PNG/JPEG/TIFF only the values, with the readers' ``[C, x, y(, z)]`` axis convention undone.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile
from monai.data.utils import orientation_ras_lps, to_affine_nd
from monai.utils import MetaKeys, SpaceKeys, convert_to_numpy
from PIL import Image

from medseg.data.readers import (
    IMAGE_EXTENSIONS,
    ITK_EXTENSIONS,
    NIFTI_EXTENSIONS,
    PIL_EXTENSIONS,
    TIFF_EXTENSIONS,
    spatial_rank,
    split_name,
)
from medseg.errors import DataError


def compact_int_dtype(low: float, high: float) -> np.dtype:
    """The smallest integer dtype holding ``[low, high]`` (unsigned when ``low >= 0``)."""
    candidates = (np.uint8, np.uint16, np.uint32) if low >= 0 else (np.int8, np.int16, np.int32, np.int64)
    for dt in candidates:
        if np.iinfo(dt).min <= low and high <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def write_label(data, path, meta: dict | None = None) -> Path:
    """:func:`write_image` for a label map: integral values stored in the most compact integer dtype."""
    array = convert_to_numpy(data)
    if array.dtype.kind == "f" and not np.array_equal(array, np.rint(array)):
        raise DataError(path, "a label map must hold integer values; got non-integral floats")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if meta is None:
        meta = getattr(data, "meta", None)
    return write_image(array, path, meta, dtype=compact_int_dtype(low, high))


def write_image(data, path, meta: dict | None = None, dtype=None, compression_level: int | None = None) -> Path:
    """Atomically write ``data`` (``[C, *spatial]`` or ``[*spatial]``) with the geometry in ``meta``.

    NIfTI gets the affine (with the source's qform/sform codes when it was NIfTI, else scanner codes 1),
    MHA/MHD/NRRD spacing/origin/direction, PNG/JPEG/TIFF only the values (inverse of the reader's axis
    convention). Without ``spatial_shape`` in ``meta`` a 2-dim array is one 2D image and anything larger
    is channel-first. The file is written in a hidden temporary folder next to ``path``, fsynced and moved
    into place with ``os.replace``, so a reader never sees a half-written file.

    Args:
        data: array, tensor or MetaTensor ``[C, *spatial]`` (x-first spatial axes, as loaded).
        path: target file; its extension picks the format.
        meta: meta dict of the reference image; ``data.meta`` when None.
        dtype: stored dtype; None keeps the data's (integral values are narrowed to what PNG/JPEG hold).
        compression_level: zlib level 0 (stored, fastest) to 9 (smallest, slowest) of a compressed format
            (``.nii.gz``, compressed MHA/NRRD, TIFF, PNG); None: each writer's default (NIfTI 1, as nibabel;
            MHA/NRRD SimpleITK's; TIFF and PNG 6). Ignored by uncompressed formats and JPEG.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    ext = split_name(path)[1]
    writer = _WRITERS.get(ext)
    if writer is None:
        raise DataError(path, f"cannot write '{ext or path.name}': expected one of {', '.join(IMAGE_EXTENSIONS)}")
    meta = dict(meta if meta is not None else getattr(data, "meta", None) or {})
    array = convert_to_numpy(data)
    rank = spatial_rank(meta, array.ndim)
    if array.ndim == rank:
        array = array[None]
    if array.ndim != rank + 1 or array.shape[0] == 0:
        raise DataError(path, f"expected [C, *spatial] or [*spatial] with {rank} spatial dims, got {array.shape}")
    if compression_level is not None and not 0 <= int(compression_level) <= 9:
        raise DataError(path, f"compression level must be 0..9, got {compression_level}")
    if dtype is not None:
        dtype = np.dtype(dtype)
        array = (np.rint(array) if dtype.kind in "iu" and array.dtype.kind == "f" else array).astype(dtype)
    _atomic_write(path, lambda tmp: writer(_storable(array), tmp, meta, path, compression_level))
    return path


def _storable(array: np.ndarray) -> np.ndarray:
    """Dtypes all writers take: bool -> uint8, float16 -> float32, 64-bit ints -> 32 bits when they fit."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8 and array.size:
        narrow = np.iinfo(np.int32 if array.dtype.kind == "i" else np.uint32)
        if narrow.min <= array.min() and array.max() <= narrow.max:
            return array.astype(narrow.dtype)
    return array


def _ras_affine(meta: dict, rank: int) -> np.ndarray:
    affine = meta.get(MetaKeys.AFFINE)
    if affine is None:
        return np.eye(rank + 1)
    affine = to_affine_nd(rank, convert_to_numpy(affine, dtype=np.float64))
    return orientation_ras_lps(affine) if str(meta.get(MetaKeys.SPACE, "RAS")) == SpaceKeys.LPS else affine


_NIFTI_FORM_FIELDS = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z",
                      "srow_x", "srow_y", "srow_z", "qform_code", "sform_code", "pixdim")


def _source_nifti_forms(meta: dict, affine: np.ndarray) -> nib.Nifti1Header | None:
    """The source NIfTI's qform and sform fields, when ``meta`` came from a NIfTI whose affine (the sform when
    coded, else the qform) is still ``affine``: the same voxel grid, so both forms carry over exactly."""
    if not all(key in meta for key in _NIFTI_FORM_FIELDS):
        return None
    header = nib.Nifti1Header()
    try:
        for key in _NIFTI_FORM_FIELDS:
            header[key] = convert_to_numpy(meta[key])
        if MetaKeys.ORIGINAL_PIXDIM in meta:  # MONAI's spatial transforms rewrite "pixdim" from the sform's scales
            header["pixdim"] = convert_to_numpy(meta[MetaKeys.ORIGINAL_PIXDIM])
        source = header.get_best_affine()
    except (ValueError, TypeError, nib.spatialimages.HeaderDataError):
        return None
    return header if np.allclose(source, affine, atol=1e-4) else None


def _write_nifti(array: np.ndarray, tmp: Path, meta: dict, path: Path, level: int | None) -> None:
    affine = _ras_affine(meta, 3)
    volume = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)  # NIfTI keeps channels last
    if array.shape[0] > 1 and array.ndim == 3:  # a singleton z, or the channels would read as a 3rd axis
        volume = volume[:, :, None]
    source = _source_nifti_forms(meta, affine)
    if source is None:  # another format, or a new grid: the affine is both forms
        image = nib.Nifti1Image(volume, affine)
        image.set_qform(affine, code=int(meta.get("qform_code", 1)))
        image.set_sform(affine, code=int(meta.get("sform_code", 1)))
    else:  # the source's qform and sform, each with its code, bit for bit (a qform cannot hold an sform's shear)
        image = nib.Nifti1Image(volume, None)
        for key in _NIFTI_FORM_FIELDS[:-1]:
            image.header[key] = source[key]
        image.header["pixdim"][:4] = source["pixdim"][:4]  # qfac and voxel sizes; pixdim[4:] is not geometry
    image.header.set_xyzt_units("mm")
    if level is None or split_name(path)[1] != ".nii.gz":
        nib.save(image, tmp)
    else:  # nibabel's writer has one class-wide level; the bytes of the same file, gzipped at ours
        with gzip.GzipFile(tmp, "wb", compresslevel=int(level), mtime=0) as fh:
            fh.write(image.to_bytes())


def _write_sitk(array: np.ndarray, tmp: Path, meta: dict, path: Path, level: int | None) -> None:
    rank = array.ndim - 1
    if rank > 3:
        raise DataError(path, f"expected at most 3 spatial dims, got {rank}")
    affine = orientation_ras_lps(_ras_affine(meta, rank))
    spacing = np.linalg.norm(affine[:rank, :rank], axis=0)
    spacing[spacing == 0] = 1.0
    vector = array.shape[0] > 1
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T if vector else array[0].T), isVector=vector)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine[:rank, -1].tolist())
    image.SetDirection((affine[:rank, :rank] / spacing).flatten().tolist())
    sitk.WriteImage(image, str(tmp), useCompression=level != 0, compressionLevel=-1 if level is None else int(level))


def _narrowed(array: np.ndarray, allowed: Sequence, path: Path) -> np.ndarray:
    """Cast integral values to the first of ``allowed`` (unsigned) dtypes that holds them, else refuse."""
    if array.dtype in allowed:
        return array
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    integral = array.dtype.kind in "iu" or bool(np.all(np.isfinite(array)) and np.array_equal(array, np.rint(array)))
    for dt in allowed:
        if integral and np.iinfo(dt).min <= low and high <= np.iinfo(dt).max:
            return np.rint(array).astype(dt) if array.dtype.kind == "f" else array.astype(dt)
    names = "/".join(np.dtype(d).name for d in allowed)
    raise DataError(
        path,
        f"{path.suffix} stores {names} values; got {array.dtype} in [{low:g}, {high:g}] "
        "(pass dtype=, or write .tif/.nii.gz)",
    )


def _write_pil(array: np.ndarray, tmp: Path, meta: dict, path: Path, level: int | None) -> None:
    jpeg = split_name(path)[1] != ".png"
    channels = array.shape[0]
    if array.ndim != 3 or channels not in ((1, 3) if jpeg else (1, 3, 4)):
        raise DataError(path, f"{path.suffix} holds one 2D grey/RGB(A) image; got [C, *spatial] = {array.shape}")
    array = _narrowed(array, (np.uint8,) if jpeg or channels > 1 else (np.uint8, np.uint16), path)
    image = Image.fromarray(np.ascontiguousarray(array.T if channels > 1 else array[0].T))
    image.save(tmp, **({"quality": 95} if jpeg else {"compress_level": 6 if level is None else int(level)}))


def _write_tiff(array: np.ndarray, tmp: Path, meta: dict, path: Path, level: int | None) -> None:
    channels, rank = array.shape[0], array.ndim - 1
    if rank not in (2, 3):
        raise DataError(path, f"TIFF holds a 2D image or a page stack; got [C, *spatial] = {array.shape}")
    spatial = "ZYX"[3 - rank :]
    if channels == 1:
        data, axes, photometric = array[0].T, spatial, "minisblack"
    elif rank == 2 and channels in (3, 4) and array.dtype in (np.uint8, np.uint16):
        data, axes, photometric = array.T, spatial + "S", "rgb"
    else:
        data, axes, photometric = np.moveaxis(array.T, -1, 0), "C" + spatial, "minisblack"
    zlib = level != 0
    tifffile.imwrite(
        tmp, np.ascontiguousarray(data), photometric=photometric, compression="zlib" if zlib else None,
        compressionargs={"level": 6 if level is None else int(level)} if zlib else None, metadata={"axes": axes},
    )


_WRITERS = {
    **dict.fromkeys(NIFTI_EXTENSIONS, _write_nifti),
    **dict.fromkeys(ITK_EXTENSIONS, _write_sitk),
    **dict.fromkeys(PIL_EXTENSIONS, _write_pil),
    **dict.fromkeys(TIFF_EXTENSIONS, _write_tiff),
}


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write into a hidden temporary folder beside ``path`` (same file system), fsync, then ``os.replace``.

    A folder rather than a file because MHD/NHDR write a data file named after the header: both are moved,
    the data file(s) first, so the header never points at a missing file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp_dir / path.name)
        for produced in sorted(tmp_dir.iterdir(), key=lambda f: f.name == path.name):
            with open(produced, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(produced, path.parent / produced.name)
        if hasattr(os, "O_DIRECTORY"):  # persist the rename itself (POSIX only)
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
