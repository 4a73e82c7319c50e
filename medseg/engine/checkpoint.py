"""Training checkpoints: atomic saves, safe (``weights_only``) loads and the random-number state.

A checkpoint is one ``torch.save`` file holding a dict of plain Python containers, numbers, strings and
tensors, so :func:`load_checkpoint` can use ``torch.load(weights_only=True)`` and never runs code from the
file. :func:`save_checkpoint` checks that before writing: a NumPy scalar slipped into the history would
otherwise save fine and only fail when the run is resumed, days later.

Saving is atomic: the file is written beside its destination under a temporary name, flushed to disk and
renamed over ``path`` in one step. A crash or ``kill`` during a save therefore leaves the previous checkpoint
intact; a hard kill can leave a ``.<name>.<pid>.<token>.tmp`` file behind, never a half-written ``path``.

Example:
    >>> state = {"model": model.state_dict(), "epoch": 3, "rng": capture_rng_state()}
    >>> save_checkpoint(Path("runs/demo/last.pt"), state)
    >>> state = load_checkpoint(Path("runs/demo/last.pt"))
    >>> restore_rng_state(state["rng"])
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import DataError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "medseg-checkpoint-v1"
"""The ``"format"`` value written by :func:`save_checkpoint` and required by :func:`load_checkpoint`."""

# What torch's weights-only unpickler accepts by default. Exact types on purpose: ``np.float64`` is a
# subclass of ``float`` and a NamedTuple one of ``tuple``, yet neither can be loaded with weights_only=True.
_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device)
_PLAIN_MAPPINGS = (dict, OrderedDict)
_PLAIN_SEQUENCES = (list, tuple, set)


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically, adding ``"format": CHECKPOINT_FORMAT``.

    Args:
        path: destination; its folder is created when missing. An existing file is replaced only once the
            new one is completely on disk.
        state: plain containers (dict, list, tuple, set), numbers, strings, ``None`` and tensors, nested
            to any depth. The caller's mapping is not modified.

    Returns:
        ``path``.

    Raises:
        TypeError: ``state`` holds something ``torch.load(weights_only=True)`` would refuse, e.g. a NumPy
            scalar or array; the message names its key path. Nothing is written then.
        DataError: the write failed (disk full, file-size limit, I/O error): names ``path`` and the system's
            reason. The temporary file is removed and a previous checkpoint at ``path`` is left intact.
    """
    path = Path(path)
    _check_plain(state, "state")
    payload = {**state, "format": CHECKPOINT_FORMAT}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Our own O_EXCL temporary name rather than tempfile's: tempfile creates files with mode 0600, and the
    # rename would carry that mode over, making checkpoints unreadable to the group. os.open honours umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        # BaseException: a KeyboardInterrupt during a long save must not leave the temporary file either.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(err, (OSError, RuntimeError)):  # torch reports a failed write as "[enforce fail at ...]"
            raise DataError(path, f"cannot save the checkpoint: {_write_failure(err, path.parent)}; "
                                  "the previous checkpoint, if any, is unchanged") from err
        raise
    _fsync_dir(path.parent)
    return path


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], source, what: str = "the model") -> None:
    """``model.load_state_dict(weights)`` (strict), failing with one line that names ``source`` and the first
    tensor that does not fit, instead of torch's list of every mismatch.

    Raises:
        DataError: a tensor missing from ``weights``, one the model does not have, or one of another shape.
    """
    own = model.state_dict()
    problem = None
    for key, tensor in weights.items():
        if key not in own:
            problem = f"unexpected tensor '{key}' (the checkpoint has it, the model does not)"
        elif tuple(own[key].shape) != tuple(tensor.shape):
            problem = (f"size mismatch for '{key}': checkpoint {list(tensor.shape)}, "
                       f"model {list(own[key].shape)}")
        if problem:
            break
    else:
        missing = [key for key in own if key not in weights]
        if missing:
            problem = f"missing tensor '{missing[0]}' (+{len(missing) - 1} more)" if len(missing) > 1 else (
                f"missing tensor '{missing[0]}'")
    if problem:
        raise DataError(source, f"weights do not fit {what}: {problem}")
    model.load_state_dict(weights)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load`` (``"cpu"``, a ``torch.device``, ...).

    Returns:
        The saved state, including its ``"format"`` key.

    Raises:
        DataError: naming ``path`` when it is missing, truncated or corrupt, holds objects that need
            arbitrary code to load, or is not a medseg checkpoint of a supported format.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "checkpoint not found"
        raise DataError(path, what)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise DataError(path, f"cannot be loaded safely (weights_only=True): {_unpickler_reason(err)}") from err
    except (EOFError, OSError, RuntimeError, ValueError) as err:
        # Seen for truncated files: EOFError (empty), RuntimeError (zip directory missing), OSError (EINVAL).
        raise DataError(path, f"truncated or corrupt checkpoint ({type(err).__name__}: {_first_line(err)})") from err
    if not isinstance(state, dict) or "format" not in state:
        raise DataError(path, f"not a medseg checkpoint: expected a dict with format {CHECKPOINT_FORMAT!r}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise DataError(
            path,
            f"unsupported checkpoint format {state['format']!r}; this version reads {CHECKPOINT_FORMAT!r}",
        )
    return state


