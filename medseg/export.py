"""Export a trained network to ONNX or TorchScript, checked against torch, and load it back for prediction.

An export folder holds the network (``model.onnx`` or ``model.pt``) and ``medseg-model.json``: the model
metadata prediction needs (classes, normalisation, patch size, spacing, sliding-window settings, instance
post-processing) plus an ``export`` section (format, file, size divisor, the check's largest difference).
``medseg predict --model DIR`` reads such a folder: the network runs through onnxruntime (or ``torch.jit.load``)
inside the same sliding window and post-processing as a checkpoint, so a deployment needs no network code.

Why tracing, not scripting: ``torch.jit.script`` compiles the Python source, and the networks use what it does
not support (UNet++ nodes looked up by f-string names, skip lists of unknown length, a pruning property);
making them scriptable would bend every readable ``forward`` around a compiler. Tracing records what one
eval-mode forward pass runs. Eval mode already fixes the deep-supervision heads and UNet++'s pruning, and the
only shape-dependent branches (pad the input to a multiple of the size divisor, crop the logits back) are
no-ops at sizes that are multiples already. So a trace made at such a size holds for every batch size and every
spatial size that is a multiple of the divisor (at least twice it): :class:`ExportedNetwork` pads each window to
such a size and crops the logits, as the network itself does. The check at export time runs the exported
network at another batch size and spatial size than the trace, so a trace that baked a shape in fails there.

ONNX goes through the same trace (``torch.onnx.export(dynamo=False)`` with dynamic axes): seconds, where the
``torch.export``-based exporter took 30-40 s for a tiny UNet on a 2-core machine, for an equal graph.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError, DataError, MedsegError

__all__ = ["EXPORT_FORMATS", "METADATA_FILE", "ExportError", "ExportedNetwork", "export_model", "is_export_folder",
           "load_exported", "size_divisor"]

log = logging.getLogger(__name__)

METADATA_FILE = "medseg-model.json"
EXPORT_FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
ONNX_OPSET = 17
_INPUT, _OUTPUT = "image", "logits"


class ExportError(MedsegError, RuntimeError):
    """The exported network does not compute what the torch network computes (or cannot be written).

    Args:
        path: the export folder.
        message: what differed, by how much.
    """

    def __init__(self, path, message: str):
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how well the exported network matched torch's."""

    folder: Path
    file: Path
    size_divisor: list[int]  # per spatial axis
    max_abs_difference: float
    checked_shape: tuple[int, ...]


def size_divisor(model: nn.Module, spatial_dims: int) -> list[int]:
    """Per spatial axis, the factor an exported network's input size must be a multiple of (the network's total
    downsampling along that axis, e.g. ``2**depth``), read from the network's ``size_divisor``."""
    divisor = getattr(model, "size_divisor", None)
    values = [divisor] * spatial_dims if isinstance(divisor, int) else list(divisor or [])
    if len(values) != spatial_dims or not all(isinstance(d, int) and d >= 1 for d in values):
        raise ConfigError("model.name", f"{type(model).__name__} does not say its size divisor per axis "
                                        f"(got {divisor!r}); it cannot be exported")
    return values


def valid_size(size: int, divisor: int) -> int:
    """Smallest size >= ``size`` an exported network takes along an axis: a multiple of ``divisor``, at least
    twice it (the networks' own floor, see :func:`medseg.nets.blocks.padded_size`)."""
    return max(math.ceil(size / divisor), 2) * divisor


