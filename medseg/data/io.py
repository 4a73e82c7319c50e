"""Read and write images with their geometry, through MONAI's ``LoadImage``.

Every loaded image is a channel-first ``MetaTensor`` ``[C, *spatial]`` whose meta holds ``affine`` (RAS,
as MONAI's readers), ``spacing``, ``spatial_shape``, ``original_channel_dim`` and ``filename_or_obj``.
Which library reads a file is decided by its extension:

- NIfTI (``.nii``, ``.nii.gz``): MONAI's ``NibabelReader``.
- MHA/MHD, NRRD/NHDR and DICOM series directories: :class:`SimpleITKReader`, which follows MONAI's
  ``ITKReader`` (LPS -> RAS affine, x-first arrays), so a NIfTI and the same image saved as MHA load to the
  same array and affine.
- PNG/JPEG (Pillow) and TIFF (tifffile): :class:`RasterReader`.

Axis convention for 2D raster images: the array is indexed ``[C, x, y]``, the first spatial axis running
along the image width (MONAI's ``PILReader``/``ITKReader`` convention), so a PNG of H rows and W columns
loads as ``[C, W, H]``; RGB(A) becomes 3 (4) channels; a TIFF stack of Z pages loads as ``[C, W, H, Z]``.
Raster images carry an identity affine (unit spacing); :func:`write_image` applies the inverse mapping, so
reading and writing are consistent. A palette PNG loads as its palette indices (label masks).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile
from monai.data import ImageReader, MetaTensor, NibabelReader
from monai.data.image_reader import _copy_compatible_dict, _stack_images
from monai.data.utils import affine_to_spacing, orientation_ras_lps, to_affine_nd
from monai.transforms import EnsureChannelFirstd, LoadImage, LoadImaged
from monai.utils import MetaKeys, SpaceKeys, convert_to_numpy, ensure_tuple
from PIL import Image

from medseg.errors import DataError

logger = logging.getLogger(__name__)

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
ITK_EXTENSIONS = (".mha", ".mhd", ".nrrd", ".nhdr")
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg")
TIFF_EXTENSIONS = (".tif", ".tiff")
IMAGE_EXTENSIONS: tuple[str, ...] = NIFTI_EXTENSIONS + ITK_EXTENSIONS + PIL_EXTENSIONS + TIFF_EXTENSIONS
_HIDDEN_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}


def split_name(path) -> tuple[str, str]:
    """``"a/case_001_0000.NII.GZ"`` -> ``("case_001_0000", ".nii.gz")``: known multi-dot extensions stay
    whole, the extension is lower-cased; a directory or an extension-less name gives ``(name, "")``."""
    name = Path(path).name
    lower = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    stem, dot, ext = name.rpartition(".")
    return (stem, f".{ext.lower()}") if dot and stem else (name, "")


def is_hidden(path) -> bool:
    """Dot files (``.DS_Store``, macOS ``._x.nii.gz`` forks, our own ``.x.tmp`` writes) and OS clutter."""
    name = Path(path).name
    return name.startswith(".") or name.lower() in _HIDDEN_NAMES


def is_dicom_dir(path) -> bool:
    """True for a directory whose first files are DICOM (``.dcm`` or the ``DICM`` magic at byte 128)."""
    path = Path(path)
    if not path.is_dir():
        return False
    files = [f for f in sorted(path.iterdir()) if f.is_file() and not is_hidden(f)][:3]
    for f in files:
        if f.suffix.lower() == ".dcm":
            return True
        with open(f, "rb") as fh:
            if fh.read(132)[128:] == b"DICM":
                return True
    return False


def is_image_path(path) -> bool:
    """A non-hidden file with a supported extension, or a DICOM series directory."""
    path = Path(path)
    if is_hidden(path):
        return False
    if path.is_dir():
        return is_dicom_dir(path)
    return split_name(path)[1] in IMAGE_EXTENSIONS


def _base_meta(array: np.ndarray, affine: np.ndarray, spatial_rank: int) -> dict:
    """The meta keys MONAI's readers set; ``original_channel_dim`` -1 when a trailing channel axis exists."""
    return {
        MetaKeys.ORIGINAL_AFFINE: affine,
        MetaKeys.AFFINE: affine.copy(),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape[:spatial_rank]),
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if array.ndim == spatial_rank else -1,
        "spacing": affine_to_spacing(affine, r=spatial_rank),
    }


