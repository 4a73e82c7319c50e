"""Figures shared by the data preview, training and evaluation: label overlays and learning curves.

Matplotlib is used through ``Figure`` + ``FigureCanvasAgg`` only, so no pyplot global state (open
figures, the current backend) leaks into the caller. Every figure is written atomically (temporary
file + ``os.replace``) so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from scipy import ndimage as ndi

__all__ = ["learning_curves", "middle_slice", "overlay_montage"]

# Reference contours per semantic class (1, 2, ...) and the single colour of predictions.
_CLASS_COLOURS = np.array(
    [[0.2, 1.0, 0.2], [1.0, 0.9, 0.1], [0.1, 0.9, 1.0], [1.0, 0.55, 0.1], [0.6, 0.6, 1.0]], dtype=np.float32
)
_BEST_COLOUR = "#e6007e"  # the best-epoch line: a hue no curve of the default cycle has
_PRED_COLOUR = np.array([1.0, 0.1, 0.9], dtype=np.float32)
_PANEL_INCHES = 4.5
_DPI = 100


def _normalise(image: np.ndarray, index: int) -> np.ndarray:
    """Any-dtype ``H W`` or ``H W 3`` image -> float RGB ``H W 3`` in [0, 1] (1st-99.5th percentile)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(
            f"images[{index}]: expected a 2D [H, W] or RGB [H, W, 3] array, received shape {image.shape}; "
            "take a slice of a volume first (see middle_slice)"
        )
    values = image.astype(np.float32)
    if image.dtype == np.uint8:
        values = values / 255.0  # already display-ready: keep the true colours of RGB photographs
    else:
        finite = values[np.isfinite(values)]
        lo, hi = np.percentile(finite, (1.0, 99.5)) if finite.size else (0.0, 1.0)
        values = (values - lo) / (hi - lo) if hi > lo else values - lo
    values = np.clip(np.nan_to_num(values), 0.0, 1.0)
    return values if values.ndim == 3 else np.repeat(values[..., None], 3, axis=-1)


def _instance_colours(ids: np.ndarray) -> np.ndarray:
    """One stable, saturated colour per instance id; hues stay away from the prediction magenta."""
    golden = 0.618033988749895
    hue = (ids.astype(np.float64) * golden) % 1.0 * 0.75  # [0, 0.75): red .. blue, no magenta
    hsv = np.stack([hue, np.full_like(hue, 0.85), np.full_like(hue, 1.0)], axis=-1)
    return hsv_to_rgb(hsv).astype(np.float32)


