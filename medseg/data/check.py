"""Dataset integrity: read every case once and report every problem at once, one line each, naming the file.

Each fault is reported once: a file that cannot be read (or is empty) yields one line and is left out of
the comparisons that would otherwise repeat it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd

from medseg.data.datalist import Case, DatasetInfo, Problem, discover
from medseg.data.readers import load_image
from medseg.data.sanity import (
    channel_description,
    geometry_problem,
    is_picture,
    nonfinite_counts,
    nonfinite_message,
)
from medseg.errors import DataError


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`; ``n_cases`` counts training and test cases."""

    root: Path
    n_cases: int
    problems: list[Problem]
    skipped: list[Path]

    @property
    def fatal(self) -> bool:
        return any(p.severity == "error" for p in self.problems)

    def lines(self) -> list[str]:
        """One line per problem (``"ERROR path: message"``), then one per skipped file."""
        return [str(p) for p in self.problems] + [f"SKIPPED {p}" for p in self.skipped]

    def summary(self) -> str:
        errors = sum(p.severity == "error" for p in self.problems)
        return (
            f"{self.root}: {self.n_cases} cases, {errors} errors, "
            f"{len(self.problems) - errors} warnings, {len(self.skipped)} skipped"
        )


def check_dataset(root_or_info, *, label_values: set[int] | None = None, geometry_tol: float = 1e-3) -> CheckReport:
    """Check a dataset folder (or what :func:`discover` found in it).

    Reports discovery problems (missing labels, orphan labels, duplicate names, entries outside the folder...),
    then per case: empty (0-byte or zero-size) and unreadable files, NaN/Inf, a degenerate affine (zero
    spacing, collinear axes), spatial shape or geometry (spacing, origin, direction) that differ between the
    channels and the label, and label values that are not integers or not allowed; across cases: a channel
    count that differs from the other cases or from ``channel_names``, and labels that are all background.

    Args:
        root_or_info: dataset folder, its ``dataset.json``, or a :class:`DatasetInfo`.
        label_values: allowed label values. Default: the ``labels`` ids of a semantic ``dataset.json``;
            any non-negative integer for instance labels or when no labels are declared.
        geometry_tol: relative and absolute tolerance on spacing, origin and direction.

    Raises:
        DataError: when no dataset layout is found (see :func:`discover`).
    """
    info = root_or_info if isinstance(root_or_info, DatasetInfo) else discover(root_or_info)
    if label_values is not None:
        allowed = {int(v) for v in label_values}
    elif info.label_kind == "semantic" and info.labels:
        allowed = set(info.labels.values())
    else:
        allowed = None
    problems = list(info.problems)
    cases = info.cases + info.test_cases
    seen = _Seen()
    for case in cases:
        problems += _check_case(case, allowed, geometry_tol, seen)
    problems += seen.problems(info)
    return CheckReport(info.root, len(cases), problems, list(info.skipped))


class _Seen:
    """What the cases showed that only makes sense across cases: channel counts, foreground in the labels."""

    def __init__(self) -> None:
        # first file -> (count, how, several files, grey: one channel or identical ones)
        self.channels: dict[Path, tuple[int, str, bool, bool]] = {}
        self.labels = 0
        self.foreground = 0

    def problems(self, info: DatasetInfo) -> list[Problem]:
        out = []
        declared = len(info.channel_names)
        usual = Counter(n for n, _, _, _ in self.channels.values()).most_common(1)
        for path, (count, how, several, grey) in self.channels.items():
            if declared and count != declared and (several or not how.endswith("values per pixel")):
                names = ", ".join(info.channel_names.values())
                out.append(Problem("error", str(path), f"{count} channels ({how}); dataset.json channel_names "
                                                       f"declares {declared} ({names})"))
            elif usual and count != usual[0][0] and not _convertible(count, grey, usual[0][0]):
                out.append(Problem("error", str(path), f"{count} channels ({how}) where the other cases have "
                                                       f"{usual[0][0]}"))
        if self.labels and not self.foreground:
            out.append(Problem("warning", str(info.root), f"all {self.labels} label maps are background only (0): "
                                                          "a model trained on them learns nothing (Dice 0)"))
        return out


def _convertible(count: int, grey: bool, usual: int) -> bool:
    """Training and prediction convert this image to the usual channel count losslessly (grey stored as
    colour -> one channel, grey -> RGB; :func:`medseg.data.sanity.grey_conversion`)."""
    return (usual == 1 and grey and count == 3) or (usual == 3 and grey and count == 1)