def export_model(model: nn.Module, metadata: Mapping[str, Any], fmt: str, out_dir: Path, *,
                 tolerance: float = 1e-4, seed: int = 0) -> ExportReport:
    """Trace ``model`` in eval mode, write it as ``fmt`` with ``medseg-model.json`` into ``out_dir``, check it.

    Args:
        model: the trained network (moved to the CPU on a copy; the caller's model is not changed).
        metadata: the model metadata of its checkpoint (``patch_size``, ``in_channels``, ``classes``, ...).
        fmt: ``"onnx"`` or ``"torchscript"``.
        out_dir: the export folder, created; an earlier export there is replaced only once this one passed.
        tolerance: largest allowed ``|exported - torch|`` of a logit, plus the same relative to its size.
        seed: of the random check input.

    Returns:
        What was written and the largest difference found.

    Raises:
        ConfigError: unknown ``fmt``.
        ExportError: the exported network differs from torch's beyond ``tolerance``, or fails to run;
            nothing is left in ``out_dir`` then.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError("--format", f"expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    for key in ("patch_size", "in_channels", "classes"):
        if key not in metadata:
            raise ConfigError(key, "missing from the model metadata (was the model written by `medseg train`?)")
    model = copy.deepcopy(model).cpu().float().eval()
    divisor = size_divisor(model, len(metadata["patch_size"]))
    trace_size = [valid_size(int(p), d) for p, d in zip(metadata["patch_size"], divisor)]
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(1, int(metadata["in_channels"]), *trace_size, generator=generator)
    # another batch size and another size on every axis than the trace: a baked-in shape shows here
    check = torch.randn(2, int(metadata["in_channels"]), *(s + d for s, d in zip(trace_size, divisor)),
                        generator=generator)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        file = staging / EXPORT_FORMATS[fmt]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent branches: the check decides
            if fmt == "onnx":
                _write_onnx(model, example, file, len(trace_size))
            else:
                torch.jit.trace(model, example, check_trace=False).save(str(file))
            expected = model(check).numpy()
        try:
            got = ExportedNetwork(file, fmt, divisor)(check).numpy()
        except Exception as err:  # onnxruntime and the TorchScript interpreter raise their own types
            raise ExportError(out_dir, f"the {fmt} network fails to run on a batch of {list(check.shape)} "
                                       f"({type(err).__name__}: {err}); not exported") from err
        difference = _check(got, expected, tolerance, out_dir, fmt)
        meta = {**json.loads(json.dumps(dict(metadata))), "export": {
            "format": fmt, "file": file.name, "size_divisor": divisor, "min_size": [2 * d for d in divisor],
            "input": f"{_INPUT}: float32 B C *S, every S a multiple of size_divisor",
            "output": f"{_OUTPUT}: float32 B K *S (softmax over K gives the class probabilities)",
            "max_abs_difference": difference, "checked_shape": list(check.shape),
            "torch_version": torch.__version__, **({"opset": ONNX_OPSET} if fmt == "onnx" else {}),
        }}
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        _replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %s to %s (size divisor %s, largest difference to torch %.2e)", fmt, out_dir, divisor,
             difference)
    return ExportReport(out_dir, out_dir / file.name, divisor, difference, tuple(check.shape))


def _write_onnx(model: nn.Module, example: torch.Tensor, file: Path, spatial_dims: int) -> None:
    axes = {0: "batch", **{2 + i: f"size_{i}" for i in range(spatial_dims)}}
    torch.onnx.export(model, (example,), str(file), dynamo=False, input_names=[_INPUT], output_names=[_OUTPUT],
                      dynamic_axes={_INPUT: axes, _OUTPUT: axes}, opset_version=ONNX_OPSET)
    import onnx

    onnx.checker.check_model(str(file), full_check=True)


def _check(got: np.ndarray, expected: np.ndarray, tolerance: float, out_dir: Path, fmt: str) -> float:
    if got.shape != expected.shape:
        raise ExportError(out_dir, f"the {fmt} network returned shape {got.shape}, torch {expected.shape}; "
                                   "not exported")
    difference = float(np.abs(got - expected).max(initial=0.0))
    if not np.allclose(got, expected, rtol=tolerance, atol=tolerance) or not np.isfinite(got).all():
        raise ExportError(out_dir, f"the {fmt} network differs from torch's by up to {difference:.3g} on a random "
                                   f"input of shape {list(got.shape)[:1] + list(got.shape)[2:]} (tolerance "
                                   f"{tolerance:g}); not exported")
    return difference


def _replace_folder(staging: Path, out_dir: Path) -> None:
    """Move the checked export into ``out_dir``: its files replace an earlier export's, others are refused."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(out_dir, "exists and is not a folder")
        foreign = [p.name for p in out_dir.iterdir() if p.name not in (METADATA_FILE, *EXPORT_FORMATS.values())]
        if foreign:
            raise ExportError(out_dir, f"folder holds other files ({', '.join(sorted(foreign)[:5])}); "
                                       "choose an empty or new folder")
        for name in EXPORT_FORMATS.values():
            (out_dir / name).unlink(missing_ok=True)
        for item in staging.iterdir():
            item.replace(out_dir / item.name)
        staging.rmdir()
    else:
        staging.rename(out_dir)


class ExportedNetwork:
    """An exported network as a callable ``B C *P -> B K *P`` for :class:`~medseg.inference.SlidingWindowPredictor`.

    Each input is replicate-padded at the high end of every axis to a size the export takes (see
    :func:`valid_size`) and the logits are cropped back, as the torch network does inside ``forward``.

    Args:
        file: ``model.onnx`` or ``model.pt``.
        fmt: ``"onnx"`` (run by onnxruntime on the CPU) or ``"torchscript"`` (``torch.jit.load``).
        divisor: the export's size divisor per spatial axis.
        device: where a TorchScript network runs.
    """

    def __init__(self, file: Path, fmt: str, divisor: list[int], device: str | torch.device = "cpu"):
        self.file, self.format, self.divisor = Path(file), fmt, [int(d) for d in divisor]
        self.device = torch.device(device)
        if fmt == "onnx":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # errors only
            self._session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        elif fmt == "torchscript":
            self._module = torch.jit.load(str(file), map_location=self.device).eval()
        else:
            raise ConfigError("export.format", f"expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        size = list(tiles.shape[2:])
        pad: list[int] = []
        for s, d in reversed(list(zip(size, self.divisor))):
            pad += [0, valid_size(s, d) - s]
        x = F.pad(tiles.float(), pad, mode="replicate") if any(pad) else tiles.float()
        if self.format == "onnx":
            array = np.ascontiguousarray(x.detach().cpu().numpy())
            logits = torch.from_numpy(self._session.run([_OUTPUT], {_INPUT: array})[0]).to(tiles.device)
        else:
            with torch.no_grad():
                logits = self._module(x.to(self.device)).to(tiles.device)
        return logits[(slice(None), slice(None), *(slice(0, s) for s in size))]


def is_export_folder(path: Path) -> bool:
    """Whether ``path`` is a folder written by :func:`export_model`."""
    return Path(path).is_dir() and (Path(path) / METADATA_FILE).is_file()


def load_exported(folder: Path, device: str | torch.device = "cpu") -> tuple[ExportedNetwork, dict[str, Any]]:
    """Read an export folder: the network as a callable and the model metadata.

    Raises:
        DataError: ``medseg-model.json`` is unreadable or lacks its ``export`` section, or the network file is
            missing (names the file).
    """
    folder = Path(folder)
    meta_file = folder / METADATA_FILE
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        export = meta["export"]
        fmt, file, divisor = export["format"], folder / export["file"], [int(d) for d in export["size_divisor"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(meta_file, f"not a medseg export description ({type(err).__name__}: {err}); "
                                   "write one with `medseg export`") from None
    if fmt not in EXPORT_FORMATS:
        raise DataError(meta_file, f"export.format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if not file.is_file():
        raise DataError(file, f"the exported network named in {METADATA_FILE} is missing")
    return ExportedNetwork(file, fmt, divisor, device), meta
