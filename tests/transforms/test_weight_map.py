"""Border weight map (Ronneberger et al. 2015): the fast version against the naive reference, and by hand."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage as ndi

from medseg.transforms import BorderWeightMapd, ClassWeightMapd, InstanceToSemanticd, weight_map
from medseg.transforms.functional import instances_to_semantic
from medseg.transforms.weight_map import border_cutoff, border_term, border_weight_map, class_balance_map
from tests.transforms.reference import naive_border_term, naive_border_weight_map, touching_nuclei


def random_blobs(shape, n, seed):
    """Separate and overlapping random blobs of random (non-contiguous) ids; later blobs overwrite."""
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int64)
    grid = np.indices(shape)
    for _ in range(n):
        centre = [rng.uniform(0, s) for s in shape]
        radius = rng.uniform(1.5, 7)
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) < radius**2
        inst[inside] = rng.integers(1, 10_000)
    return inst


def edge_objects(shape):
    """Objects touching the image edges and each other, a thin one and a one-pixel one."""
    inst = np.zeros(shape, np.int64)
    inst[:5] = 3  # full first rows: touches three edges
    inst[5:9, :7] = 8  # touches object 3 and the left edge
    inst[-1, -1] = 5  # single pixel in the far corner
    inst[12:, 20] = 4  # thin line down to the bottom edge
    return inst


CASES = {
    "touching_2d": lambda: touching_nuclei((96, 80), 30, 9, seed=1),
    "touching_2d_dense": lambda: touching_nuclei((64, 64), 40, 12, seed=2),
    "random_blobs_2d": lambda: random_blobs((70, 90), 25, seed=3),
    "edge_objects_2d": lambda: edge_objects((30, 40)),
    "two_far_apart_2d": lambda: (
        np.pad(np.ones((2, 2), np.int64), ((0, 60), (0, 60))) + np.pad(np.full((2, 2), 2, np.int64), ((60, 0), (60, 0)))
    ),
    "touching_3d": lambda: touching_nuclei((20, 28, 24), 15, 6, seed=4),
    "random_blobs_3d": lambda: random_blobs((18, 22, 26), 12, seed=5),
    "all_foreground": lambda: touching_nuclei((20, 20), 5, 100, seed=6),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_equals_naive(case):
    inst = CASES[case]()
    fast = border_weight_map(inst)
    naive = naive_border_weight_map(inst)
    np.testing.assert_allclose(fast, naive, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_objects", [0, 1])
def test_fewer_than_two_objects_gives_class_weight_only(n_objects):
    inst = np.zeros((30, 30), np.int64)
    if n_objects:
        inst[5:10, 5:10] = 7
    np.testing.assert_array_equal(border_term(inst), 0)
    np.testing.assert_allclose(border_weight_map(inst), naive_border_weight_map(inst), atol=1e-6)


@pytest.mark.parametrize(
    ("w0", "sigma", "spacing"),
    [(10.0, 5.0, (0.5, 1.5)), (3.0, 2.0, None), (25.0, 8.0, (1.0, 1.0)), (10.0, 3.0, (2.0, 0.7, 1.3))],
)
def test_fast_equals_naive_parameters_and_physical_spacing(w0, sigma, spacing):
    shape = (40, 50) if spacing is None or len(spacing) == 2 else (14, 30, 20)
    inst = touching_nuclei(shape, 14, 7, seed=7)
    fast = border_term(inst, w0=w0, sigma=sigma, spacing=spacing)
    np.testing.assert_allclose(fast, naive_border_term(inst, w0, sigma, spacing), atol=1e-4, rtol=0)


def test_fast_equals_naive_with_a_border_class_for_class_balance():
    inst = touching_nuclei((60, 60), 20, 9, seed=8)
    classes = instances_to_semantic(inst, "cell_border")
    np.testing.assert_allclose(
        border_weight_map(inst, classes=classes), naive_border_weight_map(inst, classes=classes), atol=1e-4
    )


def test_two_squares_give_the_formula_between_them():
    # Squares in columns 10..19 and 30..39 of the same rows: every gap pixel in those rows is at
    # distance c - 19 from one and 30 - c from the other, so d1 + d2 = 11.
    inst = np.zeros((40, 60), np.int64)
    inst[15:25, 10:20] = 1
    inst[15:25, 30:40] = 2
    w = border_weight_map(inst, w0=10.0, sigma=5.0, class_balance=False)
    expected = 1.0 + 10.0 * math.exp(-(11.0**2) / (2 * 5.0**2))
    np.testing.assert_allclose(w[15:25, 20:30], expected, atol=1e-5)
    assert w[20, 25] == pytest.approx(1.889, abs=1e-3)  # the midpoint, by hand: 1 + 10 e^(-121/50)
    np.testing.assert_array_equal(w[inst > 0], 1.0)  # objects: w_c only


def test_background_far_from_objects_gets_class_weight_only():
    inst = np.zeros((150, 150), np.int64)
    inst[2:8, 2:8] = 1
    inst[2:8, 10:16] = 2
    w = border_weight_map(inst)
    wc = class_balance_map(inst > 0)
    far = ndi.distance_transform_edt(inst == 0) > border_cutoff(10.0, 5.0)
    assert far.sum() > 10_000
    np.testing.assert_array_equal(w[far], wc[far])


def test_class_balance_gives_every_class_the_same_total_weight():
    classes = np.zeros((20, 30), np.int64)
    classes[:5] = 1
    classes[5:6] = 2
    wc = class_balance_map(classes)
    assert wc.mean() == pytest.approx(1.0)
    totals = [wc[classes == c].sum() for c in range(3)]
    np.testing.assert_allclose(totals, wc.size / 3, rtol=1e-5)


def test_ids_need_not_be_contiguous_or_small():
    inst = touching_nuclei((40, 40), 12, 8, seed=9)
    sparse = np.where(inst > 0, inst * 1_000_003 + 17, 0)
    np.testing.assert_allclose(border_term(sparse), border_term(inst), atol=1e-6)


def test_rejects_non_integer_or_negative_ids():
    with pytest.raises(ValueError, match="whole numbers"):
        border_term(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="non-negative"):
        border_term(np.array([[-1, 1]]))


def meta_instance(inst, spacing):
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return MetaTensor(torch.as_tensor(inst, dtype=torch.float32)[None], affine=affine, meta={"filename_or_obj": "x"})


@pytest.mark.parametrize("dims", [2, 3])
def test_border_weight_mapd_writes_a_float_weight_key_and_keeps_meta(dims):
    shape = (40, 40) if dims == 2 else (16, 20, 20)
    inst = touching_nuclei(shape, 10, 6, seed=10)
    data = {"instance": meta_instance(inst, [1.0] * dims)}
    out = BorderWeightMapd("instance", weight_key="weight")(data)
    assert isinstance(out["weight"], MetaTensor)
    assert out["weight"].dtype == torch.float32 and tuple(out["weight"].shape) == (1, *shape)
    assert out["weight"].meta["filename_or_obj"] == "x"
    np.testing.assert_allclose(out["weight"][0].numpy(), naive_border_weight_map(inst), atol=1e-4)
    assert out["instance"] is data["instance"]


def test_physical_units_read_the_spacing_from_the_affine():
    inst = touching_nuclei((40, 50), 12, 7, seed=11)
    data = {"instance": meta_instance(inst, [0.5, 2.0])}
    out = BorderWeightMapd("instance", sigma=4.0, physical_units=True, class_balance=False)(data)
    expected = 1.0 + naive_border_term(inst, 10.0, 4.0, spacing=(0.5, 2.0))
    np.testing.assert_allclose(out["weight"][0].numpy(), expected, atol=1e-4)


def test_class_key_feeds_the_class_balance():
    inst = touching_nuclei((40, 40), 10, 8, seed=12)
    data = InstanceToSemanticd("instance", "label", mode="cell_border")({"instance": meta_instance(inst, [1, 1])})
    out = BorderWeightMapd("instance", class_key="label")(data)
    expected = naive_border_weight_map(inst, classes=data["label"][0].numpy().astype(int))
    np.testing.assert_allclose(out["weight"][0].numpy(), expected, atol=1e-4)


def test_class_weight_mapd_and_missing_keys():
    label = meta_instance(np.array([[0, 0, 1, 1], [0, 0, 0, 2]]), [1, 1])
    out = ClassWeightMapd("label")({"label": label})
    np.testing.assert_allclose(out["weight"][0].numpy(), class_balance_map(label[0].numpy().astype(int)))
    assert BorderWeightMapd("instance", allow_missing_keys=True)({"image": 1}) == {"image": 1}


def test_cell_border_separates_touching_cells():
    inst = touching_nuclei((60, 60), 15, 10, seed=13)
    sem = instances_to_semantic(inst, "cell_border")
    assert set(np.unique(sem)) <= {0, 1, 2}
    np.testing.assert_array_equal(sem > 0, inst > 0)
    # every interior is one piece of one cell, and no two cells' interiors touch
    pieces, count = ndi.label(sem == 1)
    owners = [set(np.unique(inst[pieces == p])) for p in range(1, count + 1)]
    assert all(len(o) == 1 for o in owners)
    assert len({next(iter(o)) for o in owners}) == count
    # a cell filling a whole row band has no border along the image edge
    edge = np.zeros((6, 6), np.int64)
    edge[:3] = 1
    assert (instances_to_semantic(edge)[0] == 1).all() and (instances_to_semantic(edge)[2] == 2).all()


def test_foreground_mode_and_border_width():
    inst = np.zeros((12, 12), np.int64)
    inst[2:10, 2:10] = 4
    np.testing.assert_array_equal(instances_to_semantic(inst, "foreground"), inst > 0)
    wide = instances_to_semantic(inst, "cell_border", border_width=2)
    assert (wide == 1).sum() == 16 and (wide == 2).sum() == 64 - 16


@pytest.mark.parametrize(("shape", "spacing", "rows"), [((300, 120), None, 130), ((90, 30, 40), (2.0, 1.0, 1.0), 70)])
def test_bands_of_large_images_give_the_whole_image_result(monkeypatch, shape, spacing, rows):
    inst = touching_nuclei(shape, 50, 8, seed=14)
    whole = border_term(inst, spacing=spacing)
    calls = []
    sweep = weight_map._two_nearest
    monkeypatch.setattr(weight_map, "_two_nearest", lambda *a: calls.append(1) or sweep(*a))
    monkeypatch.setattr(weight_map, "_BAND_PIXELS", int(np.prod(shape[1:])) * rows)
    np.testing.assert_array_equal(border_term(inst, spacing=spacing), whole)
    assert len(calls) > 1
    np.testing.assert_allclose(whole, naive_border_term(inst, spacing=spacing), atol=1e-4)