def _stacked(arrays_and_metas: list[tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict]:
    """Several files of one case become channels, as MONAI's own readers stack them."""
    meta: dict = {}
    for _, header in arrays_and_metas:
        _copy_compatible_dict(header, meta)  # raises when shapes or affines differ
    return _stack_images([a for a, _ in arrays_and_metas], meta), meta


def _check_suffix(reader: ImageReader, data) -> tuple[str, ...]:
    names = tuple(str(n) for n in ensure_tuple(data))
    if not reader.verify_suffix(names):
        raise ValueError(f"{type(reader).__name__} cannot read {', '.join(names)}")
    return names


class SimpleITKReader(ImageReader):
    """MHA/MHD, NRRD/NHDR and DICOM series directories via SimpleITK, with MONAI ``ITKReader``'s conventions.

    Arrays are x-first (``[x, y, z]``, vector pixels as a trailing channel axis), the affine is converted
    from ITK's LPS to RAS, and at most 3 axes are spatial (a 4th becomes the channel axis).
    """

    def verify_suffix(self, filename) -> bool:
        return all(split_name(f)[1] in ITK_EXTENSIONS or is_dicom_dir(f) for f in ensure_tuple(filename))

    def read(self, data, **kwargs):
        images = [self._read_one(Path(name)) for name in _check_suffix(self, data)]
        return images if len(images) > 1 else images[0]

    @staticmethod
    def _read_one(path: Path) -> sitk.Image:
        if not path.is_dir():
            return sitk.ReadImage(str(path))
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise ValueError(f"no DICOM series in {path}")
        if len(series) > 1:
            logger.warning("%s holds %d DICOM series; reading the first, %s", path, len(series), series[0])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
        return reader.Execute()

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        images = img if isinstance(img, list) else [img]  # not ensure_tuple: an sitk.Image is iterable
        return _stacked([self._array_and_meta(i) for i in images])

    @staticmethod
    def _array_and_meta(img: sitk.Image) -> tuple[np.ndarray, dict]:
        array = sitk.GetArrayFromImage(img)  # [z, y, x(, comp)]
        array = np.moveaxis(array.T, 0, -1) if img.GetNumberOfComponentsPerPixel() > 1 else array.T
        dim = img.GetDimension()
        rank = min(dim, 3)
        direction = np.asarray(img.GetDirection()).reshape(dim, dim)[:rank, :rank]
        affine = np.eye(rank + 1)
        affine[:rank, :rank] = direction @ np.diag(img.GetSpacing()[:rank])
        affine[:rank, -1] = img.GetOrigin()[:rank]
        meta = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys() if not k.startswith("ITK_")}
        meta.update(_base_meta(array, orientation_ras_lps(affine), rank))
        return array, meta


@dataclass
class _Raster:
    array: np.ndarray  # x-first spatial axes, then an optional channel axis
    has_channel: bool


class RasterReader(ImageReader):
    """PNG/JPEG via Pillow and TIFF (2D, RGB, 16-bit, float, page stacks) via tifffile; see the module
    docstring for the ``[x, y(, z)]`` axis convention. The affine is the identity (no physical geometry)."""

    def verify_suffix(self, filename) -> bool:
        ok = PIL_EXTENSIONS + TIFF_EXTENSIONS
        return all(split_name(f)[1] in ok for f in ensure_tuple(filename))

    def read(self, data, **kwargs):
        rasters = [self._read_one(Path(name)) for name in _check_suffix(self, data)]
        return rasters if len(rasters) > 1 else rasters[0]

    @staticmethod
    def _read_one(path: Path) -> _Raster:
        if split_name(path)[1] in TIFF_EXTENSIONS:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                array, axes = series.asarray(), series.axes
            channel_axes = [i for i, a in enumerate(axes) if a in "CS"]
            if len(channel_axes) > 1:
                raise ValueError(f"TIFF axes '{axes}' hold more than one channel axis")
            if channel_axes:
                array = np.moveaxis(array, channel_axes[0], -1)
            has_channel = bool(channel_axes)
        else:
            with Image.open(path) as im:
                array = np.asarray(im)  # palette images give their indices, 16-bit PNG stays uint16
            has_channel = array.ndim == 3
        rank = array.ndim - has_channel
        if rank not in (2, 3):
            raise ValueError(f"expected a 2D image or a page stack, got array shape {array.shape}")
        if array.dtype == bool:
            array = array.astype(np.uint8)
        order = list(range(rank))[::-1] + ([rank] if has_channel else [])
        return _Raster(np.ascontiguousarray(array.transpose(order)), has_channel)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        parts = []
        for raster in img if isinstance(img, list) else [img]:
            rank = raster.array.ndim - raster.has_channel
            parts.append((raster.array, _base_meta(raster.array, np.eye(rank + 1), rank)))
        return _stacked(parts)


class FormatReader(ImageReader):
    """Dispatches each file to :class:`RasterReader`, :class:`SimpleITKReader` or MONAI's ``NibabelReader``
    by extension, so ``LoadImage`` never tries (and logs) the wrong reader first."""

    def __init__(self):
        super().__init__()
        # ours first: they match the whole extension, NibabelReader any name containing ".nii"
        self.readers = (RasterReader(), SimpleITKReader(), NibabelReader())

    def _pick(self, filename) -> ImageReader:
        names = ensure_tuple(filename)
        for reader in self.readers:
            if reader.verify_suffix(names):
                return reader
        raise ValueError(
            f"unsupported image file(s) {', '.join(map(str, names))}: expected one format among "
            f"{', '.join(IMAGE_EXTENSIONS)} or a DICOM series directory"
        )

    def verify_suffix(self, filename) -> bool:
        return any(r.verify_suffix(ensure_tuple(filename)) for r in self.readers)

    def read(self, data, **kwargs):
        reader = self._pick(data)
        return reader, reader.read(data, **kwargs)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        reader, obj = img
        return reader.get_data(obj)


