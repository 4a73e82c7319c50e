"""Ensembles of trained models (e.g. the folds of a cross-validation): average probabilities, not logits.

:class:`ProbabilityEnsemble` is a model like any other for the sliding-window predictor: it returns, per
window, ``log(mean_m softmax(z_m))`` for the class channels, so the predictor's own softmax gives exactly the
members' mean probability map (sigmoid / logit for one class), and the plain mean of any regression channels
that follow them (distance or flow maps of instance representations). Post-processing then runs once on
the averaged maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medseg.errors import ConfigError

# what every member must share: same classes and the same preprocessing, so their maps can be averaged
MUST_AGREE = ("spatial_dims", "in_channels", "classes", "label_kind", "instance_to_semantic", "normalize", "spacing",
              "instances")


class ProbabilityEnsemble(nn.Module):
    """Average of ``models``' probabilities (``num_classes`` channels) and of their remaining channels.

    Args:
        models: members, each mapping ``B C *S`` to ``B num_classes + R *S`` logits (+ R regression channels).
        num_classes: ``K``; 1 means sigmoid probabilities, else softmax over the K channels.

    Returns from ``forward(x)``: ``B K+R *S``; channels ``:K`` are log-probabilities (logit for K = 1) of the
    mean probability, channels ``K:`` the mean regression.
    """

    def __init__(self, models: Sequence[nn.Module], num_classes: int):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, rest = None, None
        for model in self.members:
            out = model(x)
            out = (out[0] if isinstance(out, (list, tuple)) else out).float()
            logits, regression = out[:, : self.num_classes], out[:, self.num_classes:]
            p = logits.softmax(1) if self.num_classes > 1 else logits.sigmoid()
            probs = p if probs is None else probs + p
            rest = regression if rest is None else rest + regression
        n = len(self.members)
        mean = (probs / n).clamp_min(torch.finfo(torch.float32).tiny)
        classes = mean.log() if self.num_classes > 1 else torch.logit(mean.clamp_max(1 - 1e-7))
        return torch.cat([classes, rest / n], dim=1)


def check_members(metas: Sequence[dict[str, Any]], sources: Sequence[str]) -> None:
    """Raise a ConfigError naming the first member whose classes or preprocessing differ from the first's."""
    first = metas[0]
    for meta, source in zip(metas[1:], sources[1:]):
        for key in MUST_AGREE:
            if meta.get(key) != first.get(key):
                raise ConfigError("--model", f"{source} and {sources[0]} cannot be ensembled: their '{key}' "
                                             f"differs ({meta.get(key)!r} vs {first.get(key)!r}); ensemble members "
                                             "must share classes and preprocessing")
