"""Cross-validation folds in nnU-Net's ``splits_final.json`` shape: ``[{"train": [...], "val": [...]}, ...]``.

The folds are a deterministic function of the case names and a seed (every case is validated in exactly one
fold), written once to ``splits.json`` and read back from then on, so adding runs never reshuffles them; a
file the user wrote wins over anything computed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.errors import DataError

log = logging.getLogger(__name__)


def make_folds(names: Sequence[str], k: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """``k`` folds of ``names``: a seeded permutation of the sorted names cut into ``k`` near-equal parts."""
    if k < 2 or k > len(names):
        raise ValueError(f"expected 2 <= folds <= the number of cases ({len(names)}), got {k}")
    order = [sorted(names)[i] for i in np.random.default_rng(seed).permutation(len(names))]
    parts = [sorted(order[i::k]) for i in range(k)]
    return [{"train": sorted(set(names) - set(val)), "val": val} for val in parts]


def check_folds(splits: object, names: Sequence[str], path: Path) -> list[dict[str, list[str]]]:
    """Validate a splits file's content against the dataset's case names (errors name the file)."""
    if not isinstance(splits, list) or not splits:
        raise DataError(path, 'expected a non-empty list of {"train": [...], "val": [...]} (nnU-Net splits_final.json)')
    known = set(names)
    for i, fold in enumerate(splits):
        if not isinstance(fold, dict) or set(fold) != {"train", "val"}:
            raise DataError(path, f'fold {i}: expected {{"train": [...], "val": [...]}}, got {str(fold)[:80]}')
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
        if unknown:
            raise DataError(path, f"fold {i}: cases not in the dataset: {unknown[:5]}")
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both:
            raise DataError(path, f"fold {i}: cases in both train and val: {both[:5]}")
        if not fold["val"] or not fold["train"]:
            raise DataError(path, f"fold {i}: empty train or val list")
    return splits


def load_or_create_folds(path: Path, names: Sequence[str], k: int, seed: int = 0) -> list[dict[str, list[str]]]:
    """The folds in ``path`` if it exists (the user's or an earlier run's), else new ones written there.

    Raises:
        DataError: an unreadable or inconsistent file, or one with another number of folds than ``k``.
    """
    path = Path(path)
    if path.is_file():
        try:
            splits = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(path, f"not readable JSON: {err}") from None
        splits = check_folds(splits, names, path)
        if len(splits) != k:
            raise DataError(path, f"holds {len(splits)} folds but data.folds is {k}; set data.folds: {len(splits)} "
                                  "or remove the file to make new folds")
        unseen = sorted(set(names) - {n for fold in splits for n in fold["val"]})
        if unseen:
            log.warning("%s: %d cases are validated in no fold (e.g. %s)", path, len(unseen), unseen[:3])
        return splits
    splits = make_folds(names, k, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(splits, indent=1) + "\n")
        log.info("wrote %d folds to %s", k, path)
    except OSError as err:
        raise DataError(path, f"cannot write the folds ({err}); set data.splits to a writable path") from None
    return splits