def image_readers() -> list:
    """Readers for ``LoadImage(d)(reader=...)`` that load every supported format."""
    return [FormatReader()]


def load_transforms(keys=("image", "label"), allow_missing_keys: bool = False) -> list:
    """``[LoadImaged, EnsureChannelFirstd]`` for ``keys``; a list of files under one key becomes channels."""
    keys = list(keys)
    return [
        LoadImaged(keys, reader=image_readers(), image_only=True, allow_missing_keys=allow_missing_keys),
        EnsureChannelFirstd(keys, allow_missing_keys=allow_missing_keys),
    ]


def load_image(path_or_paths) -> MetaTensor:
    """Load one image (or several files as its channels) as a float32 ``MetaTensor`` ``[C, *spatial]``.

    Raises:
        DataError: naming the file when it is missing, of an unsupported format or unreadable.
    """
    paths = [Path(p) for p in ensure_tuple(path_or_paths)]
    for p in paths:
        if not p.exists():
            raise DataError(p, "file not found")
    try:
        reader = FormatReader()._pick(paths)
    except ValueError as err:
        raise DataError(paths[0], str(err)) from None
    try:
        return LoadImage(image_only=True, ensure_channel_first=True)([str(p) for p in paths], reader=reader)
    except Exception as err:  # each library raises its own types for a corrupt file; all mean "unreadable"
        lines = str(err).strip().splitlines()
        raise DataError(paths[0], f"cannot read ({type(err).__name__}): {lines[-1] if lines else ''}") from err


def spacing_of(meta_or_tensor) -> tuple[float, ...]:
    """Physical spacing per spatial axis, from the affine of a MetaTensor or a meta dict."""
    meta = meta_or_tensor.meta if isinstance(meta_or_tensor, MetaTensor) else meta_or_tensor
    rank = _spatial_rank(meta, meta_or_tensor.ndim if isinstance(meta_or_tensor, MetaTensor) else None)
    affine = to_affine_nd(rank, convert_to_numpy(meta[MetaKeys.AFFINE], dtype=np.float64))
    return tuple(float(s) for s in affine_to_spacing(affine, r=rank))


def _spatial_rank(meta: dict, ndim: int | None) -> int:
    """Spatial rank from ``spatial_shape``, else a channel-first array of ``ndim`` dims, else the affine."""
    if meta.get(MetaKeys.SPATIAL_SHAPE) is not None:
        return int(np.asarray(convert_to_numpy(meta[MetaKeys.SPATIAL_SHAPE])).size)
    if ndim is not None:
        return 2 if ndim == 2 else ndim - 1
    return len(convert_to_numpy(meta[MetaKeys.AFFINE])) - 1


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


def write_image(data, path, meta: dict | None = None, dtype=None) -> Path:
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
    rank = _spatial_rank(meta, array.ndim)
    if array.ndim == rank:
        array = array[None]
    if array.ndim != rank + 1 or array.shape[0] == 0:
        raise DataError(path, f"expected [C, *spatial] or [*spatial] with {rank} spatial dims, got {array.shape}")
    if dtype is not None:
        dtype = np.dtype(dtype)
        array = (np.rint(array) if dtype.kind in "iu" and array.dtype.kind == "f" else array).astype(dtype)
    _atomic_write(path, lambda tmp: writer(_storable(array), tmp, meta, path))
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


def _write_nifti(array: np.ndarray, tmp: Path, meta: dict, path: Path) -> None:
    affine = _ras_affine(meta, 3)
    volume = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)  # NIfTI keeps channels last
    if array.shape[0] > 1 and array.ndim == 3:  # a singleton z, or the channels would read as a 3rd axis
        volume = volume[:, :, None]
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=int(meta.get("qform_code", 1)))
    image.set_sform(affine, code=int(meta.get("sform_code", 1)))
    image.header.set_xyzt_units("mm")
    nib.save(image, tmp)


def _write_sitk(array: np.ndarray, tmp: Path, meta: dict, path: Path) -> None:
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
    sitk.WriteImage(image, str(tmp), useCompression=True)


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


def _write_pil(array: np.ndarray, tmp: Path, meta: dict, path: Path) -> None:
    jpeg = split_name(path)[1] != ".png"
    channels = array.shape[0]
    if array.ndim != 3 or channels not in ((1, 3) if jpeg else (1, 3, 4)):
        raise DataError(path, f"{path.suffix} holds one 2D grey/RGB(A) image; got [C, *spatial] = {array.shape}")
    array = _narrowed(array, (np.uint8,) if jpeg or channels > 1 else (np.uint8, np.uint16), path)
    image = Image.fromarray(np.ascontiguousarray(array.T if channels > 1 else array[0].T))
    image.save(tmp, **({"quality": 95} if jpeg else {}))


def _write_tiff(array: np.ndarray, tmp: Path, meta: dict, path: Path) -> None:
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
    tifffile.imwrite(
        tmp, np.ascontiguousarray(data), photometric=photometric, compression="zlib", metadata={"axes": axes}
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
