"""The representation loss: class loss on the class channels, regression terms on the others, every head."""

from __future__ import annotations

import pytest
import torch

from medseg.instances import build_representation
from medseg.instances.loss import InstanceLoss
from medseg.losses import DiceWeightedCELoss
from medseg.transforms.functional import instances_to_semantic
from tests.instances.clusters import touching_cells


def _batch(name: str, dims: int = 2):
    shape = (40, 44) if dims == 2 else (20, 22, 18)
    inst = touching_cells(shape, 6, 7.0 if dims == 2 else 5.0, seed=7)
    rep = build_representation(name)
    label = torch.from_numpy(instances_to_semantic(inst).astype("int64"))[None, None]
    targets = rep.targets(inst)
    return rep, label, None if targets is None else torch.from_numpy(targets)[None]


def _perfect_logits(label: torch.Tensor, regression: torch.Tensor) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1).float()
    return torch.cat([onehot * 20 - 10, regression], 1)


@pytest.mark.parametrize("name,dims", [("distance", 2), ("flows", 2), ("flows", 3)])
def test_truth_beats_noise_on_every_head(name, dims):
    rep, label, regression = _batch(name, dims)
    r = regression.shape[1]
    loss = InstanceLoss(DiceWeightedCELoss(3), rep, 3, r)
    good = _perfect_logits(label, regression)
    bad = good.clone()
    bad[:, 3:] += 0.5 * torch.randn_like(bad[:, 3:])
    pool = torch.nn.functional.avg_pool2d if dims == 2 else torch.nn.functional.avg_pool3d
    heads_good = [good, pool(good, 2)]
    heads_bad = [bad.requires_grad_(), pool(bad, 2)]
    out_good, out_bad = loss(heads_good, label, None, regression), loss(heads_bad, label, None, regression)
    assert set(out_bad.parts) == {"dice", "ce", "mse"} | ({"msge"} if name == "flows" else set())
    assert out_good.parts["mse"] < out_bad.parts["mse"] and out_good.total < out_bad.total
    out_bad.total.backward()
    assert bad.grad is not None and bad.grad[:, 3:].abs().sum() > 0


def test_without_regression_channels_it_is_the_class_loss():
    rep, label, _ = _batch("border")
    logits = torch.randn(1, 3, *label.shape[2:])
    plain = DiceWeightedCELoss(3)(logits, label)
    wrapped = InstanceLoss(DiceWeightedCELoss(3), rep, 3, 0)(logits, label)
    assert torch.equal(plain.total, wrapped.total)


def test_shapes_are_checked():
    rep, label, regression = _batch("flows")
    loss = InstanceLoss(DiceWeightedCELoss(3), rep, 3, 2)
    with pytest.raises(ValueError, match="classes \\+ regression"):
        loss(torch.randn(1, 3, *label.shape[2:]), label, None, regression)
    with pytest.raises(ValueError, match="regression targets"):
        loss(torch.randn(1, 5, *label.shape[2:]), label, None, None)