def _check_case(case: Case, allowed: set[int] | None, tol: float, seen: _Seen) -> list[Problem]:
    problems: list[Problem] = []
    channels = []
    for path in case.images:
        image = _load(path, problems)
        if image is None:
            continue
        n_nan, n_inf = nonfinite_counts(image)
        if n_nan or n_inf:
            problems.append(Problem("error", str(path), nonfinite_message(n_nan, n_inf)))
        channels.append((path, image))
    if channels and len(channels) == len(case.images):
        count = sum(int(image.shape[0]) for _, image in channels)
        how = f"{len(channels)} channel files" if len(channels) > 1 else channel_description(channels[0][1])
        first = channels[0][1]
        grey = len(channels) == 1 and is_picture(first) and (count == 1 or bool(torch.all(first == first[:1])))
        seen.channels[case.images[0]] = (count, how, len(channels) > 1, grey)
    for path, image in channels[1:]:
        _compare(path, image, *channels[0], tol, problems)
    if case.label is None:
        return problems
    label = _load(case.label, problems)
    if label is None:
        return problems
    message = _label_values_problem(label, allowed)
    if label.shape[0] != 1:
        message = f"a label map has 1 channel, this one has {label.shape[0]}"
    if message:
        problems.append(Problem("error", str(case.label), message))
    seen.labels += 1
    seen.foreground += bool(torch.any(label != 0))
    if channels:
        _compare(case.label, label, *channels[0], tol, problems)
    return problems


def _load(path: Path, problems: list[Problem]) -> MetaTensor | None:
    """The image, or None after recording why it cannot be used (empty file, unreadable, no voxels)."""
    if path.is_file() and path.stat().st_size == 0:
        problems.append(Problem("error", str(path), "empty file (0 bytes)"))
        return None
    try:
        image = load_image(path)
    except DataError as err:
        problems.append(Problem("error", str(path), err.message))
        return None
    if image.numel() == 0:
        shape = tuple(int(s) for s in image.meta.get("spatial_shape", image.shape[1:]))
        problems.append(Problem("error", str(path), f"empty image (no voxels, spatial shape {shape})"))
        return None
    degenerate = geometry_problem(image.affine, image.ndim - 1)
    if degenerate:
        problems.append(Problem("error", str(path), degenerate))
        return None  # its geometry cannot be compared with the others
    return image


def _label_values_problem(label: MetaTensor, allowed: set[int] | None) -> str | None:
    values = torch.unique(label.as_tensor())
    if not torch.isfinite(values).all():
        return "label holds NaN/Inf values"
    fractional = values[values != torch.round(values)]
    if fractional.numel():
        return f"label holds non-integer values, e.g. {fractional[0].item():g}"
    found = {int(v) for v in values.tolist()}
    if allowed is None:
        bad = sorted(v for v in found if v < 0)
        return f"negative label values {_few(bad)}" if bad else None
    bad = sorted(found - allowed)
    return f"label values {_few(bad)} are not among the declared {sorted(allowed)}" if bad else None


def _few(values: list[int], n: int = 10) -> str:
    return ", ".join(map(str, values[:n])) + (f" (+{len(values) - n} more)" if len(values) > n else "")


def _compare(path: Path, image: MetaTensor, ref_path: Path, ref: MetaTensor, tol: float, problems) -> None:
    """One problem for a spatial shape, one for a geometry that differs from the reference channel."""
    if image.shape[1:] != ref.shape[1:]:
        message = f"spatial shape {tuple(image.shape[1:])} differs from {ref_path.name} {tuple(ref.shape[1:])}"
        problems.append(Problem("error", str(path), message))
    if image.ndim != ref.ndim:
        return
    differ = []
    for name, a, b in zip(("spacing", "origin", "direction"), _geometry(image), _geometry(ref)):
        if not np.allclose(a, b, rtol=tol, atol=tol):
            differ.append(f"{name} {_fmt(a)} vs {_fmt(b)}")
    if differ:
        problems.append(Problem("error", str(path), f"geometry differs from {ref_path.name}: {'; '.join(differ)}"))


def _geometry(image: MetaTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spacing, origin and direction (RAS) of a channel-first image, from its affine."""
    rank = image.ndim - 1
    affine = to_affine_nd(rank, image.affine.numpy())
    spacing = np.linalg.norm(affine[:rank, :rank], axis=0)
    return spacing, affine[:rank, -1], affine[:rank, :rank] / np.where(spacing == 0, 1, spacing)


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in np.ravel(values)) + ")"
