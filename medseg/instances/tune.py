"""Post-processing thresholds chosen on validation cases, as StarDist chooses its probability and NMS
thresholds: every combination of a representation's small grid is scored by the mean instance AP over
IoU 0.5:0.95 and the best one is kept (ties: the first in grid order, the defaults' neighbourhood first).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medseg.instances.base import Representation
from medseg.metrics import instance_metrics

log = logging.getLogger(__name__)


@dataclass
class TuningResult:
    """The chosen thresholds, their score and every combination tried.

    Attributes:
        thresholds: name -> value, the best combination.
        score: its mean AP@0.5:0.95 over the cases.
        ap50: its mean AP@0.5.
        default_score: the default thresholds' mean AP@0.5:0.95 (what tuning gained over them).
        table: one row per combination: thresholds plus ``map`` and ``ap_50``.
    """

    thresholds: dict[str, float]
    score: float
    ap50: float
    default_score: float
    table: list[dict[str, float]] = field(default_factory=list)


def tune_thresholds(
    rep: Representation,
    cases: Sequence[tuple[np.ndarray, np.ndarray | None, np.ndarray]],
    min_size: int = 8,
    fixed: dict[str, float] | None = None,
) -> TuningResult:
    """Grid search of ``rep``'s post-processing thresholds on labelled cases.

    Args:
        rep: the representation.
        cases: ``(probs K *S, regression R *S or None, reference instances *S)`` per case.
        min_size: smallest object kept, as at prediction time.
        fixed: thresholds not to tune (their single value is used).

    Returns:
        :class:`TuningResult`; with no cases, the defaults (overridden by ``fixed``) and NaN scores.
    """
    fixed = {k: float(v) for k, v in (fixed or {}).items()}
    defaults = rep.check_thresholds(fixed)  # also rejects unknown names
    if not cases:
        return TuningResult(defaults, float("nan"), float("nan"), float("nan"))
    names = sorted(rep.thresholds)
    grid = rep.tuning_grid([ref for _, _, ref in cases], min_size)
    # the default value first on every axis, so ties keep the defaults
    axes = [
        [fixed[n]] if n in fixed else [defaults[n]] + [v for v in grid.get(n, ()) if v != defaults[n]]
        for n in names
    ]
    table = []
    for values in itertools.product(*axes):
        thresholds = dict(zip(names, values))
        scores = [
            instance_metrics(rep.postprocess(probs, reg, min_size=min_size, **thresholds), ref)
            for probs, reg, ref in cases
        ]
        table.append({**thresholds, "map": float(np.mean([s["map"] for s in scores])),
                      "ap_50": float(np.mean([s["ap_50"] for s in scores]))})
    best = max(range(len(table)), key=lambda i: table[i]["map"])  # first of equal maxima
    row = table[best]
    log.info("post-processing thresholds tuned on %d cases over %d combinations: %s (AP@0.5:0.95 %.4f, "
             "defaults %.4f)", len(cases), len(table), {n: row[n] for n in names}, row["map"], table[0]["map"])
    return TuningResult({n: row[n] for n in names}, row["map"], row["ap_50"], table[0]["map"], table)
