"""Shared figures: overlays and learning curves are valid PNGs, written atomically, with no pyplot leaks."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from medseg.visualize import learning_curves, learning_curves_figure, middle_slice, overlay_montage

MAGENTA = np.array([255, 25, 229])


def _disc(shape, centre, radius, value=1):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius**2) * value


def _read(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _has_colour(picture, colour, tol=12):
    return np.any(np.all(np.abs(picture - colour) <= tol, axis=-1))


def test_montage_of_mixed_images_with_predictions(tmp_path):
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 4000, (64, 80)).astype(np.uint16)
    rgb8 = rng.integers(0, 255, (64, 80, 3)).astype(np.uint8)
    floats = rng.normal(size=(64, 80)).astype(np.float32)
    label = _disc((64, 80), (30, 40), 15)
    out = overlay_montage(
        [gray16, rgb8, floats],
        [label, label, None],
        tmp_path / "m.png",
        titles=["a", "b", "c"],
        preds=[_disc((64, 80), (34, 40), 12), None, label],
        ncols=2,
    )
    picture = _read(out)
    assert picture.shape[1] == pytest.approx(2 * 450, abs=10) and picture.shape[0] > 450  # 4.5-inch panels
    assert _has_colour(picture, MAGENTA)
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"], "no temporary file may stay behind"
    assert plt.get_fignums() == []


def test_predictions_colour_appears_only_with_predictions(tmp_path):
    image = np.zeros((48, 48), np.float32)
    label = _disc((48, 48), (24, 24), 10)
    plain = _read(overlay_montage([image], [label], tmp_path / "a.png"))
    assert not _has_colour(plain, MAGENTA)
    assert _has_colour(plain, np.array([51, 255, 51]))  # class 1 reference contour


def test_the_legend_names_every_class_with_its_colour(tmp_path):
    image = np.zeros((48, 48), np.float32)
    label = _disc((48, 48), (24, 24), 10)  # class 1 only
    unnamed = _read(overlay_montage([image], [label], tmp_path / "a.png"))
    named = _read(overlay_montage([image], [label], tmp_path / "b.png", class_names=["cell", "border"],
                                  title="validation at the best epoch (3)"))
    yellow = np.array([255, 229, 25])  # class 2's colour: only its legend entry can show it
    assert not _has_colour(unnamed, yellow) and _has_colour(named, yellow)


def test_instances_get_their_own_colours(tmp_path):
    label = _disc((60, 60), (20, 20), 10, 1) + _disc((60, 60), (40, 42), 10, 2)
    picture = _read(overlay_montage([np.zeros((60, 60))], [label], tmp_path / "i.png", instance=True))
    saturated = picture[np.ptp(picture, axis=-1) > 150]  # contour pixels; the image itself is black
    assert len(np.unique(saturated, axis=0)) >= 2


def test_montage_names_the_bad_input(tmp_path):
    image = np.zeros((32, 32))
    with pytest.raises(ValueError, match=r"labels\[1\]"):
        overlay_montage([image, image], [None, np.zeros((16, 16))], tmp_path / "x.png")
    with pytest.raises(ValueError, match="expected 2 titles"):
        overlay_montage([image, image], [None, None], tmp_path / "x.png", titles=["one"])
    with pytest.raises(ValueError, match=r"images\[0\].*middle_slice"):
        overlay_montage([np.zeros((4, 32, 32))], [None], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_middle_slice_follows_the_foreground():
    volume = np.zeros((10, 8, 8))
    label = np.zeros_like(volume, dtype=np.uint8)
    assert middle_slice(volume) == 5 and middle_slice(volume, label) == 5
    label[7, 2:6, 2:6] = 1
    label[3, 4, 4] = 1
    assert middle_slice(volume, label) == 7
    assert middle_slice(volume, label, axis=1) in (2, 3, 4, 5)
    label[7] = 0
    label[2:5, 2:6, 2:6] = 1  # a plateau of equal maxima: take its middle
    assert middle_slice(volume, label) == 3


def test_learning_curves_write_two_panels(tmp_path):
    history = {
        "train_loss": [1.0, 0.7, 0.5, 0.4],
        "val_loss": [1.1, np.nan, 0.6, np.nan],
        "val_dice": [0.4, 0.7],  # validated every 2nd epoch
        "lr": [0.01, 0.008, 0.006, 0.004],
        "samples_per_second": [120.0, 130.0, 128.0, 131.0],
    }
    picture = _read(learning_curves(history, tmp_path / "curves" / "lc.png"))
    assert picture.shape == (380, 1000, 3) and picture.std() > 5
    only_losses = _read(learning_curves({"loss": [3, 2, 1]}, tmp_path / "lc2.png"))
    assert only_losses.shape == (380, 1000, 3)
    grouped = {"train/loss": [1.0, 0.7, 0.5], "val/dice_cell": [0.3, 0.6, 0.5], "train/lr": [0.1, 0.1, 0.1],
               "time/data_s": [3.0, 2.0, 2.0]}
    plain = _read(learning_curves(grouped, tmp_path / "lc3.png"))
    marked = _read(learning_curves(grouped, tmp_path / "lc4.png", best_epoch=2))
    pink = np.array([230, 0, 126])  # the best-epoch line, in both panels
    assert not _has_colour(plain, pink, tol=3)
    assert _has_colour(marked[:, :500], pink, tol=3) and _has_colour(marked[:, 500:], pink, tol=3)
    assert plt.get_fignums() == []


def test_learning_curves_keep_losses_and_scores_apart_on_integer_epochs():
    history = {"train/loss": [1.0, 0.7, 0.5], "train/loss_dice": [0.6, 0.4, 0.3], "val/dice_cell": [0.3, 0.6, 0.5],
               "train/lr": [0.1, 0.1, 0.1], "time/data_s": [3.0, 2.0, 2.0]}
    fig = learning_curves_figure(history, best_epoch=2)
    losses, scores = fig.axes
    named = [{line.get_label() for line in ax.get_lines()} for ax in (losses, scores)]
    assert named[0] == {"train/loss", "train/loss_dice", "best epoch (2)"}
    assert named[1] == {"val/dice_cell", "best epoch (2)"}
    for ax in (losses, scores):
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_instance_merges_and_splits_get_their_own_panel():
    history = {"train/loss": [1.0, 0.7, 0.5], "val/dice_mean": [0.3, 0.6, 0.5], "val/ap": [0.1, 0.4, 0.5],
               "val/merges": [9.0, 6.0, 4.0], "val/splits": [0.0, 1.0, 1.0]}
    fig = learning_curves_figure(history, best_epoch=3)
    assert [ax.get_title() for ax in fig.axes] == ["losses (lower is better)", "scores (higher is better)",
                                                   "merges and splits per case (lower is better)"]
    named = [{line.get_label() for line in ax.get_lines()} - {"best epoch (3)"} for ax in fig.axes]
    assert named == [{"train/loss"}, {"val/dice_mean", "val/ap"}, {"val/merges", "val/splits"}]
