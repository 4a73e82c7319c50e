"""Invariants of post-processing: touching cells split at the border class, geometry round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.postprocess import cell_instances, probabilities_to_labels, resample_to


def one_hot(labels: np.ndarray, classes: int = 3) -> np.ndarray:
    """Semantic labels (0 background, 1 cell, 2 border) -> ``K *S`` soft probabilities."""
    probs = np.full((classes, *labels.shape), 0.1 / (classes - 1), dtype=np.float32)
    for k in range(classes):
        probs[k][labels == k] = 0.9
    return probs


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def touching_discs(border: bool = True) -> np.ndarray:
    """Two overlapping discs; with ``border`` their outlines and the line where they meet are border class."""
    shape, centres = (40, 60), [(20, 20), (20, 40)]
    discs = [ball(shape, centre, 11) for centre in centres]
    labels = np.zeros(shape, dtype=np.uint8)
    labels[discs[0] | discs[1]] = 1
    if border:
        for disc, centre in zip(discs, centres):
            labels[disc & ~ball(shape, centre, 9.5)] = 2
        labels[:, 29:32][labels[:, 29:32] > 0] = 2
    return labels


def test_touching_discs_split_at_the_border_class():
    labels = touching_discs()
    instances = cell_instances(one_hot(labels))
    assert instances.dtype == np.uint16
    assert set(np.unique(instances)) == {0, 1, 2}
    # every foreground voxel (border included) belongs to a cell, and each disc centre to its own
    np.testing.assert_array_equal(instances > 0, labels > 0)
    assert instances[20, 20] != instances[20, 40]


def test_without_a_border_class_touching_discs_stay_one():
    labels = touching_discs(border=False)
    probs = one_hot(labels, classes=2)
    assert set(np.unique(cell_instances(probs, border_class=None))) == {0, 1}


def test_single_disc_is_one_instance_and_empty_is_all_zeros():
    disc = ball((32, 32), (16, 16), 8).astype(np.uint8)
    assert set(np.unique(cell_instances(one_hot(disc)))) == {0, 1}
    empty = cell_instances(one_hot(np.zeros((16, 20), dtype=np.uint8)))
    assert empty.shape == (16, 20) and not empty.any()


def test_small_objects_are_removed_and_ids_stay_consecutive():
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[ball((40, 40), (10, 10), 5)] = 1
    labels[20:22, 20:22] = 1  # 4 voxels
    labels[ball((40, 40), (30, 30), 4)] = 1
    instances = cell_instances(one_hot(labels), min_size=8)
    assert instances[21, 21] == 0
    assert sorted(np.unique(instances)) == [0, 1, 2]
    assert len(np.unique(cell_instances(one_hot(labels), min_size=1))) == 4


def test_3d_touching_balls_from_a_tensor():
    shape = (24, 24, 40)
    a, b = ball(shape, (12, 12, 12), 7), ball(shape, (12, 12, 26), 7)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[a | b] = 1
    labels[:, :, 18:20][(a | b)[:, :, 18:20]] = 2
    instances = cell_instances(torch.from_numpy(one_hot(labels)))
    assert sorted(np.unique(instances)) == [0, 1, 2]
    assert instances[12, 12, 12] != instances[12, 12, 26]


def test_cell_instances_checks_its_arguments():
    with pytest.raises(ValueError, match="channels of the 2"):
        cell_instances(np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="floating K"):
        cell_instances(np.zeros((8, 8), dtype=np.float32))


def test_probabilities_to_labels():
    probs = np.random.default_rng(0).random((3, 5, 6, 7)).astype(np.float32)
    labels = probabilities_to_labels(probs)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, probs.argmax(0))
    np.testing.assert_array_equal(probabilities_to_labels(torch.from_numpy(probs)), labels)
    assert probabilities_to_labels(np.zeros((300, 2, 2), dtype=np.float32)).dtype == np.uint16
    np.testing.assert_array_equal(probabilities_to_labels(probs[:1]), probs[0] >= 0.5)


@pytest.mark.parametrize("shape, target", [((10, 13), (20, 26)), ((6, 9, 4), (18, 27, 12))])
def test_nearest_resampling_round_trips_and_keeps_ids(shape, target):
    labels = np.random.default_rng(0).integers(0, 5000, shape).astype(np.uint16)
    up = resample_to(labels, target)
    assert up.shape == target and up.dtype == np.uint16
    np.testing.assert_array_equal(resample_to(up, shape), labels)  # integer factors: down undoes up
    tensor = resample_to(torch.from_numpy(labels.astype(np.int32)), target)
    np.testing.assert_array_equal(tensor.numpy(), up)
    # identical to torch's nearest-exact on any factor
    odd = tuple(t - 3 for t in target)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(labels[None, None].astype(np.float32)), size=odd, mode="nearest-exact"
    )[0, 0].numpy()
    np.testing.assert_array_equal(resample_to(labels, odd), reference)


def test_linear_resampling_of_probabilities():
    probs = torch.rand(3, 8, 10, 6).softmax(0)
    out = resample_to(probs, (16, 15, 7), mode="linear")
    assert out.shape == (3, 16, 15, 7) and isinstance(out, torch.Tensor)
    torch.testing.assert_close(out.sum(0), torch.ones(16, 15, 7))  # a convex blend keeps the sum
    array = resample_to(probs.numpy().astype(np.float16), (16, 15, 7), mode="linear")
    assert isinstance(array, np.ndarray) and array.dtype == np.float32
    assert resample_to(probs, (8, 10, 6)) is probs
    constant = resample_to(np.full((9, 9), 0.25, dtype=np.float32), (4, 13), mode="linear")
    np.testing.assert_allclose(constant, 0.25)


def test_resample_checks_its_arguments():
    with pytest.raises(ValueError, match="integer"):
        resample_to(np.zeros((4, 4), dtype=np.uint8), (8, 8), mode="linear")
    with pytest.raises(ValueError, match="target_shape"):
        resample_to(np.zeros((4, 4), dtype=np.uint8), (8, 8, 8, 8))
    with pytest.raises(ValueError, match="mode"):
        resample_to(np.zeros((4, 4), dtype=np.float32), (8, 8), mode="cubic")
