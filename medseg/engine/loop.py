"""The training step and the validation pass: short functions that return numbers and do no I/O.

The order of a step is visible in :func:`train_one_epoch`: fetch -> forward under autocast -> loss -> backward
(scaled for fp16) -> unscale -> clip -> optimizer step -> scheduler step. Progress reporting and logging are the
caller's, through the ``on_step`` callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from medseg.precision import detect, resolve_precision


@dataclass
class StepSettings:
    """How each step runs.

    Attributes:
        device: where the model is.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None for full precision.
        grad_clip: max global gradient norm, or None.
        channels_last: move inputs to channels-last memory format (faster convolutions on recent GPUs).
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None
    grad_clip: float | None = None
    channels_last: bool = False

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype: ``auto`` is bf16 on CUDA devices with native bf16, else fp16, and float32
    on CPU; ``bf16``/``fp16`` are honoured on CPU too (bf16 pays off on CPUs with AVX512-BF16 or AMX)."""
    return resolve_precision(amp, device.type, detect(device), cpu_auto=False)


@dataclass
class EpochResult:
    """Averages over one epoch (per processed batch) and timings."""

    losses: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    samples: int = 0
    data_seconds: float = 0.0
    compute_seconds: float = 0.0
    interrupted: bool = False

    @property
    def samples_per_second(self) -> float:
        total = self.data_seconds + self.compute_seconds
        return self.samples / total if total > 0 else 0.0


def _to_device(batch: dict, settings: StepSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    memory_format = torch.channels_last if settings.channels_last and batch["image"].ndim == 4 else None
    image = batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"]
    image = image.to(settings.device, non_blocking=True).float()
    if memory_format is not None:
        image = image.contiguous(memory_format=memory_format)
    label = batch["label"]
    label = (label.as_tensor() if hasattr(label, "as_tensor") else label).to(settings.device, non_blocking=True).long()
    weight = batch.get("weight")
    if weight is not None:
        weight = (weight.as_tensor() if hasattr(weight, "as_tensor") else weight).to(settings.device).float()
    return image, label, weight


def _tensor(x):
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    settings: StepSettings,
    *,
    skip: int = 0,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> EpochResult:
    """Train for one pass over ``batches``.

    Args:
        batches: dicts with ``image`` [B C *S], ``label`` [B 1 *S] and optionally ``weight`` [B 1 *S] and
            ``regression`` [B R *S] (targets of an instance representation's regression channels).
        loss_fn: ``loss_fn(logits, label, weight[, regression])`` returning an object with ``total`` and
            ``parts``.
        scheduler: has ``step_iteration()`` (called after every optimizer step).
        skip: batches to draw but not train on (resuming inside an epoch replays the data stream up to there).
        on_step: called after every step with the iteration number and its losses (progress bars).
        should_stop: polled after every step; True ends the epoch early with ``interrupted`` set.
    """
    model.train()
    result = EpochResult()
    sums: dict[str, float] = {}
    cuda = settings.device.type == "cuda"
    tick = time.perf_counter()
    for i, batch in enumerate(batches):
        if i < skip:
            tick = time.perf_counter()
            continue
        image, label, weight = _to_device(batch, settings)
        regression = batch.get("regression")  # an instance representation's targets, B R *S
        fetched = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with settings.autocast():
            logits = model(image)
        if regression is None:
            out = loss_fn(logits, label, weight)
        else:
            out = loss_fn(logits, label, weight, _tensor(regression).to(settings.device).float())
        scaler.scale(out.total).backward()
        if settings.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_iteration()
        if cuda:
            torch.cuda.synchronize(settings.device)
        done = time.perf_counter()

        step_losses = {"loss": float(out.total.detach())}
        step_losses.update({k: float(v.detach()) for k, v in out.parts.items()})
        for k, v in step_losses.items():
            sums[k] = sums.get(k, 0.0) + v
        result.iterations += 1
        result.samples += image.shape[0]
        result.data_seconds += fetched - tick
        result.compute_seconds += done - fetched
        if on_step is not None:
            on_step(i, step_losses)
        tick = time.perf_counter()
        if should_stop():
            result.interrupted = True
            break
    result.losses = {k: v / max(result.iterations, 1) for k, v in sums.items()}
    return result


@dataclass
class ValidationResult:
    """Per-case and mean Dice: per foreground class, their mean, and of all foreground as one class (classes
    absent from both prediction and reference are left out of the means)."""

    per_case: list[dict[str, float | str]]
    mean: dict[str, float]


@torch.inference_mode()
def evaluate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[dict],
    class_names: list[str],
    dice_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    keep: int = 0,
    case_metrics: Callable[[dict, torch.Tensor], dict[str, float]] | None = None,
) -> tuple[ValidationResult, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Validate whole cases.

    Args:
        predict: one case's image [C *S] -> class probabilities [K *S] (a sliding-window predictor), maybe
            followed by regression channels, which are ignored here.
        batches: dicts with ``image`` [1 C *S] and ``label`` [1 1 *S] (batch size 1).
        class_names: index = class id; Dice is reported for the foreground classes.
        dice_fn: ``dice_fn(pred [B *S], ref [B *S], K) -> [B K]`` with NaN where a class is absent in both.
        keep: how many (image, label, prediction) examples to return for a montage.
        case_metrics: ``case_metrics(batch, output) -> {name: value}``: more per-case figures from the
            predictor's whole output (e.g. instance AP from the classes and regression channels); averaged
            over the cases that have them like the Dice columns.

    Returns:
        the Dice figures and up to ``keep`` examples as numpy arrays.
    """
    per_case, examples = [], []
    k = len(class_names)
    for batch in batches:
        image = batch["image"][0]
        ref = batch["label"][0, 0].long()
        probs = predict(image)
        pred = probs[:k].argmax(0).to(ref.device)
        dice = dice_fn(pred[None], ref[None].to(pred.device), k)[0].cpu().numpy()
        name = _case_name(batch)
        row: dict[str, float | str] = {"case": name}
        for c in range(1, k):
            row[f"dice_{class_names[c]}"] = float(dice[c])
        fg = [float(dice[c]) for c in range(1, k) if not np.isnan(dice[c])]
        row["dice_mean"] = float(np.mean(fg)) if fg else float("nan")
        # all foreground classes as one (cells: cell + border = the nuclei), the figure users compare
        binary = dice_fn((pred > 0).long()[None], (ref > 0).long()[None].to(pred.device), 2)[0, 1]
        row["dice_foreground"] = float(binary)
        if case_metrics is not None:
            row.update(case_metrics(batch, probs))
        per_case.append(row)
        if len(examples) < keep:
            examples.append((image.cpu().numpy(), ref.cpu().numpy(), pred.cpu().numpy()))
    mean = {}
    for key in dict.fromkeys(k for row in per_case for k in row):  # every column, in first-seen order
        if key == "case":
            continue
        vals = [r[key] for r in per_case if key in r and not np.isnan(r[key])]  # type: ignore[arg-type]
        mean[key] = float(np.mean(vals)) if vals else float("nan")
    return ValidationResult(per_case, mean), examples


def _case_name(batch: dict) -> str:
    if "case" in batch:
        case = batch["case"]
        return str(case[0] if isinstance(case, (list, tuple)) else case)
    meta = getattr(batch["image"], "meta", None) or {}
    name = meta.get("filename_or_obj")
    if isinstance(name, (list, tuple)):
        name = name[0]
    return str(name) if name is not None else "?"