def _boundaries(label: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of ``label`` that touch a different value (background or another id), ``H W`` bool."""
    lab = np.asarray(label)
    edge = np.zeros(lab.shape, dtype=bool)
    for axis in (0, 1):
        diff = np.diff(lab, axis=axis) != 0
        lead = [slice(None)] * 2
        lag = [slice(None)] * 2
        lead[axis], lag[axis] = slice(1, None), slice(None, -1)
        edge[tuple(lead)] |= diff
        edge[tuple(lag)] |= diff
    edge &= lab != 0
    return ndi.binary_dilation(edge, iterations=thickness - 1) & (lab != 0) if thickness > 1 else edge


def _paint(rgb: np.ndarray, label: np.ndarray, instance: bool, colour: np.ndarray | None) -> None:
    """Burn the contours of ``label`` into ``rgb`` in place (``colour`` None: per class or per id)."""
    label = np.asarray(label)
    thickness = max(1, round(max(label.shape) / 320))  # stays visible when large images are shrunk
    edge = _boundaries(label, thickness)
    ids = label[edge].astype(np.int64)
    if colour is not None:
        rgb[edge] = colour
    elif instance:
        rgb[edge] = _instance_colours(ids)
    else:
        rgb[edge] = _CLASS_COLOURS[(ids - 1) % len(_CLASS_COLOURS)]


def _write_figure(fig: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png", dpi=_DPI)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def overlay_montage(
    images: list[np.ndarray],
    labels: list[np.ndarray | None],
    out: Path,
    titles: list[str] | None = None,
    preds: list[np.ndarray | None] | None = None,
    ncols: int = 4,
    instance: bool = False,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write a grid of images with their label contours (and prediction contours) as one PNG.

    Args:
        images: ``H W`` grayscale or ``H W 3`` RGB arrays of any dtype; uint8 is shown as is, other
            dtypes are stretched between their 1st and 99.5th percentiles.
        labels: reference label maps ``H W`` (same length as ``images``; an entry may be None).
            Semantic labels get one colour per class (1 green, 2 yellow, ...).
        out: PNG path, written atomically.
        titles: one title per panel.
        preds: predicted label maps ``H W``, drawn in magenta over the reference contours.
        ncols: panels per row.
        instance: colour every label id on its own (instance maps) instead of per class.
        class_names: names of the foreground classes 1, 2, ...: the legend then names each colour.
        title: a title over the whole figure.

    Returns:
        ``out``.
    """
    n = len(images)
    if n == 0:
        raise ValueError("overlay_montage: expected at least one image, received none")
    for name, seq in (("labels", labels), ("titles", titles), ("preds", preds)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"overlay_montage: expected {n} {name} (one per image), received {len(seq)}")
    if ncols < 1:
        raise ValueError(f"overlay_montage: expected ncols >= 1, received {ncols}")
    panels = []
    for i, image in enumerate(images):
        rgb = _normalise(image, i)
        for kind, maps, colour in (("labels", labels, None), ("preds", preds, _PRED_COLOUR)):
            lab = None if maps is None else maps[i]
            if lab is None:
                continue
            lab = np.asarray(lab)
            if lab.shape != rgb.shape[:2]:
                raise ValueError(
                    f"overlay_montage: {kind}[{i}] has shape {lab.shape}, expected the image's {rgb.shape[:2]}"
                )
            _paint(rgb, lab, instance, colour)
        panels.append(rgb)

    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    aspect = max(p.shape[0] / p.shape[1] for p in panels)
    title_h = 0.35 if titles is not None else 0.0
    handles = _legend_handles(instance, class_names, preds is not None)
    legend_cols = max(1, min(len(handles), 2 * cols))
    top_h, legend_h = (0.45 if title else 0.1), 0.15 + 0.3 * math.ceil(len(handles) / legend_cols)
    height = rows * (_PANEL_INCHES * aspect + title_h) + top_h + legend_h
    fig = Figure(figsize=(cols * _PANEL_INCHES, height))
    for i, rgb in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(rgb, interpolation="nearest")
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=10)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, fontsize=9, frameon=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - top_h / height, bottom=legend_h / height, wspace=0.03,
                        hspace=(title_h + 0.05) / (_PANEL_INCHES * aspect))
    return _write_figure(fig, out)


def _legend_handles(instance: bool, class_names: Sequence[str] | None, with_preds: bool) -> list[Line2D]:
    """One entry per reference colour (per class, or one for instances) and one for the prediction."""
    def line(colour, label: str) -> Line2D:
        return Line2D([], [], color=tuple(float(c) for c in colour), linewidth=2.5, label=label)

    if instance:
        handles = [line(_instance_colours(np.array([1]))[0], "reference (one colour per instance)")]
    elif class_names:
        handles = [line(_CLASS_COLOURS[i % len(_CLASS_COLOURS)], f"reference: {name}")
                   for i, name in enumerate(class_names)]
    else:
        handles = [line(_CLASS_COLOURS[0], "reference (class 1; 2, 3... in other colours)")]
    if with_preds:
        handles.append(line(_PRED_COLOUR, "prediction (all classes)"))
    return handles


