"""Which floating-point precision a device computes in: the one place that knows what the hardware runs natively.

On CUDA, Ampere and later have native bfloat16; older GPUs get float16 (with a gradient scaler in training).
On CPU, bfloat16 autocast pays off only where the cores have bf16 dot-product instructions (AVX512-BF16 or
AMX-BF16): torch (oneDNN) also *accepts* bf16 on plain AVX-512 CPUs, but emulates it there, slower than float32.
So ``auto`` asks for both: the instruction flag from ``/proc/cpuinfo`` and torch's own bf16 support. Where the
flags cannot be read (not Linux), ``auto`` stays float32.

Whether ``auto`` may use bf16 on CPU at all for prediction was decided by measurement (``benchmarks/predict.py``:
label maps of a trained network equal to float32's, Dice >= 0.995; the figures are in the README).
Training on CPU uses bf16 only when asked (``train.amp: bf16``).

Example:
    >>> caps = detect()
    >>> resolve_precision("auto", "cpu", caps)   # torch.bfloat16 on a CPU with AVX512-BF16, else None
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "Capabilities", "cpu_flags", "detect", "native_cpu_bf16", "resolve_precision"]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_ALIASES = {"off": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# x86 flags of native bf16 / fp16 dot products (Linux /proc/cpuinfo names)
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
FP16_CPU_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})


@dataclass(frozen=True)
class Capabilities:
    """What the hardware runs natively.

    Attributes:
        cpu_bf16: the CPU has bf16 dot-product instructions and torch can use them.
        cpu_fp16: the CPU has fp16 dot-product instructions (AVX512-FP16, AMX-FP16).
        cuda_bf16: the CUDA device computes bf16 natively (compute capability 8 or later).
    """

    cpu_bf16: bool = False
    cpu_fp16: bool = False
    cuda_bf16: bool = False


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm64
            return frozenset(value.split())
    return frozenset()


def native_cpu_bf16(flags: frozenset[str] | set[str], torch_bf16: bool) -> bool:
    """bf16 pays off on this CPU: a native bf16 instruction flag *and* torch's oneDNN bf16 path."""
    return torch_bf16 and bool(BF16_CPU_FLAGS & set(flags))


def _torch_cpu_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def detect(device: str | torch.device = "cpu") -> Capabilities:
    """The capabilities of this machine's CPU and, for a CUDA ``device``, of that GPU."""
    device = torch.device(device)
    flags = cpu_flags()
    cuda_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    return Capabilities(
        cpu_bf16=native_cpu_bf16(flags, _torch_cpu_bf16()),
        cpu_fp16=bool(FP16_CPU_FLAGS & flags),
        cuda_bf16=cuda_bf16,
    )


def resolve_precision(
    precision: str | bool, device_type: str, caps: Capabilities, *, cpu_auto: bool = True
) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on a device type, or None for float32.

    Args:
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (also ``off``, ``float32``, ``bfloat16``,
            ``float16``; ``True`` means ``auto`` and ``False`` ``fp32``).
        device_type: ``cpu`` or ``cuda``.
        caps: what the hardware runs natively (:func:`detect`).
        cpu_auto: whether ``auto`` may pick bf16 on a CPU that has it (prediction: yes; training: no).

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or None. ``auto``: on CUDA bf16 where native, else fp16; on CPU
        bf16 where native (and ``cpu_auto``), else None. An explicit ``bf16``/``fp16`` is honoured everywhere
        (a warning says when the CPU would only emulate it).
    """
    name = {True: "auto", False: "fp32"}.get(precision, precision) if isinstance(precision, bool) else precision
    name = _ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; received {precision!r}")
    if name == "fp32":
        return None
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if caps.cuda_bf16 else torch.float16
        return torch.bfloat16 if device_type == "cpu" and cpu_auto and caps.cpu_bf16 else None
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    if device_type == "cpu" and not (caps.cpu_bf16 if name == "bf16" else caps.cpu_fp16):
        log.warning("%s on this CPU: no native %s instructions, so it is emulated and likely slower than fp32",
                    name, name)
    return dtype
