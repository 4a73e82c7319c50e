# Long on purpose (over 450 lines): grid, importance map, slab streaming and window loading form one memory plan.
"""Sliding-window prediction of whole images with any callable model, 2D and 3D.

The image is covered by a Cartesian grid of patch-sized windows (:func:`sliding_window_grid`); each window
batch is copied to the compute device, predicted (optionally averaged over mirror flips) and blended into an
accumulator with a Gaussian importance map (:func:`gaussian_importance_map`).

Two choices keep memory lean enough to predict a scan larger than the GPU, on the CPU if need be:

* The normaliser is known before any prediction. The importance map is separable and the grid is a
  Cartesian product, so the sum of all window weights at a voxel is a product of 1D sums, one per axis.
  Every window is weighted by ``importance / normaliser`` before it is added, hence the accumulator holds
  final probabilities as soon as the last window touching a voxel has been added: no weight map, no final
  division pass, and probabilities that fit a float16 accumulator.
* Windows run in C order (first spatial axis outermost), so the accumulator is split into slabs along the
  first axis and a slab is final once no remaining window reaches it.
  :meth:`SlidingWindowPredictor.iter_slabs` and :meth:`SlidingWindowPredictor.predict_labels` keep only
  the slabs under the current windows in memory.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.precision import detect, resolve_precision

__all__ = ["SlidingWindowPredictor", "gaussian_importance_map", "sliding_window_grid"]

log = logging.getLogger(__name__)

# Finalising a slab (argmax, casts) runs in chunks of about this many voxels to bound its temporaries.
_CHUNK_VOXELS = 1 << 22


def _check_vector_axes(vector_axes: Sequence[int | None] | None, channels: int, dims: int) -> list[int | None]:
    """One spatial axis (or None, a scalar) per regression channel; None: all scalars."""
    axes = [None] * channels if vector_axes is None else list(vector_axes)
    if channels < 0 or len(axes) != channels or any(a is not None and not 0 <= a < dims for a in axes):
        raise ValueError(
            f"vector_axes must give one spatial axis (0..{dims - 1}) or None per regression channel ({channels}); "
            f"received {vector_axes}"
        )
    return axes


def _check_sizes(image_size: Sequence[int], patch_size: Sequence[int], overlap: float) -> None:
    if len(image_size) != len(patch_size):
        raise ValueError(f"image size {tuple(image_size)} and patch size {tuple(patch_size)} differ in length")
    if any(int(p) < 1 for p in patch_size) or any(int(s) < 1 for s in image_size):
        raise ValueError(f"sizes must be positive; received image {tuple(image_size)}, patch {tuple(patch_size)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1); received {overlap}")


def _axis_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts along one axis: spread evenly, the first at 0 and the last flush with the end."""
    if size <= patch:
        return [0]
    count = min(math.ceil((size - patch) / (patch * (1 - overlap))) + 1, size - patch + 1)
    return [round(i * (size - patch) / (count - 1)) for i in range(count)]


def sliding_window_grid(
    image_size: Sequence[int], patch_size: Sequence[int], overlap: float = 0.5
) -> list[tuple[slice, ...]]:
    """Windows covering an image, in C order (first axis outermost).

    Along each axis the windows overlap by at least ``overlap`` of the patch; the first starts at 0 and the
    last ends at the image's end. An axis shorter than the patch counts as padded to the patch: its single
    window is ``slice(0, patch)``.

    Args:
        image_size: spatial size ``*S``.
        patch_size: window size ``*P``, as long as ``image_size``.
        overlap: fraction of the patch shared by neighbouring windows, in ``[0, 1)``.

    Returns:
        One tuple of slices per window, each inside ``max(S, P)``.
    """
    _check_sizes(image_size, patch_size, overlap)
    per_axis = [
        [slice(s, s + int(p)) for s in _axis_starts(max(int(n), int(p)), int(p), overlap)]
        for n, p in zip(image_size, patch_size)
    ]
    return list(itertools.product(*per_axis))


