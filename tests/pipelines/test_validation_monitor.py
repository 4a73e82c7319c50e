"""Instance models are validated (and their best checkpoint chosen) by instance AP, not by class Dice alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.config import load_config
from medseg.engine.loop import evaluate
from medseg.errors import ConfigError
from medseg.instances import build_representation
from medseg.metrics import dice_per_class
from medseg.transforms.functional import instances_to_semantic
from pipelines.train import _monitor, _set_monitor, _State
from pipelines.tune_instances import instance_scorer
from tests.instances.clusters import one_hot, touching_cells

CLASSES = ["background", "cell", "border"]
DEMO = Path(__file__).parents[2] / "configs" / "demo_cells.yaml"  # flows, cell_border


def _batches(instances: list[np.ndarray]) -> list[dict]:
    """Validation batches as the loader makes them: image, class label and the instance map, batch size 1."""
    out = []
    for i, inst in enumerate(instances):
        label = instances_to_semantic(inst, "cell_border", 1)
        # the image's value is the case's index: the stand-in networks below look the case up by it
        out.append({"image": torch.full((1, 1, *inst.shape), float(i)), "label": torch.as_tensor(label)[None, None],
                    "instance": torch.as_tensor(inst)[None, None], "case": [f"case{i}"]})
    return out


def _perfect_output(rep, inst: np.ndarray) -> torch.Tensor:
    """What a perfect network would give: one-hot classes, then the representation's own targets."""
    probs = one_hot(instances_to_semantic(inst, "cell_border", 1), 3)
    return torch.as_tensor(np.concatenate([probs, rep.targets(inst)]).astype(np.float32))


def _cfg(tmp_path, **train):
    return load_config(DEMO, [f"data.root={tmp_path}", "inference.min_instance_size=0"]
                       + [f"train.{k}={v}" for k, v in train.items()])


def test_validation_reports_instance_ap_merges_and_splits(tmp_path):
    rep = build_representation("flows")
    cases = [touching_cells((64, 72), 8, 8.0, seed=s) for s in (1, 2)]
    scorer = instance_scorer(_cfg(tmp_path), rep, len(CLASSES))

    def perfect(image):  # the reference's own targets: every nucleus comes back
        return _perfect_output(rep, cases[int(image.flatten()[0])])

    validation, _ = evaluate(perfect, _batches(cases), CLASSES, dice_per_class, case_metrics=scorer)
    assert [row["ap"] for row in validation.per_case] == [1.0, 1.0]
    assert validation.mean["ap"] == 1.0 and validation.mean["ap50"] == 1.0
    assert validation.mean["merges"] == 0 and validation.mean["splits"] == 0
    assert validation.mean["dice_mean"] == 1.0

    # two touching nuclei given one id in the targets: the post-processing merges them, AP shows it
    inst = cases[0]
    merged = inst.copy()
    a, b = _touching_pair(inst)
    merged[merged == b] = a
    validation, _ = evaluate(lambda image: _perfect_output(rep, merged), _batches([inst]), CLASSES, dice_per_class,
                             case_metrics=scorer)
    assert validation.mean["merges"] == 1 and validation.mean["ap"] < 1.0
    # the class Dice cannot see it (the border between the two is its only trace)
    assert validation.mean["dice_foreground"] == 1.0


def _touching_pair(inst: np.ndarray) -> tuple[int, int]:
    right = (inst[:, :-1] > 0) & (inst[:, 1:] > 0) & (inst[:, :-1] != inst[:, 1:])
    y, x = np.argwhere(right)[0]
    return int(inst[y, x]), int(inst[y, x + 1])


def test_cases_without_instances_get_no_instance_figures(tmp_path):
    rep = build_representation("flows")
    inst = touching_cells((48, 48), 4, 7.0, seed=3)
    batch = _batches([inst])[0]
    del batch["instance"]
    validation, _ = evaluate(lambda image: _perfect_output(rep, inst), [batch], CLASSES, dice_per_class,
                             case_metrics=instance_scorer(_cfg(tmp_path), rep, len(CLASSES)))
    assert "ap" not in validation.mean and validation.mean["dice_mean"] == 1.0


def test_monitor_follows_the_labels(tmp_path):
    rep = build_representation("flows")
    assert _monitor(_cfg(tmp_path), rep) == "ap"  # auto, instance labels
    assert _monitor(_cfg(tmp_path), None) == "dice_mean"  # auto, semantic labels
    assert _monitor(_cfg(tmp_path, monitor="dice"), rep) == "dice_mean"
    with pytest.raises(ConfigError, match="train.monitor"):
        _monitor(_cfg(tmp_path, monitor="ap"), None)


def test_a_resumed_run_chosen_by_another_figure_starts_its_best_afresh():
    state = _State(best=0.9, best_epoch=4, since_best=3)  # a checkpoint from before: chosen by Dice
    _set_monitor(state, "ap")
    assert state.best is None and state.since_best == 0 and state.monitor == "ap"
    state.best, state.since_best = 0.5, 2
    _set_monitor(state, "ap")  # the same figure: nothing changes
    assert state.best == 0.5 and state.since_best == 2
