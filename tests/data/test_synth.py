"""Synthetic datasets: determinism, MSD layout, and the properties each dataset promises."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from medseg.data.readers import load_image, spacing_of
from medseg.data.synth import make_cells, make_lesions
from medseg.errors import ConfigError

KEYS = {
    "name",
    "description",
    "channel_names",
    "labels",
    "numTraining",
    "numTest",
    "file_ending",
    "label_kind",
    "tensorImageSize",
    "training",
    "test",
}


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    return make_cells(tmp_path_factory.mktemp("cells") / "ds", n=3, n_test=1, seed=0)


@pytest.fixture(scope="module")
def lesions3d(tmp_path_factory) -> Path:
    return make_lesions(tmp_path_factory.mktemp("les3") / "ds", n=3, n_test=1, seed=0, dims=3)


@pytest.fixture(scope="module")
def lesions2d(tmp_path_factory) -> Path:
    return make_lesions(tmp_path_factory.mktemp("les2") / "ds", n=3, n_test=1, seed=0, dims=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*s[TrTs]*/*"))}


def _touching_pairs(label: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for a, b in ((label[:-1], label[1:]), (label[:, :-1], label[:, 1:])):
        m = (a != b) & (a > 0) & (b > 0)
        pairs |= set(zip(a[m].tolist(), b[m].tolist()))
    return pairs


def _read(path: Path) -> np.ndarray:
    if path.name.endswith(".nii.gz"):
        return np.asarray(nib.load(path).dataobj)
    return tifffile.imread(path) if path.suffix == ".tif" else np.asarray(Image.open(path))


# ------------------------------------------------------------------------------- layout, determinism
@pytest.mark.parametrize("kind", ["cells", "lesions3d", "lesions2d"])
def test_dataset_json_lists_existing_pairs(kind, request):
    root = request.getfixturevalue(kind)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta.keys() >= KEYS
    assert (meta["numTraining"], meta["numTest"]) == (len(meta["training"]), len(meta["test"])) == (3, 1)
    assert meta["labels"]["background"] == 0 and "0" in meta["channel_names"]
    assert meta["label_kind"] == ("instance" if kind == "cells" else "semantic")
    assert meta["tensorImageSize"] == ("3D" if kind == "lesions3d" else "2D")
    for split, folder in (("training", "Tr"), ("test", "Ts")):
        for entry in meta[split]:
            image, label = root / entry["image"], root / entry["label"]
            assert image.parent.name == f"images{folder}" and label.parent.name == f"labels{folder}"
            assert image.name == label.name.replace(meta["file_ending"], "_0000" + meta["file_ending"])
            label_shape = _read(label).shape
            assert _read(image).shape[: len(label_shape)] == label_shape


def test_same_seed_same_bytes_other_seed_differs(cells, tmp_path):
    again = make_cells(tmp_path / "again", n=3, n_test=1, seed=0)
    assert _files(again) == _files(cells)
    other = make_cells(tmp_path / "other", n=3, n_test=1, seed=1)
    for name, data in _files(other).items():
        assert data != _files(cells)[name], name


def test_fewer_cases_are_a_prefix_and_test_cases_do_not_depend_on_n(cells, lesions3d, tmp_path):
    small = _files(make_cells(tmp_path / "c", n=2, n_test=1, seed=0))
    assert small == {k: v for k, v in _files(cells).items() if "_002" not in k}
    small = _files(make_lesions(tmp_path / "l", n=1, n_test=1, seed=0))
    assert small == {k: v for k, v in _files(lesions3d).items() if not ("_001" in k or "_002" in k)}


def test_regenerating_removes_only_stale_cases_it_wrote(tmp_path):
    root = make_cells(tmp_path / "ds", n=2, size=(96, 96), diameter=(8, 16))
    (root / "imagesTr" / "mine.tif").write_bytes(b"keep")
    make_cells(root, n=1, size=(96, 96), diameter=(8, 16))
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["cells_000_0000.tif", "mine.tif"]
    assert [p.name for p in (root / "labelsTr").iterdir()] == ["cells_000.tif"]


# ------------------------------------------------------------------------------------------ cells
def test_cells_are_consecutive_touching_instances(cells):
    for path in sorted((cells / "labelsTr").glob("*.tif")) + sorted((cells / "labelsTs").glob("*.tif")):
        label = tifffile.imread(path)
        assert label.dtype == np.uint16
        k = int(label.max())
        assert 20 <= k <= 100
        np.testing.assert_array_equal(np.unique(label), np.arange(k + 1))
        assert len(_touching_pairs(label)) >= 5, "clusters should hold nuclei that share a border"
        for i, box in enumerate(ndi.find_objects(label), start=1):
            assert ndi.label(label[box] == i)[1] == 1, f"nucleus {i} of {path.name} is split"
        image = tifffile.imread(
            path.parent.parent / f"images{path.parent.name[-2:]}" / path.name.replace(".tif", "_0000.tif")
        )
        assert image.dtype == np.uint16 and image.shape == label.shape
        assert image[label > 0].mean() > 2 * image[label == 0].mean()


def test_cells_sizes_stay_in_the_declared_range(tmp_path):
    root = make_cells(tmp_path / "ds", n=2, size=(160, 192), diameter=(12, 24), nuclei=(40, 60))
    for path in (root / "labelsTr").glob("*.tif"):
        label = tifffile.imread(path)
        diameters = np.sqrt(4 * np.bincount(label.ravel())[1:] / np.pi)
        assert diameters.min() >= 0.8 * 12 and diameters.max() <= 1.1 * 24
        assert diameters.max() > 18 and diameters.min() < 16  # the range is used, not one size


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"n": 0}, "n"),
        ({"n_test": -1}, "n_test"),
        ({"seed": -3}, "seed"),
        ({"size": (64,)}, "size"),
        ({"diameter": (30, 10)}, "diameter"),
    ],
)
def test_cells_reject_bad_arguments(tmp_path, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        make_cells(tmp_path / "ds", **kwargs)


# ---------------------------------------------------------------------------------------- lesions
def test_lesions3d_geometry_is_anisotropic_and_rotated(lesions3d):
    for path in sorted((lesions3d / "imagesTr").glob("*.nii.gz")):
        image = nib.load(path)
        label = nib.load(lesions3d / "labelsTr" / path.name.replace("_0000", ""))
        np.testing.assert_allclose(label.affine, image.affine)
        rotation = image.affine[:3, :3] / np.asarray(image.header.get_zooms())
        assert not np.allclose(rotation, np.eye(3), atol=1e-3), "affine should be rotated"
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)
        np.testing.assert_allclose(image.header.get_zooms(), (0.8, 0.8, 2.5), rtol=1e-6)
        assert image.shape == (96, 96, 32) and np.any(image.affine[:3, 3] != 0)
        assert image.get_data_dtype() == np.int16


def test_lesions3d_labels_hold_one_to_three_contrasting_lesions(lesions3d):
    for path in sorted((lesions3d / "labelsTr").glob("*.nii.gz")):
        label = np.asarray(nib.load(path).dataobj)
        image = np.asarray(nib.load(lesions3d / "imagesTr" / path.name.replace(".nii", "_0000.nii")).dataobj)
        assert set(np.unique(label)) == {0, 1}
        parts, count = ndi.label(label, structure=np.ones((3, 3, 3)))
        assert 1 <= count <= 3
        for i in range(1, count + 1):
            inside = parts == i
            shell = ndi.binary_dilation(inside, iterations=4) & ~ndi.binary_dilation(inside, iterations=1)
            assert abs(image[inside].mean() - image[shell].mean()) > 8, f"lesion {i} of {path.name} is invisible"


def test_lesions2d_are_rgb_with_one_to_three_lesions(lesions2d):
    for path in sorted((lesions2d / "labelsTr").glob("*.png")):
        label = np.asarray(Image.open(path))
        image = np.asarray(Image.open(lesions2d / "imagesTr" / path.name.replace(".png", "_0000.png")))
        assert image.shape == (*label.shape, 3) and image.dtype == np.uint8
        assert set(np.unique(label)) == {0, 1}
        assert 1 <= ndi.label(label, structure=np.ones((3, 3)))[1] <= 3
        assert image[label == 1].mean() < image[label == 0].mean()  # pigmented: darker than skin


def test_sizes_and_spacing_are_x_y_z_as_medseg_loads_them(tmp_path):
    """One axis convention (README, "Axes"): ``size`` is the shape of the array medseg loads."""
    volume = load_image(sorted((make_lesions(tmp_path / "l3", n=1, size=(40, 36, 16)) / "imagesTr").iterdir())[0])
    assert tuple(volume.shape) == (1, 40, 36, 16)
    np.testing.assert_allclose(spacing_of(volume), (0.8, 0.8, 2.5), rtol=1e-5)
    rgb = load_image(sorted((make_lesions(tmp_path / "l2", n=1, dims=2, size=(64, 48)) / "imagesTr").iterdir())[0])
    assert tuple(rgb.shape) == (3, 64, 48)
    cells = make_cells(tmp_path / "c", n=1, size=(96, 64), diameter=(8, 16))
    assert tuple(load_image(sorted((cells / "labelsTr").iterdir())[0]).shape) == (1, 96, 64)
    thick_x = make_lesions(tmp_path / "lx", n=1, size=(16, 40, 40), spacing=(2.5, 0.8, 0.8))
    assert spacing_of(load_image(sorted((thick_x / "imagesTr").iterdir())[0]))[0] == pytest.approx(2.5, rel=1e-5)


def test_lesions_reject_bad_dims_and_size(tmp_path):
    with pytest.raises(ConfigError, match="dims"):
        make_lesions(tmp_path / "ds", dims=4)
    with pytest.raises(ConfigError, match="size"):
        make_lesions(tmp_path / "ds", dims=2, size=(32, 96, 96))


# ------------------------------------------------------------------------------- touching clusters
def _groups(label: np.ndarray, connectivity: int) -> list[np.ndarray]:
    """The nucleus ids of each connected piece of foreground (4- or 8-connected)."""
    structure = ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    pieces, n = ndi.label(label > 0, structure)
    return [np.unique(label[pieces == i]) for i in range(1, n + 1)]


def _labels(root: Path) -> list[np.ndarray]:
    return [tifffile.imread(p) for p in sorted((root / "labelsTr").glob("*.tif"))]


def test_clusters_touch_with_no_background_between_and_groups_stay_apart(tmp_path):
    root = make_cells(tmp_path / "ds", n=3, size=(160, 160), diameter=(10, 24), clusters=1.0, cluster_size=(2, 4))
    for label in _labels(root):
        groups = _groups(label, 4)
        assert len(groups) >= 3 and all(2 <= g.size <= 4 for g in groups), [g.size for g in groups]
        # Every nucleus shares an edge (4-adjacent pixels) with another nucleus of its cluster.
        touching = {i for pair in _touching_pairs(label) for i in pair}
        assert touching == set(range(1, int(label.max()) + 1))
        # Distinct clusters keep background between them, even diagonally: 8-connected pieces are the same.
        assert len(_groups(label, 8)) == len(groups)
        np.testing.assert_array_equal(np.unique(label), np.arange(label.max() + 1))  # ids 1..K, unique


def test_without_clusters_every_nucleus_stands_alone(tmp_path):
    root = make_cells(tmp_path / "ds", n=2, size=(128, 128), diameter=(8, 20), clusters=0.0)
    for label in _labels(root):
        assert all(g.size == 1 for g in _groups(label, 8)) and not _touching_pairs(label)


def test_default_mix_clusters_about_half_the_nuclei(cells):
    in_clusters = total = 0
    sizes = set()
    for label in _labels(cells):
        for g in _groups(label, 4):
            total += g.size
            in_clusters += g.size if g.size > 1 else 0
            sizes.add(g.size)
    assert 0.3 <= in_clusters / total <= 0.7, in_clusters / total
    assert {1, 2, 3} <= sizes and max(sizes) <= 5
    meta = json.loads((cells / "dataset.json").read_text())
    assert meta["clusters"] == 0.5 and meta["cluster_size"] == [2, 5]


def test_cluster_options_change_the_data_and_stay_deterministic(tmp_path):
    a = _files(make_cells(tmp_path / "a", n=1, size=(96, 96), diameter=(8, 16), clusters=0.8, seed=4))
    b = _files(make_cells(tmp_path / "b", n=1, size=(96, 96), diameter=(8, 16), clusters=0.8, seed=4))
    c = _files(make_cells(tmp_path / "c", n=1, size=(96, 96), diameter=(8, 16), clusters=0.2, seed=4))
    assert a == b and a != c