def _importance_1d(size: int, sigma_scale: float) -> np.ndarray:
    """A Gaussian centred on the window, peak 1, every value > 0 (float64)."""
    offset = np.arange(size, dtype=np.float64) - (size - 1) / 2
    sigma = max(sigma_scale * size, 1e-6)
    exponent = -0.5 * (offset / sigma) ** 2
    weight = np.exp(exponent - exponent.max())  # peak 1 even when a narrow sigma underflows elsewhere
    # every voxel must keep some weight, as in nnU-Net
    weight[weight == 0] = weight[weight > 0].min()
    return weight


def gaussian_importance_map(
    patch_size: Sequence[int], sigma_scale: float = 0.125, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian importance map of a window, as in nnU-Net: predictions near a patch's centre count most.

    Separable: the product of one Gaussian per axis with ``sigma = sigma_scale * patch``, peak 1 at the
    centre, and values that would underflow to 0 clipped to the smallest positive one.

    Args:
        patch_size: window size ``*P``.
        sigma_scale: Gaussian sigma as a fraction of the patch size.
        dtype: floating dtype of the result.

    Returns:
        Tensor ``*P``.
    """
    weight = functools.reduce(np.multiply.outer, [_importance_1d(int(p), sigma_scale) for p in patch_size])
    weight = torch.from_numpy(np.asarray(weight)).to(dtype)
    if bool((weight == 0).any()):
        weight[weight == 0] = weight[weight > 0].min()
    return weight


@dataclass
class _Plan:
    """Everything about one image size that does not depend on the pixels."""

    spatial: tuple[int, ...]
    windows: list[tuple[slice, ...]]  # image coordinates, C order
    crop: tuple[slice, ...]  # removes the padding from a model output window
    pad: tuple[int, ...]  # F.pad argument (last axis first); all zeros when the image covers the patch
    # per axis: window start -> importance / normaliser (1D, on the compute device)
    weights: list[dict[int, torch.Tensor]]
    bounds: list[int]  # slab boundaries along the first axis


class SlidingWindowPredictor:
    """Predict a whole image patch by patch with Gaussian blending, optional mirror TTA and AMP.

    Args:
        model: any callable ``B C *P -> B K *P`` logits (``nn.Module`` or function); when it returns a list
            (deep supervision) element 0 is used. An ``nn.Module`` is put in eval mode and moved to
            ``device`` (and to channels-last when asked).
        patch_size: window size ``*P`` (2 or 3 values).
        num_classes: ``K``, the model's class channels; ``K == 1`` means a sigmoid, otherwise softmax.
        regression_channels: ``R`` more output channels after the classes (an instance representation's
            distance or flow maps), blended as they are, without softmax; ``__call__`` returns ``K + R``
            channels, labels come from the ``K`` class channels only.
        vector_axes: per regression channel, the spatial axis it is a vector component along, or None for
            a scalar; mirror TTA negates a component when its axis is flipped. ``None``: all scalars.
        overlap: fraction of the patch shared by neighbouring windows, in ``[0, 1)``.
        sw_batch_size: windows per model call.
        blend: ``"gaussian"`` (nnU-Net) or ``"constant"`` (plain average).
        sigma_scale: Gaussian sigma as a fraction of the patch size.
        device: where the model runs.
        stitch_device: where the accumulator lives; ``None``: the compute device when the accumulator fits in
            half of its free memory, else the CPU.
        amp: the autocast precision: ``"auto"`` (bfloat16 where the hardware computes it natively: CPUs with
            AVX512-BF16/AMX, Ampere+ GPUs; float16 on older GPUs; else float32), ``"fp32"``, ``"bf16"``,
            ``"fp16"``, ``True`` (= auto), ``False`` (= fp32) or a torch dtype (see :mod:`medseg.precision`).
        channels_last: feed the model channels-last windows.
        tta: average over every combination of flips of ``tta_axes``.
        tta_axes: spatial axes to flip (0 = first spatial axis); ``None``: all.
        output: ``"probabilities"`` (softmax/sigmoid, blended) or ``"logits"`` (blended logits).
        padding_mode: how an image smaller than the patch is padded: ``"constant"``, ``"reflect"``,
            ``"replicate"``; the padding is cropped from the prediction.
        pad_value: value of constant padding.
        accumulate_dtype: ``torch.float32``, or ``torch.float16`` to halve the accumulator (probabilities
            are final in the accumulator, so they need no more range than [0, 1]).
        progress: called as ``progress(windows_done, windows_total)`` after every window batch.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]],
        patch_size: Sequence[int],
        num_classes: int,
        *,
        regression_channels: int = 0,
        vector_axes: Sequence[int | None] | None = None,
        overlap: float = 0.5,
        sw_batch_size: int = 4,
        blend: str = "gaussian",
        sigma_scale: float = 0.125,
        device: str | torch.device = "cpu",
        stitch_device: str | torch.device | None = None,
        amp: bool | str | torch.dtype | None = "auto",
        channels_last: bool = False,
        tta: bool = False,
        tta_axes: Sequence[int] | None = None,
        output: str = "probabilities",
        padding_mode: str = "constant",
        pad_value: float = 0.0,
        accumulate_dtype: torch.dtype = torch.float32,
        progress: Callable[[int, int], None] | None = None,
    ):
        self.patch_size = tuple(int(p) for p in patch_size)
        dims = len(self.patch_size)
        _check_sizes(self.patch_size, self.patch_size, overlap)
        if dims not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 values; received {tuple(patch_size)}")
        if num_classes < 1 or sw_batch_size < 1:
            raise ValueError(f"num_classes and sw_batch_size must be >= 1; received {num_classes}, {sw_batch_size}")
        for name, value, options in [
            ("blend", blend, ("gaussian", "constant")),
            ("output", output, ("probabilities", "logits")),
            ("padding_mode", padding_mode, ("constant", "reflect", "replicate")),
        ]:
            if value not in options:
                raise ValueError(f"{name} must be one of {', '.join(options)}; received {value!r}")
        if accumulate_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"accumulate_dtype must be float32, float16 or bfloat16; received {accumulate_dtype}")
        axes = tuple(range(dims)) if tta_axes is None else tuple(int(a) for a in tta_axes)
        if any(not 0 <= a < dims for a in axes):
            raise ValueError(f"tta_axes must be spatial axes in 0..{dims - 1}; received {tuple(tta_axes or ())}")

        self.num_classes = int(num_classes)
        self.regression_channels = int(regression_channels)
        self.vector_axes = _check_vector_axes(vector_axes, self.regression_channels, dims)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.blend = blend
        self.sigma_scale = float(sigma_scale)
        self.output = output
        self.padding_mode = padding_mode
        self.pad_value = float(pad_value)
        self.accumulate_dtype = accumulate_dtype
        self.device = torch.device(device)
        self.stitch_device = None if stitch_device is None else torch.device(stitch_device)
        self.amp_dtype = self._resolve_amp(amp)
        self.memory_format = None
        if channels_last:
            self.memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
        # Flip dims of a window batch B C *P. The identity comes last: see _predict.
        self.flips = [()]
        self.tta = bool(tta)
        if tta:
            sizes = reversed(range(len(axes) + 1))
            subsets = itertools.chain.from_iterable(itertools.combinations(axes, r) for r in sizes)
            self.flips = [tuple(2 + a for a in subset) for subset in subsets]
        self.progress = progress
        if isinstance(model, nn.Module):
            model.eval().to(self.device)
            if self.memory_format is not None:
                model.to(memory_format=self.memory_format)
        self.model = model

    def _resolve_amp(self, amp: bool | str | torch.dtype | None) -> torch.dtype | None:
        if amp is None or isinstance(amp, torch.dtype):
            if amp not in (None, torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"amp dtype must be float32, bfloat16 or float16; received {amp}")
            return None if amp in (None, torch.float32) else amp
        # auto: bf16 on CPUs with native bf16 and on Ampere+ GPUs, fp16 on older GPUs, else float32
        return resolve_precision(amp, self.device.type, detect(self.device))

    # ----------------------------------------------------------------------------------- public API
    def __call__(self, image: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Predict one case.

        Args:
            image: ``C *S`` (tensor or array of any real dtype; windows are cast to float32 one by one).

        Returns:
            ``K *S`` probabilities (or blended logits) in ``accumulate_dtype`` on the stitch device, followed
            by the ``R`` blended regression channels.
        """
        spatial = self._check_image(image)
        stitch = self._resolve_stitch(image.shape)
        channels = self.num_classes + self.regression_channels
        out = torch.zeros((channels, *spatial), dtype=self.accumulate_dtype, device=stitch)
        for _ in self._stream(image, stitch, slice(None), lambda start, stop: out[:, start:stop]):
            pass  # the slabs are views of out, final when yielded
        return out

    def iter_slabs(
        self, image: torch.Tensor | np.ndarray, labels: bool = False
    ) -> Iterator[tuple[slice, torch.Tensor | np.ndarray]]:
        """Predict one case slab by slab along the first spatial axis, holding only the current slabs.

        Args:
            image: ``C *S``.
            labels: yield label slabs instead of probabilities.

        Yields:
            ``(rows, slab)`` in order, ``rows`` a slice of the first spatial axis and ``slab`` either
            ``K n *S[1:]`` probabilities (tensor on the stitch device) or ``n *S[1:]`` labels
            (numpy uint8, uint16 beyond 256 classes), ``n = rows.stop - rows.start``.
        """
        spatial = self._check_image(image)
        stitch = self._resolve_stitch(image.shape, labels)
        if labels:
            keep = slice(1 if self._implied_background else 0, self.num_classes)
        else:
            keep = slice(None)
        channels = len(range(self.num_classes + self.regression_channels)[keep])

        def new_slab(start: int, stop: int) -> torch.Tensor:
            # A normal tensor, not an inference tensor, so that callers may modify what they receive.
            shape = (channels, stop - start, *spatial[1:])
            with torch.inference_mode(False):
                return torch.zeros(shape, dtype=self.accumulate_dtype, device=stitch)

        for start, stop, slab in self._stream(image, stitch, keep, new_slab):
            yield slice(start, stop), self._to_labels(slab) if labels else slab

    def predict_labels(self, image: torch.Tensor | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Predict one case's label map, streaming: peak memory is the input, the labels and a few slabs.

        Args:
            image: ``C *S``.
            out: optional ``*S`` integer array to fill (e.g. an ``np.memmap`` to write straight to disk).

        Returns:
            ``*S`` labels, the argmax of :meth:`__call__` (uint8, uint16 beyond 256 classes), or ``out``.
        """
        spatial = self._check_image(image)
        if out is None:
            out = np.empty(spatial, dtype=self._label_dtype)
        elif tuple(out.shape) != spatial:
            raise ValueError(f"out must have the image's spatial shape {spatial}; received {tuple(out.shape)}")
        for rows, slab in self.iter_slabs(image, labels=True):
            out[rows] = slab
        return out

    def estimate_memory(self, image_shape: Sequence[int], labels: bool = False) -> dict[str, int]:
        """Bytes needed to predict an image of shape ``C *S``, to print before starting.

        Args:
            image_shape: ``C *S``.
            labels: estimate :meth:`predict_labels` instead of :meth:`__call__`.

        Returns:
            ``input`` (as float32), ``accumulator`` (stitch device), ``output`` (the label map; 0 for
            probabilities, which live in the accumulator), ``window_batch`` (compute device, without the
            model's activations) and their ``total``.
        """
        channels, *spatial = (int(s) for s in image_shape)
        if len(spatial) != len(self.patch_size):
            raise ValueError(
                f"image shape must be C followed by {len(self.patch_size)} spatial sizes; received {tuple(image_shape)}"
            )
        item = torch.finfo(self.accumulate_dtype).bits // 8
        if labels:
            plan = self._plan(tuple(spatial), torch.device("cpu"))
            # While a batch runs, the live slabs span its first window's top to its last window's bottom.
            step = self.sw_batch_size
            batches = [plan.windows[i : i + step] for i in range(0, len(plan.windows), step)]
            rows = max(batch[-1][0].stop - batch[0][0].start for batch in batches)
            classes = self.num_classes - 1 if self._implied_background else self.num_classes
            accumulator = classes * min(rows, spatial[0]) * math.prod(spatial[1:]) * item
            output = math.prod(spatial) * np.dtype(self._label_dtype).itemsize
        else:
            channels_out = self.num_classes + self.regression_channels
            accumulator, output = channels_out * math.prod(spatial) * item, 0
        window = math.prod(self.patch_size) * 4 * self.sw_batch_size
        sizes = {
            "input": channels * math.prod(spatial) * 4,
            "accumulator": accumulator,
            "output": output,
            "window_batch": window * (
                2 * channels + (self.num_classes + self.regression_channels) * (2 if len(self.flips) > 1 else 1)
            ),
        }
        sizes["total"] = sum(sizes.values())
        return sizes

    # ----------------------------------------------------------------------------------- internals
    @property
    def _implied_background(self) -> bool:
        # Blended probabilities sum to one, so labels need every class but the first.
        return self.output == "probabilities" and self.num_classes > 1

    @property
    def _label_dtype(self) -> type:
        return np.uint8 if self.num_classes <= 256 else np.uint16

    def _check_image(self, image: torch.Tensor | np.ndarray) -> tuple[int, ...]:
        if not isinstance(image, (torch.Tensor, np.ndarray)):
            raise TypeError(f"image must be a torch.Tensor or numpy array; received {type(image).__name__}")
        if image.ndim != len(self.patch_size) + 1:
            raise ValueError(
                f"image must be C *S with {len(self.patch_size)} spatial axes like patch_size "
                f"{self.patch_size}; received shape {tuple(image.shape)}"
            )
        return tuple(int(s) for s in image.shape[1:])

    def _resolve_stitch(self, image_shape: Sequence[int], labels: bool = False) -> torch.device:
        if self.stitch_device is not None:
            return self.stitch_device
        if self.device.type != "cuda":
            return self.device
        need = self.estimate_memory(image_shape, labels)["accumulator"]
        free, _ = torch.cuda.mem_get_info(self.device)
        stitch = self.device if need < free / 2 else torch.device("cpu")
        log.info("stitching on %s: accumulator %.2f GiB, %.2f GiB free", stitch, need / 2**30, free / 2**30)
        return stitch

    def _plan(self, spatial: tuple[int, ...], device: torch.device) -> _Plan:
        axis_windows, weights, crop, pad = [], [], [], []
        for size, patch in zip(spatial, self.patch_size):
            if self.blend == "gaussian":
                importance = _importance_1d(patch, self.sigma_scale)
            else:
                importance = np.ones(patch)
            if size < patch:  # one window, the image centred in its padding
                before = (patch - size) // 2
                windows, crop_axis = [slice(0, size)], slice(before, before + size)
                pad_axis = (before, patch - size - before)
                importance = importance[crop_axis]
            else:
                windows = [slice(s, s + patch) for s in _axis_starts(size, patch, self.overlap)]
                crop_axis, pad_axis = slice(0, patch), (0, 0)
            normaliser = np.zeros(size)
            for window in windows:
                normaliser[window] += importance
            weights.append({w.start: torch.from_numpy(importance / normaliser[w]).float().to(device) for w in windows})
            axis_windows.append(windows)
            crop.append(crop_axis)
            pad.append(pad_axis)
        bounds = sorted({0, spatial[0]} | {w.start for w in axis_windows[0]} | {w.stop for w in axis_windows[0]})
        return _Plan(
            spatial=spatial,
            windows=list(itertools.product(*axis_windows)),
            crop=tuple(crop),
            pad=tuple(v for axis in reversed(pad) for v in axis),
            weights=weights,
            bounds=bounds,
        )

    @torch.inference_mode()
    def _stream(
        self,
        image: torch.Tensor | np.ndarray,
        stitch: torch.device,
        keep: slice,
        new_slab: Callable[[int, int], torch.Tensor],
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Blend all windows into slabs ``K' n *S[1:]`` (the ``keep`` channels); yield each once final."""
        plan = self._plan(tuple(int(s) for s in image.shape[1:]), self.device)
        bounds, live = plan.bounds, {}
        loader = _WindowLoader(image, self.device, self.sw_batch_size)
        total = len(plan.windows)
        for first in range(0, total, self.sw_batch_size):
            batch = plan.windows[first : first + self.sw_batch_size]
            probs = self._predict(loader.load(batch), plan.pad)
            probs = probs[(slice(None), keep, *plan.crop)] * self._batch_weight(plan, batch)
            probs = probs.to(stitch, self.accumulate_dtype)
            for window, prob in zip(batch, probs):
                top, bottom = window[0].start, window[0].stop
                for i in range(bisect_left(bounds, top), bisect_left(bounds, bottom)):
                    start, stop = bounds[i], bounds[i + 1]
                    if start not in live:
                        live[start] = new_slab(start, stop)
                    live[start][(slice(None), slice(None), *window[1:])] += prob[:, start - top : stop - top]
            done = first + len(batch)
            # Windows are sorted by their first-axis start, so nothing still to come reaches above it.
            final_until = plan.windows[done][0].start if done < total else plan.spatial[0]
            for start in sorted(live):
                stop = bounds[bisect_left(bounds, start) + 1]
                if stop > final_until:
                    break
                yield start, stop, live.pop(start)
            if self.progress is not None:
                self.progress(done, total)

    def _batch_weight(self, plan: _Plan, batch: list[tuple[slice, ...]]) -> torch.Tensor:
        """``B 1 *tile`` blending weights, already divided by the normaliser (outer product of 1D weights)."""
        weight = None
        dims = len(plan.spatial)
        for axis in range(dims):
            vectors = torch.stack([plan.weights[axis][window[axis].start] for window in batch])
            shape = [len(batch), 1] + [1] * dims
            shape[2 + axis] = vectors.shape[1]
            weight = vectors.view(shape) if weight is None else weight * vectors.view(shape)
        return weight

    def _predict(self, tiles: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
        """``B C *tile`` windows -> ``B K *P`` float32 probabilities (or logits), averaged over the flips."""
        if any(pad):
            tiles = _pad(tiles, pad, self.padding_mode, self.pad_value)
        if self.memory_format is not None:
            tiles = tiles.contiguous(memory_format=self.memory_format)
        amp = self.amp_dtype
        # What the model returns may be its input, a buffer it reuses or a cached tensor, so it is never
        # modified. The sum runs in place in the first output of a flipped window: flip() copies, so that
        # tensor is ours, and flipping costs no extra copy. Without TTA the output is returned as is.
        total = None
        with nullcontext() if amp is None else torch.autocast(self.device.type, amp):
            for dims in self.flips:
                out = self._forward(tiles.flip(dims) if dims else tiles)
                out = self._unflip(out, dims) if dims else out
                total = out if total is None else total.add_(out)
        return total.div_(len(self.flips)) if len(self.flips) > 1 else total

    def _unflip(self, out: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Undo a mirroring of the input on the output: flip back, and negate the vector components
        along the flipped axes (a flow pointing right in the mirror points left in the image)."""
        out = out.flip(dims)
        signs = [1.0] * self.regression_channels
        for c, axis in enumerate(self.vector_axes):
            if axis is not None and 2 + axis in dims:
                signs[c] = -1.0
        if any(s < 0 for s in signs):
            shape = [1, self.regression_channels] + [1] * (out.ndim - 2)
            factor = torch.tensor(signs, dtype=out.dtype, device=out.device).view(shape)
            out = torch.cat([out[:, : self.num_classes], out[:, self.num_classes :] * factor], 1)
        return out

    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        out = self.model(tiles)
        if isinstance(out, (list, tuple)):  # deep supervision: full resolution first
            out = out[0]
        channels = self.num_classes + self.regression_channels
        expected = (tiles.shape[0], channels, *tiles.shape[2:])
        if tuple(out.shape) != expected:
            what = "K *P" if not self.regression_channels else "K+R *P"
            raise ValueError(f"model output must be B {what} = {expected}; received {tuple(out.shape)}")
        out = out.float()
        if self.output == "logits":
            return out
        classes = out[:, : self.num_classes]
        classes = classes.softmax(1) if self.num_classes > 1 else classes.sigmoid()
        if not self.regression_channels:
            return classes
        return torch.cat([classes, out[:, self.num_classes :]], 1)

    def _to_labels(self, slab: torch.Tensor) -> np.ndarray:
        """Final slab ``K' n *S[1:]`` -> labels ``n *S[1:]``, in chunks of rows to bound the temporaries."""
        labels = np.empty(slab.shape[1:], dtype=self._label_dtype)
        step = max(1, _CHUNK_VOXELS // max(1, math.prod(slab.shape[2:])))
        for row in range(0, slab.shape[1], step):
            chunk = slab[:, row : row + step].float()
            if self.num_classes == 1:
                label = chunk[0] >= (0.5 if self.output == "probabilities" else 0.0)
            elif self._implied_background:
                background = 1 - chunk.sum(0)
                # argmax picks the first of equal maxima: background wins ties, as in __call__'s argmax.
                if chunk.shape[0] == 1:
                    label = chunk[0] > background
                else:
                    best, index = chunk.max(0)
                    label = torch.where(background >= best, 0, index + 1)
            else:
                label = chunk.argmax(0)
            labels[row : row + step] = label.to(torch.int32).cpu().numpy()
        return labels


class _WindowLoader:
    """Copies window batches ``B C *tile`` of an image to the compute device, as float32.

    Tiles go through one reusable staging buffer (pinned for CUDA), so an input of any dtype is cast one
    window at a time and never copied whole.
    """

    def __init__(self, image: torch.Tensor | np.ndarray, device: torch.device, batch_size: int):
        self.image, self.device = image, device
        self.on_device = isinstance(image, torch.Tensor) and image.device == device
        self.staging: torch.Tensor | None = None
        self.batch_size = batch_size
        self.copied: torch.cuda.Event | None = None

    def load(self, batch: list[tuple[slice, ...]]) -> torch.Tensor:
        regions = [(slice(None), *window) for window in batch]
        if self.on_device:
            return torch.stack([self.image[r] for r in regions]).float()
        if self.staging is None:
            shape = (self.batch_size, *self.image[regions[0]].shape)
            self.staging = torch.empty(shape, dtype=torch.float32, pin_memory=self.device.type == "cuda")
        if self.copied is not None:  # the previous asynchronous copy must finish before we overwrite it
            self.copied.synchronize()
        staging = self.staging[: len(batch)]
        if isinstance(self.image, np.ndarray):
            array = staging.numpy()
            for i, region in enumerate(regions):
                array[i] = self.image[region]
        else:
            for i, region in enumerate(regions):
                staging[i].copy_(self.image[region])
        if self.device.type != "cuda":
            return staging.to(self.device)
        tiles = staging.to(self.device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return tiles


def _pad(tiles: torch.Tensor, pad: tuple[int, ...], mode: str, value: float) -> torch.Tensor:
    """Pad ``B C *tile`` by ``pad`` (F.pad order); reflect repeats when the padding exceeds the image."""
    if mode == "constant":
        return F.pad(tiles, pad, value=value)
    if mode == "replicate":
        return F.pad(tiles, pad, mode="replicate")
    remaining = list(pad)
    while any(remaining):
        step = [0] * len(pad)
        for i in range(0, len(pad), 2):
            size = tiles.shape[-1 - i // 2]
            step[i], step[i + 1] = min(remaining[i], size - 1), min(remaining[i + 1], size - 1)
        if not any(step):  # a size-1 axis has nothing to mirror
            return F.pad(tiles, remaining, mode="replicate")
        tiles = F.pad(tiles, step, mode="reflect")
        remaining = [r - s for r, s in zip(remaining, step)]
    return tiles