# ------------------------------------------------------------------------------------------------ RNG state


def capture_rng_state() -> dict[str, Any]:
    """The state of every global random-number generator, as plain lists and tensors.

    Covers Python's ``random``, NumPy's legacy global generator (``np.random.*``), torch's CPU generator
    and, when CUDA is available, the generator of every visible CUDA device. ``np.random.default_rng()``
    instances are not global and are not captured.

    Returns:
        ``{"python": [...], "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor, ...] | None}``,
        loadable with ``weights_only=True``.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": {
            "bit_generator": str(name),
            "state": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # uint32 values, stored widened
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back the generators captured by :func:`capture_rng_state`.

    CUDA states are restored device by device; when the number of visible devices changed since the
    capture, the common ones are restored and a warning is logged. A capture without CUDA restored on a
    CUDA machine leaves the CUDA generators as they are.
    """
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["bit_generator"],
            torch.as_tensor(np_state["state"]).numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8, device="cpu"))
    cuda_states = state.get("cuda")
    if cuda_states is None or not torch.cuda.is_available():
        if cuda_states is not None:
            log.warning("checkpoint holds CUDA random states but CUDA is not available: not restored")
        return
    count = torch.cuda.device_count()
    if len(cuda_states) != count:
        log.warning(
            "checkpoint holds random states of %d CUDA devices, %d are visible: restoring the first %d",
            len(cuda_states),
            count,
            min(count, len(cuda_states)),
        )
    for index, cuda_state in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8, device="cpu"), index)


# ------------------------------------------------------------------------------------------------ helpers


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError at the first value ``torch.load(weights_only=True)`` would refuse."""
    kind = type(obj)
    if kind in _PLAIN_SCALARS or isinstance(obj, torch.Tensor):
        return
    if kind in _PLAIN_MAPPINGS:
        for key, value in obj.items():
            if type(key) not in _PLAIN_SCALARS:
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not a plain key")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if kind in _PLAIN_SEQUENCES:
        for index, value in enumerate(obj):
            _check_plain(value, f"{where}[{index}]")
        return
    hint = " (convert it with float(), int() or torch.as_tensor())" if kind.__module__ == "numpy" else ""
    raise TypeError(
        f"{where}: {kind.__module__}.{kind.__qualname__} cannot be loaded with torch.load(weights_only=True);"
        f" expected dict, list, tuple, set, str, bytes, int, float, bool, None or a tensor{hint}"
    )


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); Windows cannot open a folder for fsync."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_failure(err: BaseException, folder: Path) -> str:
    """The system's reason behind a failed write: the ``OSError`` torch's error hides in its context, else what
    the file system and the process limits say."""
    seen = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.strerror:
            return f"{cause.strerror} (errno {cause.errno})"
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    reasons = []
    with contextlib.suppress(OSError):
        free = os.statvfs(folder)
        if free.f_bavail * free.f_frsize < 1 << 20:
            reasons.append("the disk is full")
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            reasons.append(f"the process may write files of at most {limit} bytes (ulimit -f)")
    except (ImportError, OSError, ValueError):  # not POSIX
        pass
    return " or ".join(reasons) or f"write failed ({_first_line(err)})"


def _unpickler_reason(err: Exception) -> str:
    """The useful sentence of torch's long weights-only error message."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(err), flags=re.S)
    reason = match.group(1) if match else _first_line(err)
    return " ".join(reason.split())[:300]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "no message"
