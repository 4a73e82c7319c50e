"""Readers and writers: every format round-trips its values and geometry; 2D files keep one axis convention."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from PIL import Image

from medseg.data.readers import (
    IMAGE_EXTENSIONS,
    is_hidden,
    is_image_path,
    load_image,
    load_transforms,
    spacing_of,
    split_name,
)
from medseg.data.writers import write_image, write_label
from medseg.errors import DataError
from tests.data.conftest import OBLIQUE, save_dicom_series, save_nifti

# a non-identity direction (30 degrees about z, then a tilt) for the ITK formats
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
DIRECTION = np.array([[_C, -_S, 0], [_S, _C, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, 0.8, -0.6], [0, 0.6, 0.8]])


def _sitk_geometry(path) -> tuple:
    image = sitk.ReadImage(str(path))
    return image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _assert_same(a: MetaTensor, b: MetaTensor, atol: float = 0.0) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=atol)
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("case_001_0000.nii.gz", ("case_001_0000", ".nii.gz")),
        ("dir/A.B.NII.GZ", ("A.B", ".nii.gz")),
        ("x.nii", ("x", ".nii")),
        ("cell.TIFF", ("cell", ".tiff")),
        ("notes.tar.gz", ("notes.tar", ".gz")),
        ("README", ("README", "")),
    ],
)
def test_split_name(name, expected):
    assert split_name(name) == expected


def test_hidden_and_image_paths(tmp_path):
    for name in ("._x.nii.gz", ".DS_Store", "Thumbs.db"):
        assert is_hidden(name) and not is_image_path(tmp_path / name)
    assert all(is_image_path(tmp_path / f"a{ext}") for ext in IMAGE_EXTENSIONS)
    assert not is_image_path(tmp_path / "a.txt")
    (tmp_path / "plain_dir").mkdir()
    assert not is_image_path(tmp_path / "plain_dir")
    save_dicom_series(tmp_path / "series", np.zeros((2, 4, 4)), (1, 1, 1), (0, 0, 0), tuple(np.eye(3).ravel()))
    assert is_image_path(tmp_path / "series")


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_nifti_round_trip_keeps_oblique_affine_and_codes(tmp_path, ext):
    array = np.random.default_rng(0).normal(size=(9, 7, 5)).astype(np.float32)
    source = save_nifti(tmp_path / f"src{ext}", array, OBLIQUE, codes=(1, 2))
    image = load_image(source)
    assert image.shape == (1, 9, 7, 5)
    assert image.meta["filename_or_obj"] == str(source)
    np.testing.assert_array_equal(image[0].numpy(), array)
    np.testing.assert_allclose(image.affine.numpy(), OBLIQUE)
    np.testing.assert_allclose(spacing_of(image), np.linalg.norm(OBLIQUE[:3, :3], axis=0))

    again = load_image(write_image(image, tmp_path / f"out{ext}"))
    _assert_same(image, again)
    header = nib.load(tmp_path / f"out{ext}").header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 2)


@pytest.mark.parametrize("ext", [".mha", ".mhd", ".nrrd", ".nhdr"])
def test_itk_formats_round_trip_keeps_direction(tmp_path, ext):
    array_zyx = np.random.default_rng(1).integers(-1000, 3000, (5, 7, 9)).astype(np.int16)
    source = sitk.GetImageFromArray(array_zyx)
    source.SetSpacing((0.7, 0.9, 2.5))
    source.SetOrigin((-20.0, 14.5, 3.0))
    source.SetDirection(tuple(DIRECTION.ravel()))
    sitk.WriteImage(source, str(tmp_path / f"src{ext}"))

    image = load_image(tmp_path / f"src{ext}")
    assert image.shape == (1, 9, 7, 5)  # x-first, as NibabelReader
    np.testing.assert_array_equal(image[0].numpy(), array_zyx.T)
    np.testing.assert_allclose(spacing_of(image), (0.7, 0.9, 2.5))
    # RAS affine = LPS->RAS flip of ITK's direction * spacing and origin
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.block(
        [[DIRECTION @ np.diag([0.7, 0.9, 2.5]), np.array([[-20.0], [14.5], [3.0]])], [np.zeros((1, 3)), 1.0]]
    )
    np.testing.assert_allclose(image.affine.numpy(), expected, atol=1e-6)

    written = write_image(image, tmp_path / f"out{ext}")
    _assert_same(image, load_image(written))
    for got, want in zip(_sitk_geometry(written), _sitk_geometry(tmp_path / f"src{ext}")):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_nifti_and_mha_load_identically(tmp_path):
    array = np.random.default_rng(2).random((6, 5, 4)).astype(np.float32)
    nifti = load_image(save_nifti(tmp_path / "a.nii.gz", array, OBLIQUE))
    mha = load_image(write_image(nifti, tmp_path / "a.mha"))
    _assert_same(nifti, mha)
    back = load_image(write_image(mha, tmp_path / "b.nii.gz"))  # and back: scanner codes for a non-NIfTI source
    _assert_same(nifti, back)
    assert int(nib.load(tmp_path / "b.nii.gz").header["sform_code"]) == 1


def test_dicom_series_directory(tmp_path):
    volume = np.random.default_rng(3).integers(-500, 1500, (4, 6, 5)).astype(np.int16)
    direction = tuple(DIRECTION.ravel())
    source = save_dicom_series(tmp_path / "series", volume, (0.6, 0.7, 1.5), (10.0, -4.0, 2.0), direction)

    image = load_image(tmp_path / "series")
    assert image.shape == (1, 5, 6, 4)
    np.testing.assert_array_equal(image[0].numpy(), volume.T)
    np.testing.assert_allclose(spacing_of(image), (0.6, 0.7, 1.5), atol=1e-4)
    for ext in (".nii.gz", ".mha"):  # DICOM is read only: the geometry survives into the writable formats
        written = write_image(image, tmp_path / f"out{ext}")
        _assert_same(image, load_image(written), atol=0)
    for got, want in zip(_sitk_geometry(tmp_path / "out.mha"), (source.GetSpacing(), source.GetOrigin(), direction)):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize(
    ("ext", "array"),
    [
        (".png", np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)),
        (".png", (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)),
        (".png", np.random.default_rng(4).integers(0, 256, (12, 10, 3)).astype(np.uint8)),
        (".tif", np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)),
        (".tif", (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)),
        (".tiff", np.random.default_rng(5).integers(0, 65536, (12, 10, 3)).astype(np.uint16)),
        (".tif", np.random.default_rng(6).random((12, 10)).astype(np.float32)),
    ],
    ids=["png8", "png16", "png-rgb", "tif8", "tif16", "tif16-rgb", "tif-float"],
)
def test_raster_round_trip_and_axis_convention(tmp_path, ext, array):
    source = tmp_path / f"src{ext}"
    if ext == ".png":
        Image.fromarray(array).save(source)
    else:
        tifffile.imwrite(source, array, photometric="rgb" if array.ndim == 3 else "minisblack")
    image = load_image(source)
    rows, cols = array.shape[:2]
    channels = array.shape[2] if array.ndim == 3 else 1
    assert image.shape == (channels, cols, rows)  # [C, x, y]: x runs along the width
    expected = np.moveaxis(array, -1, 0) if array.ndim == 3 else array[None]
    np.testing.assert_array_equal(image.numpy(), expected.transpose(0, 2, 1))

    written = write_image(image, tmp_path / f"out{ext}", dtype=array.dtype)
    reread = np.asarray(Image.open(written)) if ext == ".png" else tifffile.imread(written)
    np.testing.assert_array_equal(reread, array)  # the file on disk is the source image, same orientation
    _assert_same(image, load_image(written))


def test_jpeg_within_tolerance(tmp_path):
    yy, xx = np.mgrid[0:24, 0:20]
    array = np.stack([xx * 10, yy * 8, np.full_like(xx, 128)], -1).astype(np.uint8)  # smooth: JPEG-friendly
    Image.fromarray(array).save(tmp_path / "src.jpg", quality=95)
    image = load_image(tmp_path / "src.jpg")
    assert image.shape == (3, 20, 24)
    np.testing.assert_allclose(image.numpy(), np.moveaxis(array, -1, 0).transpose(0, 2, 1), atol=12)
    again = load_image(write_image(image, tmp_path / "out.jpeg"))
    _assert_same(image, again, atol=12)


def test_png_and_2d_nifti_share_the_convention(tmp_path):
    array = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4)  # 6 rows, 4 columns
    Image.fromarray(array).save(tmp_path / "a.png")
    save_nifti(tmp_path / "a.nii.gz", array.T.copy())  # NIfTI stores x (columns) first
    np.testing.assert_array_equal(load_image(tmp_path / "a.png").numpy(), load_image(tmp_path / "a.nii.gz").numpy())


def test_palette_png_loads_indices(tmp_path):
    indices = np.arange(12, dtype=np.uint8).reshape(3, 4) % 3
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "mask.png")
    np.testing.assert_array_equal(load_image(tmp_path / "mask.png")[0].numpy(), indices.T)


def test_tiff_channels_and_stacks(tmp_path):
    image = MetaTensor(torch.rand(2, 5, 4, 3))  # 2 channels, 3D: written as C Z Y X pages
    again = load_image(write_image(image, tmp_path / "stack.tif"))
    assert again.shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(again.numpy(), image.numpy())


def test_channel_files_are_stacked(tmp_path):
    a, b = np.zeros((4, 3, 2), np.float32), np.ones((4, 3, 2), np.float32)
    paths = [save_nifti(tmp_path / "x_0000.nii.gz", a), save_nifti(tmp_path / "x_0001.nii.gz", b)]
    image = load_image(paths)
    assert image.shape == (2, 4, 3, 2)
    np.testing.assert_array_equal(image[1].numpy(), b)

    label = save_nifti(tmp_path / "x.nii.gz", np.ones((4, 3, 2), np.uint8))
    item = Compose(load_transforms())({"image": [str(p) for p in paths], "label": str(label)})
    assert item["image"].shape == (2, 4, 3, 2) and item["label"].shape == (1, 4, 3, 2)
    assert item["label"].meta["filename_or_obj"] == str(label)


def test_load_transforms_read_every_format(tmp_path):
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "rgb.png")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 6), np.uint8)), str(tmp_path / "lab.nrrd"))
    load = Compose(load_transforms(("image", "label")))
    assert load({"image": str(tmp_path / "rgb.png"), "label": str(tmp_path / "lab.nrrd")})["image"].shape == (3, 6, 4)
    load = Compose(load_transforms(("image", "label"), allow_missing_keys=True))
    assert "label" not in load({"image": str(tmp_path / "lab.nrrd")})


def test_write_label_uses_compact_dtypes(tmp_path):
    labels = torch.zeros(1, 6, 5, 4, dtype=torch.int64)
    labels[0, 1, 1, 1] = 300
    write_label(labels, tmp_path / "inst.nii.gz", meta={"affine": OBLIQUE})
    stored = nib.load(tmp_path / "inst.nii.gz")
    assert stored.get_data_dtype() == np.uint16
    np.testing.assert_allclose(stored.affine, OBLIQUE, atol=1e-6)
    write_label(labels.clamp(max=2).float(), tmp_path / "sem.mha")
    assert sitk.ReadImage(str(tmp_path / "sem.mha")).GetPixelID() == sitk.sitkUInt8
    with pytest.raises(DataError, match="integer"):
        write_label(torch.full((1, 3, 3), 0.5), tmp_path / "bad.png")


def test_spatial_rank_from_meta_and_channel_first_default(tmp_path):
    meta = {"affine": np.eye(4), "spatial_shape": (5, 4, 3)}
    write_image(np.zeros((5, 4, 3), np.uint8), tmp_path / "no_channel.nii.gz", meta)  # [*spatial] with meta
    assert load_image(tmp_path / "no_channel.nii.gz").shape == (1, 5, 4, 3)
    write_image(np.zeros((2, 5, 4)), tmp_path / "channels.tif")  # no meta: channel-first
    assert load_image(tmp_path / "channels.tif").shape == (2, 5, 4)
    with pytest.raises(DataError, match="spatial dims"):
        write_image(np.zeros((2, 2, 5, 4, 3)), tmp_path / "bad.nii.gz", meta)


def test_writes_are_atomic_and_leave_nothing_behind(tmp_path):
    target = tmp_path / "out" / "pred.mhd"
    write_image(np.zeros((1, 4, 4, 2), np.uint8), target)
    write_image(np.ones((1, 4, 4, 2), np.uint8), target)  # replaces the old pair
    assert sorted(os.listdir(target.parent)) == ["pred.mhd", "pred.zraw"]
    assert load_image(target).max() == 1

    png = tmp_path / "out" / "keep.png"
    write_image(np.full((1, 3, 3), 7, np.uint8), png)
    with pytest.raises(DataError, match="uint8/uint16"):
        write_image(np.full((1, 3, 3), 0.5, np.float32), png)  # a failed write keeps the old file
    assert load_image(png).max() == 7
    assert sorted(os.listdir(png.parent)) == ["keep.png", "pred.mhd", "pred.zraw"]


def test_unsupported_and_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported"):
        load_image(tmp_path / "notes.txt")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="broken.nii.gz: cannot read"):
        load_image(tmp_path / "broken.nii.gz")
    with pytest.raises(DataError, match="cannot write"):
        write_image(np.zeros((1, 2, 2)), tmp_path / "x.bmp")


@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".tif", ".png"])
def test_compression_level_changes_size_not_content(tmp_path, ext):
    """Level 0 stores, 9 squeezes: the same labels and geometry come back, the files differ in size."""
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 36, 12) if ext != ".png" else (64, 48)) < 0.2).astype(np.uint8)
    labels[:10] = 0  # something to compress
    meta = {"affine": torch.from_numpy(OBLIQUE)} if ext in (".nii.gz", ".mha") else {}
    sizes = {}
    for level in (0, 9, None):
        path = write_label(labels[None], tmp_path / f"l{level}{ext}", meta) if level is None else write_image(
            labels[None], tmp_path / f"l{level}{ext}", meta, dtype=np.uint8, compression_level=level)
        again = load_image(path)
        np.testing.assert_array_equal(again[0].numpy(), labels)
        if meta:
            np.testing.assert_allclose(again.affine.numpy(), OBLIQUE, atol=1e-5)
        sizes[level] = path.stat().st_size
    assert sizes[9] < sizes[None] <= sizes[0] if ext != ".mha" else sizes[9] < sizes[0]
    with pytest.raises(DataError, match="compression level must be 0..9"):
        write_image(labels, tmp_path / f"bad{ext}", meta, compression_level=11)