def middle_slice(volume: np.ndarray, label: np.ndarray | None = None, axis: int = 0) -> int:
    """Index along ``axis`` of the slice to show: the one with the most foreground.

    Args:
        volume: ``D H W`` array (only its shape is used when a label is given).
        label: same-shape label map; nonzero voxels are foreground.
        axis: slicing axis.

    Returns:
        The slice with the most foreground voxels (the middle one of equal maxima), or the
        geometric middle when ``label`` is None or empty.
    """
    volume = np.asarray(volume)
    axis = axis % volume.ndim
    if label is None:
        return volume.shape[axis] // 2
    label = np.asarray(label)
    if label.shape != volume.shape:
        raise ValueError(f"middle_slice: label shape {label.shape} differs from volume shape {volume.shape}")
    other = tuple(a for a in range(label.ndim) if a != axis)
    counts = np.count_nonzero(label, axis=other)
    if counts.max(initial=0) == 0:
        return volume.shape[axis] // 2
    best = np.flatnonzero(counts == counts.max())
    return int(best[len(best) // 2])


def _is_housekeeping(name: str) -> bool:
    """Learning rate, timings and throughput: logged per epoch, but on another scale than metrics."""
    name = name.lower()
    return name.endswith("lr") or "second" in name or name.startswith("time/")


def learning_curves(history: Mapping[str, Sequence[float]], out: Path, best_epoch: int | None = None) -> Path:
    """Plot per-epoch training history: losses (lower is better) on the left, scores (higher is better) in the
    middle, instance merges and splits per case (lower is better) on the right when there are any, integer
    epochs, and the best epoch marked on each.

    Args:
        history: name -> one value per epoch (x = 1, 2, ...). Keys containing ``"loss"`` go to the
            loss panel, the others to the metrics panel, except the learning rate (``lr``) and
            timings or throughput (names containing ``second``), which are not drawn. A key
            ``"epoch"`` gives the x values of the series of its length. A series shorter than the
            longest (e.g. validation every k epochs) is spread evenly up to the last epoch, which is
            exact when k divides the number of epochs; pad with NaN (NaN points are skipped) to
            place values exactly.
        out: PNG path, written atomically.
        best_epoch: drawn as a dashed vertical line (the epoch whose checkpoint is the model).

    Returns:
        ``out``.
    """
    return _write_figure(learning_curves_figure(history, best_epoch), out)


def _panel(name: str) -> str:
    """Which panel of the learning curves a series goes to: losses, scores or counts (instance merges, splits)."""
    lower = name.lower()
    if "loss" in lower:
        return "loss"
    return "count" if lower.endswith(("merges", "splits")) else "score"


def learning_curves_figure(history: Mapping[str, Sequence[float]], best_epoch: int | None = None) -> Figure:
    """The figure :func:`learning_curves` writes (axes: losses, scores[, merges and splits])."""
    epochs = history.get("epoch")
    series = {
        k: np.asarray(v, dtype=np.float64)
        for k, v in history.items()
        if k != "epoch" and not _is_housekeeping(k) and len(v) > 0
    }
    longest = max((len(v) for v in series.values()), default=0)
    panels = [("losses (lower is better)", "loss"), ("scores (higher is better)", "score")]
    if any(_panel(k) == "count" for k in series):
        panels.append(("merges and splits per case (lower is better)", "count"))
    fig = Figure(figsize=(5 * len(panels), 3.8))
    for col, (title, kind) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), col + 1)
        chosen = {k: v for k, v in series.items() if _panel(k) == kind}
        for name, values in chosen.items():
            if epochs is not None and len(epochs) == len(values):
                x = np.asarray(epochs, dtype=np.float64)
            else:
                x = np.round(np.arange(1, len(values) + 1) * longest / len(values))
            keep = np.isfinite(values)
            ax.plot(x[keep], values[keep], marker="o" if keep.sum() < 30 else None, markersize=3, label=name)
        if best_epoch is not None:
            ax.axvline(best_epoch, color=_BEST_COLOUR, linestyle="--", linewidth=1.5,
                       label=f"best epoch ({best_epoch})")
        if chosen:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {title}", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
