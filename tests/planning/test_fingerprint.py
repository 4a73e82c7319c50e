import json
import os

import nibabel as nib
import numpy as np
import pytest

from medseg.data.datalist import discover
from medseg.errors import DataError
from medseg.planning.fingerprint import _objects, fingerprint_dataset, modality_of


def test_cells_2d(cells_2d, tmp_path):
    fp, reused = fingerprint_dataset(cells_2d, tmp_path / "fingerprint.json")
    assert not reused and (tmp_path / "fingerprint.json").is_file()
    assert fp.spatial_dims == 2 and fp.label_kind == "instance" and len(fp.cases) == 4
    assert all(c.shape == [96, 96] and c.spacing == [1.0, 1.0] for c in fp.cases)
    assert fp.modality == "other"
    (ch,) = fp.channels
    assert ch.integer_valued and ch.bits in (8, 16)
    assert ch.min <= ch.percentile_00_5 <= ch.mean <= ch.percentile_99_5 <= ch.max
    assert sum(fp.class_fractions.values()) == pytest.approx(1.0)
    objects = fp.objects
    assert objects.count > 4 and 0.0 <= objects.touching_share <= 1.0
    assert objects.diameter["p10"] <= objects.diameter["median"] <= objects.diameter["p90"]
    assert len(objects.extent["median"]) == 2
    # a disc's bounding box is about its diameter: the two measures agree within a factor of two
    assert 0.5 < np.mean(objects.extent["median"]) / objects.diameter["median"] < 2.0


def test_anisotropic_lesions(lesions_aniso, tmp_path):
    fp, _ = fingerprint_dataset(lesions_aniso, tmp_path / "fp.json")
    assert fp.spatial_dims == 3 and fp.objects is None
    assert fp.median_shape == [40, 40, 10]
    np.testing.assert_allclose(fp.median_spacing, [0.8, 0.8, 4.0], rtol=1e-5)
    assert fp.modality == "CT" and fp.channels[0].bits is None  # CT: signed HU
    assert set(fp.class_fractions) == {"0", "1"} and 0 < fp.class_fractions["1"] < 0.5


def test_two_channels_foreground_statistics(two_channel):
    fp, _ = fingerprint_dataset(two_channel)
    assert fp.channel_names == ["T1", "FLAIR"] and fp.modality == "MR"
    a, b = fp.channels
    assert a.max == 1000.0  # the background exists ...
    assert a.percentile_99_5 < 99.0  # ... but the statistics see the foreground only
    assert b.mean == pytest.approx(10 * a.mean + 5, rel=1e-6)
    assert b.std == pytest.approx(10 * a.std, rel=1e-6)
    assert b.percentile_00_5 == pytest.approx(10 * a.percentile_00_5 + 5, rel=1e-5)
    assert not a.integer_valued
    assert fp.cases[0].spacing == [1.0, 1.0, 1.5]
    assert set(fp.class_fractions) == {"0", "1", "2"}


def test_objects_touching_and_extents():
    inst = np.zeros((10, 12), np.int32)
    inst[1:3, 1:4] = 1  # 2 x 3, touches 2
    inst[3:5, 1:3] = 2  # 2 x 2
    inst[7:9, 7:11] = 3  # alone
    diameters, extents, touching, count = _objects(inst)
    assert count == 3 and touching == {1, 2}
    assert sorted(map(tuple, extents)) == [(2, 2), (2, 3), (2, 4)]
    np.testing.assert_allclose(diameters[0], 2 * np.sqrt(6 / np.pi))


def test_reused_while_the_content_is_unchanged(two_channel):
    path = two_channel / "fingerprint.json"
    first, reused = fingerprint_dataset(two_channel)
    assert not reused
    label = two_channel / "labelsTr" / "case0.nii.gz"
    os.utime(label, ns=(1, 1))  # only the modification time changes: the content digest matches
    again, reused = fingerprint_dataset(two_channel)
    assert reused and again.digest == first.digest
    assert json.loads(path.read_text())["files"]["labelsTr/case0.nii.gz"][1] == 1  # new time remembered
    image = nib.load(label)
    array = np.asarray(image.dataobj).copy()
    array[0, 0, 0] = 2  # new content
    nib.save(nib.Nifti1Image(array, image.affine), label)
    changed, reused = fingerprint_dataset(two_channel)
    assert not reused and changed.digest != first.digest


def test_fingerprint_file_is_not_a_case(two_channel):
    fingerprint_dataset(two_channel)
    info = discover(two_channel)
    assert len(info.cases) == 3 and not [p for p in info.problems if p.severity == "error"]


def test_a_missing_label_names_the_file(two_channel):
    (two_channel / "labelsTr" / "case2.nii.gz").unlink()
    with pytest.raises(DataError, match="case2"):
        fingerprint_dataset(two_channel)


@pytest.mark.parametrize("name, kind", [("CT", "CT"), ("ct", "CT"), ("T2w", "MR"), ("FLAIR", "MR"),
                                        ("fluorescence", "other"), ("rgb", "other")])
def test_modality(name, kind):
    assert modality_of(name) == kind
