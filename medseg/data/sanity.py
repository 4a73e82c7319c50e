"""What must hold for a loaded image before anything is computed from it: finite voxels, an invertible affine
and the channel count the model expects. Shared by `check`, training and prediction, so each fault gets the
same sentence wherever it is met.

:class:`ValidateImaged` is the MONAI dictionary transform that applies these checks right after loading; it
raises :class:`~medseg.errors.DataError` naming the file, which the pipelines report without a traceback.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy

from medseg.data.readers import PIL_EXTENSIONS, TIFF_EXTENSIONS, split_name
from medseg.errors import DataError

NONFINITE_MODES = ("error", "replace")
NONFINITE_HINT = ("pass --nonfinite replace to replace them (NaN and -Inf by the scan's lowest finite value, "
                  "+Inf by its highest)")


def source_name(image: MetaTensor) -> str:
    """The file(s) an image was loaded from, for messages."""
    names = image.meta.get("filename_or_obj", "") if isinstance(image, MetaTensor) else ""
    return ", ".join(map(str, names)) if isinstance(names, (list, tuple)) else str(names)


def nonfinite_counts(array) -> tuple[int, int]:
    """``(NaN voxels, +/-Inf voxels)`` of a tensor or array."""
    tensor = torch.as_tensor(array)
    if not tensor.is_floating_point():
        return 0, 0
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def nonfinite_message(n_nan: int, n_inf: int) -> str:
    return f"{n_nan} NaN and {n_inf} Inf voxels"


def replace_nonfinite(image: torch.Tensor) -> torch.Tensor:
    """NaN and -Inf -> the lowest finite value, +Inf -> the highest (0 when nothing is finite), per image."""
    finite = image[torch.isfinite(image)]
    low, high = (finite.min().item(), finite.max().item()) if finite.numel() else (0.0, 0.0)
    return torch.nan_to_num(image, nan=low, posinf=high, neginf=low)


def geometry_problem(affine, spatial_rank: int) -> str | None:
    """Why an affine cannot place voxels in space (non-finite, a zero spacing, collinear axes), else None.

    Such an image cannot be resampled or written back with its geometry, so it is refused before any compute.
    """
    matrix = to_affine_nd(spatial_rank, convert_to_numpy(affine, dtype=np.float64))
    linear = matrix[:spatial_rank, :spatial_rank]
    if not np.all(np.isfinite(matrix)):
        return "degenerate affine: it holds NaN or Inf values"
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 1e-8):
        shown = ", ".join(f"{s:g}" for s in spacing)
        return f"degenerate affine: zero spacing ({shown}); every axis needs a positive voxel size"
    volume = abs(np.linalg.det(linear)) / np.prod(spacing)  # 1 for orthogonal axes, 0 for collinear ones
    if volume < 1e-6:
        return "degenerate affine: its axes are collinear (the voxel grid has no volume)"
    return None


def channel_description(image: MetaTensor) -> str:
    """How the channels of a loaded image came about: ``"4D NIfTI with 2 volumes"``, ``"3 channel files"``..."""
    channels = int(image.shape[0])
    names = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
    if isinstance(names, (list, tuple)) and len(names) > 1:
        return f"{len(names)} channel files"
    dim = image.meta.get("dim") if isinstance(image, MetaTensor) else None
    if dim is not None:
        dim = [int(d) for d in np.asarray(convert_to_numpy(dim)).ravel()]
        if dim and dim[0] == 4:
            return f"4D NIfTI with {dim[4]} volumes"
        if dim and dim[0] == 5:
            return f"5D NIfTI with {dim[5]} components per voxel"
    return f"{channels} values per pixel"


def grey_conversion(image: torch.Tensor, expected: int) -> tuple[torch.Tensor, str] | None:
    """The lossless grey <-> RGB conversions of a picture file (PNG, JPEG, TIFF) whose channel count is not
    ``expected``: a grey picture saved as RGB (three identical channels) for a one-channel model becomes its
    first channel; a one-channel picture for a three-channel (RGB) model is repeated as R, G and B, as image
    libraries convert grey to RGB. Returns the converted image and a sentence saying what was done, or None
    (anything else, and every scan format: two identical volumes of a NIfTI are not a colour picture)."""
    if not is_picture(image):
        return None
    channels = int(image.shape[0])
    if expected == 1 and channels == 3 and bool(torch.all(image == image[:1])):
        return image[:1], f"its {channels} identical channels (grey saved as colour) used as the one channel"
    if expected == 3 and channels == 1:
        return image.repeat(3, *([1] * (image.ndim - 1))), "grey image given to an RGB model: used as R, G and B"
    return None


def is_picture(image: torch.Tensor) -> bool:
    """Loaded from one PNG, JPEG or TIFF file (where RGB means colour, not several scans)."""
    names = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
    return isinstance(names, (str, Path)) and split_name(names)[1] in PIL_EXTENSIONS + TIFF_EXTENSIONS


def channel_problem(image: MetaTensor, expected: int) -> str | None:
    channels = int(image.shape[0])
    if channels == expected:
        return None
    differ = " that differ (not grey)" if expected == 1 and channels == 3 and is_picture(image) else ""
    return (f"model expects {expected} channel{'s' if expected != 1 else ''}, this file has {channels}{differ} "
            f"({channel_description(image)})")


class ValidateImaged(MapTransform):
    """Refuses an image with non-finite voxels (or replaces them), a degenerate affine or the wrong number of
    channels, naming its file; place it right after loading. Grey and grey-saved-as-colour images are converted
    to the channel count expected where that loses nothing (:func:`grey_conversion`).

    Args:
        keys: image keys (``[C, *spatial]`` MetaTensors).
        in_channels: the channel count every image must have (None: not checked).
        nonfinite: ``"error"`` or ``"replace"`` (see :func:`replace_nonfinite`); a replacement is recorded
            as a sentence under ``warnings_key``.
        warnings_key: the data key receiving a list of warnings (replacements, grey conversions); None: none
            are recorded (training batches must all have the same keys).
    """

    def __init__(self, keys: Sequence[Hashable], in_channels: int | None = None, nonfinite: str = "error",
                 warnings_key: str | None = "warnings"):
        super().__init__(keys)
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite: expected one of {NONFINITE_MODES}, got {nonfinite!r}")
        self.in_channels, self.nonfinite, self.warnings_key = in_channels, nonfinite, warnings_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            name = source_name(image) or str(key)
            rank = image.ndim - 1
            problem = geometry_problem(image.affine, rank) if isinstance(image, MetaTensor) else None
            if problem is None and self.in_channels is not None:
                converted = grey_conversion(image, self.in_channels)
                if converted is not None:
                    image = d[key] = converted[0]
                    self._note(d, name, converted[1])
                problem = channel_problem(image, self.in_channels)
            if problem:
                raise DataError(name, problem)
            n_nan, n_inf = nonfinite_counts(image)
            if n_nan or n_inf:
                if self.nonfinite == "error":
                    raise DataError(name, f"{nonfinite_message(n_nan, n_inf)}; {NONFINITE_HINT}")
                d[key] = replace_nonfinite(image)
                self._note(d, name, f"{nonfinite_message(n_nan, n_inf)} replaced")
        return d

    def _note(self, d: dict, name: str, sentence: str) -> None:
        if self.warnings_key is not None:
            d.setdefault(self.warnings_key, []).append(f"{Path(name).name}: {sentence}")
