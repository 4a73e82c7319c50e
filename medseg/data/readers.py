"""Read images with their geometry, through MONAI's ``LoadImage``; name the files medseg can read.

Every loaded image is a channel-first ``MetaTensor`` ``[C, *spatial]`` whose meta holds ``affine`` (RAS,
as MONAI's readers), ``spacing``, ``spatial_shape``, ``original_channel_dim`` and ``filename_or_obj``.
Which library reads a file is decided by its extension:

- NIfTI (``.nii``, ``.nii.gz``): :class:`NiftiReader`, MONAI's ``NibabelReader`` without its header
  "correction" (which replaces an sform whose scales differ from ``pixdim`` -- any sheared sform -- by the
  qform): the affine is nibabel's, the sform when its code is set, as the NIfTI standard says.
- MHA/MHD, NRRD/NHDR and DICOM series directories: :class:`SimpleITKReader`, which follows MONAI's
  ``ITKReader`` (LPS -> RAS affine, x-first arrays), so a NIfTI and the same image saved as MHA load to the
  same array and affine.
- PNG/JPEG (Pillow) and TIFF (tifffile): :class:`RasterReader`.

Axis convention for 2D raster images: the array is indexed ``[C, x, y]``, the first spatial axis running
along the image width (MONAI's ``PILReader``/``ITKReader`` convention), so a PNG of H rows and W columns
loads as ``[C, W, H]``; RGB becomes 3 channels; a TIFF stack of Z pages loads as ``[C, W, H, Z]``. An alpha
channel (RGBA or grey + alpha PNG, a TIFF's alpha ExtraSamples) that is opaque everywhere carries nothing and is
dropped, so such an RGBA PNG loads as 3 channels and a grey + alpha one as 1, like the same image without alpha
(an alpha that varies is kept as a channel: it might hold data).
Raster images carry an identity affine (unit spacing); :func:`medseg.data.writers.write_image` applies the
inverse mapping, so reading and writing are consistent. A palette PNG loads as its palette indices (label masks).

A file that cannot be read raises :class:`~medseg.errors.DataError` with the library's reason in words
("truncated gzip stream", "not a NIfTI file"...), and a header announcing more voxels than the machine has
memory for is refused before anything is allocated.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Sequence
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


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # not POSIX
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def check_claimed_size(path, shape: Sequence[int], dtype) -> None:
    """Refuse, before allocating, an image whose header claims more voxels than this machine's memory holds
    (loading converts to float32, so at least 4 bytes per value count)."""
    total = _memory_bytes()
    need = int(np.prod([int(s) for s in shape], dtype=np.float64)) * max(np.dtype(dtype).itemsize, 4)
    if total is not None and need > total:
        dims = "x".join(str(int(s)) for s in shape)
        raise DataError(path, f"header claims {dims} voxels ({np.dtype(dtype).name}): loading needs {_size(need)}, "
                              f"more than this machine's {_size(total)} of memory")


def unreadable_reason(err: BaseException) -> str:
    """What a reader library's exception means, in words (the libraries' own texts are often empty or cryptic)."""
    text = " ".join(str(err).split())
    if isinstance(err, EOFError) or "end-of-stream marker" in text:
        return "truncated gzip stream (the file ends before its compressed data does)"
    if isinstance(err, gzip.BadGzipFile) or "Not a gzipped file" in text:
        return "not a gzip file, though its name ends in .gz"
    if isinstance(err, zlib.error):
        return f"corrupt gzip data ({text})"
    if "Cannot work out file type" in text or "not a valid NIfTI" in text or "Unknown file type" in text:
        return "not a NIfTI file"
    if "Unable to determine ImageIO reader" in text:
        return "not an MHA/MHD/NRRD/DICOM file SimpleITK can read"
    if "cannot identify image file" in text:
        return "not a PNG/JPEG image Pillow can read"
    if isinstance(err, ValueError) and "buffer is smaller" in text or "requested" in text and "bytes" in text:
        return f"truncated file: the data is shorter than its header says ({text[:160]})"
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


class _Unreadable:
    """What :class:`FormatReader.read` returns for a file it cannot open: ``LoadImage`` then neither retries
    every other reader (logging "unable to load" for each) nor loses the reason; ``get_data`` raises it."""

    def __init__(self, path: str, error: DataError):
        self.path, self.error = path, error


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
            info = sitk.ImageFileReader()
            info.SetFileName(str(path))
            info.ReadImageInformation()
            components = info.GetNumberOfComponents()
            check_claimed_size(path, [*info.GetSize(), *([components] if components > 1 else [])], np.float32)
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
                check_claimed_size(path, series.shape, series.dtype)
                array, axes = series.asarray(), series.axes
                alpha = _tiff_alpha_samples(series.keyframe)
            channel_axes = [i for i, a in enumerate(axes) if a in "CS"]
            if len(channel_axes) > 1:
                raise ValueError(f"TIFF axes '{axes}' hold more than one channel axis")
            if channel_axes:
                array = np.moveaxis(array, channel_axes[0], -1)
                if alpha and axes[channel_axes[0]] == "S":
                    array = _without_opaque_alpha(array, alpha)
            has_channel = bool(channel_axes)
        else:
            with Image.open(path) as im:
                array = np.asarray(im)  # palette images give their indices, 16-bit PNG stays uint16
                if im.mode in ("RGBA", "LA", "RGBa", "La"):
                    array = _without_opaque_alpha(array, 1)
            if array.ndim == 3 and array.shape[-1] == 1:  # LA without its alpha: grey
                array = array[..., 0]
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


def _tiff_alpha_samples(page) -> int:
    """How many trailing samples per pixel of a TIFF page are alpha (ExtraSamples 1 or 2: transparency)."""
    extra = getattr(page, "extrasamples", None) or ()
    return sum(1 for kind in tuple(extra) if int(kind) in (1, 2))


def _without_opaque_alpha(array: np.ndarray, alpha: int) -> np.ndarray:
    """``array`` (channels last) without its last ``alpha`` channels when each is one value everywhere (opaque):
    they carry nothing; an alpha that varies stays, in case it holds data."""
    tail = array[..., array.shape[-1] - alpha:]
    if all(np.all(tail[..., i] == tail.flat[i]) for i in range(alpha)):
        return array[..., : array.shape[-1] - alpha]
    return array


class NiftiReader(NibabelReader):
    """MONAI's ``NibabelReader`` minus ``correct_nifti_header_if_necessary``, which overwrites an sform whose
    column norms differ from ``pixdim`` (a sheared sform, or one registered to a template) with the qform, so
    labels came back up to 100+ mm off; and with the claimed size checked before the data is read."""

    def read(self, data, **kwargs):
        self.filenames = _check_suffix(self, data)
        images = []
        for name in self.filenames:
            image = nib.load(name, **{**self.kwargs, **kwargs})
            check_claimed_size(name, image.shape, image.get_data_dtype())
            images.append(image)
        return images if len(images) > 1 else images[0]


class FormatReader(ImageReader):
    """Dispatches each file to :class:`RasterReader`, :class:`SimpleITKReader` or :class:`NiftiReader` by
    extension, so ``LoadImage`` never tries (and logs) the wrong reader first; a file that cannot be read
    fails with a :class:`DataError` saying why."""

    def __init__(self):
        super().__init__()
        # ours first: they match the whole extension, NibabelReader any name containing ".nii"
        self.readers = (RasterReader(), SimpleITKReader(), NiftiReader())

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
        name = ", ".join(map(str, ensure_tuple(data)))
        try:
            return reader, reader.read(data, **kwargs)
        except DataError as err:
            return reader, _Unreadable(name, err)
        except Exception as err:  # each library raises its own types for a corrupt file
            return reader, _Unreadable(name, DataError(name, f"cannot read: {unreadable_reason(err)}"))

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        reader, obj = img
        if isinstance(obj, _Unreadable):
            raise obj.error
        try:
            return reader.get_data(obj)
        except DataError:
            raise
        except Exception as err:  # nibabel reads lazily: a truncated stream shows up here
            names = ", ".join(map(str, getattr(reader, "filenames", ()) or ()))
            raise DataError(names or "image", f"cannot read: {unreadable_reason(err)}") from err


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
    reader = FormatReader()
    try:
        reader._pick(paths)
    except ValueError as err:
        raise DataError(paths[0], str(err)) from None
    try:
        return LoadImage(image_only=True, ensure_channel_first=True)([str(p) for p in paths], reader=reader)
    except DataError:
        raise
    except Exception as err:  # stacking files of different shapes, odd arrays: all mean "unusable"
        raise DataError(paths[0], f"cannot read: {unreadable_reason(err)}") from err


def spacing_of(meta_or_tensor) -> tuple[float, ...]:
    """Physical spacing per spatial axis, from the affine of a MetaTensor or a meta dict."""
    meta = meta_or_tensor.meta if isinstance(meta_or_tensor, MetaTensor) else meta_or_tensor
    rank = spatial_rank(meta, meta_or_tensor.ndim if isinstance(meta_or_tensor, MetaTensor) else None)
    affine = to_affine_nd(rank, convert_to_numpy(meta[MetaKeys.AFFINE], dtype=np.float64))
    return tuple(float(s) for s in affine_to_spacing(affine, r=rank))


def spatial_rank(meta: dict, ndim: int | None) -> int:
    """Spatial rank from ``spatial_shape``, else a channel-first array of ``ndim`` dims, else the affine."""
    if meta.get(MetaKeys.SPATIAL_SHAPE) is not None:
        return int(np.asarray(convert_to_numpy(meta[MetaKeys.SPATIAL_SHAPE])).size)
    if ndim is not None:
        return 2 if ndim == 2 else ndim - 1
    return len(convert_to_numpy(meta[MetaKeys.AFFINE])) - 1

