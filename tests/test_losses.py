"""DiceWeightedCELoss: invariants (perfect ~ 0, good < bad, weights shift cost), deep supervision, errors."""

import pytest
import torch
import torch.nn.functional as F

from medseg.losses import DiceWeightedCELoss, LossOutput, _downsample_to, deep_supervision_weights
from medseg.nets import UNet
from medseg.nets.blocks import coarse_size, crop_to, max_pool, pad_to_multiple, total_stride


def _labels(shape=(2, 16, 16), num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, num_classes, shape, generator=g)
    t.view(-1)[:num_classes] = torch.arange(num_classes)  # every class present somewhere in the batch
    return t


def _logits_for(target, num_classes, margin=20.0):
    """Logits whose argmax is ``target``, confident by ``margin``."""
    return margin * F.one_hot(target, num_classes).movedim(-1, 1).float()


@pytest.mark.parametrize("shape", [(2, 16, 16), (2, 8, 10, 6)])
def test_perfect_logits_give_about_zero(shape):
    loss = DiceWeightedCELoss(num_classes=3)
    t = _labels(shape)
    out = loss(_logits_for(t, 3), t)
    assert isinstance(out, LossOutput)
    assert out.total.ndim == 0 and out.total.item() < 1e-4
    assert set(out.parts) == {"dice", "ce"}


def test_good_costs_less_than_bad():
    loss = DiceWeightedCELoss(num_classes=3)
    t = _labels()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    good = _logits_for(t, 3, margin=3.0) + noise
    bad = _logits_for((t + 1) % 3, 3, margin=3.0) + noise
    out_good, out_bad = loss(good, t), loss(bad, t)
    assert out_good.total < out_bad.total
    assert out_good.parts["dice"] < out_bad.parts["dice"] and out_good.parts["ce"] < out_bad.parts["ce"]


def test_error_costs_more_where_the_weight_map_is_high():
    loss = DiceWeightedCELoss(num_classes=2)
    t = torch.zeros(1, 16, 16, dtype=torch.long)
    t[:, 4:12, 4:12] = 1
    weight = torch.ones(1, 1, 16, 16)
    weight[0, 0, 4, 4] = 10.0  # a "border" pixel of the object
    costs = []
    for pixel in [(4, 4), (8, 8)]:  # same wrong prediction (background) at weight 10, then at weight 1
        wrong = t.clone()
        wrong[0, pixel[0], pixel[1]] = 0
        costs.append(loss(_logits_for(wrong, 2, margin=5.0), t, weight=weight))
    assert costs[0].total > costs[1].total
    assert costs[0].parts["ce"] > 5 * costs[1].parts["ce"]  # the CE carries the map (about 10x)
    assert torch.isclose(costs[0].parts["dice"], costs[1].parts["dice"])  # the Dice does not


def test_class_weights_raise_the_cost_of_that_class():
    t = _labels()
    wrong = t.clone()
    wrong[t == 2] = 0  # every class-2 pixel missed
    logits = _logits_for(wrong, 3, margin=3.0)
    plain = DiceWeightedCELoss(num_classes=3)(logits, t)
    heavy = DiceWeightedCELoss(num_classes=3, class_weights=[1.0, 1.0, 10.0])(logits, t)
    assert heavy.parts["ce"] > plain.parts["ce"]


def test_include_background_changes_the_dice_mean():
    # Background perfect, the small foreground object missed entirely.
    t = torch.zeros(1, 16, 16, dtype=torch.long)
    t[:, 2:4, 2:4] = 1
    logits = _logits_for(torch.zeros_like(t), 2)
    without_bg = DiceWeightedCELoss(num_classes=2, include_background=False)(logits, t).parts["dice"]
    with_bg = DiceWeightedCELoss(num_classes=2, include_background=True)(logits, t).parts["dice"]
    assert without_bg.item() == pytest.approx(1.0, abs=1e-3)
    assert with_bg < without_bg


@pytest.mark.parametrize("ds_weights", ["halving", "equal"])
def test_identical_full_res_heads_equal_the_single_head_loss(ds_weights):
    loss = DiceWeightedCELoss(num_classes=3, ds_weights=ds_weights)
    t = _labels()
    logits = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    weight = 1 + torch.rand(2, 1, 16, 16)
    single = loss(logits, t, weight)
    multi = loss([logits, logits.clone(), logits.clone()], t, weight)
    torch.testing.assert_close(multi.total, single.total)
    for k in single.parts:
        torch.testing.assert_close(multi.parts[k], single.parts[k])


@pytest.mark.parametrize("spatial", [(16, 16), (8, 12, 16)])
def test_lower_resolution_heads_use_the_block_downsampled_target(spatial):
    loss = DiceWeightedCELoss(num_classes=3)
    quarter = _labels((2, *[s // 4 for s in spatial]))
    t = quarter
    for dim in range(1, t.ndim):  # blocks of 4, so every head's target holds every class
        t = t.repeat_interleave(4, dim=dim)
    half = t[(slice(None), *[slice(None, None, 2)] * len(spatial))]
    heads = [_logits_for(t, 3), _logits_for(half, 3), _logits_for(quarter, 3)]
    out = loss(heads, t[:, None], weight=torch.rand(2, 1, *spatial) + 0.5)
    assert out.total.item() < 1e-4  # every head is perfect for its own resized target
    heads[2] = _logits_for((quarter + 1) % 3, 3)
    assert loss(heads, t).total.item() > 0.1  # and a wrong low-resolution head is penalised


def test_weight_map_downsampling_keeps_a_thin_ridge():
    weight = torch.ones(1, 8, 8)
    weight[:, :, 3] = 10.0  # one-pixel ridge on an odd column: nearest (stride 2) would drop it
    _, pooled = _downsample_to((2, 2), torch.zeros(1, 8, 8, dtype=torch.long), weight, 2)
    assert pooled.mean().item() == pytest.approx(weight.mean().item())
    assert pooled.max().item() > 1.0


def test_gradient_flows_to_every_head():
    loss = DiceWeightedCELoss(num_classes=3)
    t = _labels()
    heads = [torch.randn(2, 3, 16, 16, requires_grad=True), torch.randn(2, 3, 8, 8, requires_grad=True)]
    loss(heads, t, weight=torch.rand(2, 16, 16)).total.backward()
    for h in heads:
        assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_half_precision_logits_are_computed_in_float32():
    loss = DiceWeightedCELoss(num_classes=3)
    t = _labels()
    out = loss(_logits_for(t, 3, margin=3.0).half(), t)
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)


def test_target_and_weight_layouts_are_equivalent():
    loss = DiceWeightedCELoss(num_classes=3)
    t = _labels()
    logits = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    weight = torch.rand(2, 16, 16) + 0.5
    ref = loss(logits, t, weight).total
    torch.testing.assert_close(loss(logits, t[:, None], weight[:, None]).total, ref)
    torch.testing.assert_close(loss(logits, t[:, None].float(), weight).total, ref)  # float labels


@pytest.mark.parametrize(
    "logits_shape, target, weight, match",
    [
        ((2, 4, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long), None, "4 channels, expected num_classes=3"),
        ((2, 3, 16, 16), torch.zeros(2, 16, 8, dtype=torch.long), None, r"target shape \(2, 16, 8\)"),
        ((2, 3, 16, 16), torch.full((2, 16, 16), 3), None, r"\[0, 2\].*max 3"),
        ((2, 3, 16, 16), torch.full((2, 16, 16), -1), None, "min -1"),
        ((2, 3, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long), torch.ones(2, 8, 8), r"weight shape \(2, 8, 8\)"),
        ((3, 16, 16), torch.zeros(3, 16, dtype=torch.long), None, "B C H W"),
    ],
)
def test_mismatches_raise_expected_vs_received(logits_shape, target, weight, match):
    with pytest.raises(ValueError, match=match):
        DiceWeightedCELoss(num_classes=3)(torch.zeros(logits_shape), target, weight)


def test_bad_heads_raise():
    loss = DiceWeightedCELoss(num_classes=3)
    t = torch.zeros(2, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="head 1 spatial size"):
        loss([torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 16, 16)], t)
    with pytest.raises(ValueError, match="head 1 has shape"):
        loss([torch.zeros(2, 3, 8, 8), torch.zeros(2, 2, 4, 4)], t)
    with pytest.raises(ValueError, match="empty list"):
        loss([], t)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 3, "class_weights": [1.0, 2.0]}, "3 non-negative numbers"),
        ({"num_classes": 3, "ds_weights": "linear"}, "halving, equal"),
        ({"num_classes": 3, "ds_weights": [1.0, -0.5]}, "finite weights >= 0"),
        ({"num_classes": 3, "ds_weights": [0, 0]}, "not all 0"),
        ({"num_classes": 3, "dice_weight": 0, "ce_weight": 0}, "not both 0"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiceWeightedCELoss(**kwargs)


def _blocks(cells: torch.Tensor, stride, size) -> torch.Tensor:
    """``B *s`` cell values -> ``B *size`` voxels, each cell repeated over its ``stride``-block (cut at the end).

    ``stride``: one for every axis or one per axis.
    """
    out = cells
    for axis, n in enumerate(size):
        f = stride if isinstance(stride, int) else stride[axis]
        out = out.repeat_interleave(f, dim=1 + axis).narrow(1 + axis, 0, n)
    return out


def _network_pooling(onehot: torch.Tensor, level: int, depth: int, size, strides=None) -> torch.Tensor:
    """Push ``B K *S`` maps through the networks' own geometry: pad, ``level`` max-pools, crop."""
    strides = strides or [[2] * len(size)] * depth
    pooled = pad_to_multiple(onehot, total_stride(strides, depth))
    for step in strides[:level]:
        pooled = max_pool(len(size), stride=step)(pooled)
    return crop_to(pooled, coarse_size(size, level, strides))


@pytest.mark.parametrize(
    "spatial, depth, strides",
    [
        ((17, 13), 3, None),
        ((11, 9, 7), 3, None),
        ((5, 19), 2, None),
        # anisotropic: the slice axis is pooled at the last step only, so heads 1 and 2 keep all 7 slices
        ((11, 9, 7), 3, [[2, 2, 1], [2, 2, 1], [2, 2, 2]]),
        ((13, 6), 3, [[2, 1], [2, 2], [1, 2]]),
    ],
)
def test_coarse_heads_are_trained_on_the_networks_feature_grid(spatial, depth, strides):
    # Sizes that are not multiples of 2**level: nearest resampling from 17 to 9 rows takes rows 0, 1, 3,
    # 5, ..., so from row 1 on a cell's target came from its neighbour's block.
    torch.manual_seed(0)
    heads = UNet(len(spatial), 1, 3, features=2, depth=depth, strides=strides, deep_supervision=True).train()(
        torch.randn(2, 1, *spatial)
    )
    strides = strides or [[2] * len(spatial)] * depth
    loss = DiceWeightedCELoss(num_classes=3)
    for level in range(1, depth):
        cell = total_stride(strides, level)
        assert tuple(heads[level].shape[2:]) == tuple(coarse_size(spatial, level, strides))  # the grid under test
        cells = _labels((2, *coarse_size(spatial, level, strides)))
        labels = _blocks(cells, cell, spatial)
        onehot = F.one_hot(labels, 3).movedim(-1, 1).float()
        assert torch.equal(_network_pooling(onehot, level, depth, spatial, strides).argmax(1), cells)
        weight = _blocks(torch.rand(cells.shape) + 0.5, cell, spatial)
        out = loss([_logits_for(labels, 3), _logits_for(cells, 3)], labels, weight)
        assert out.total.item() < 1e-4, f"level {level}: a head perfect on its grid costs {out.parts}"
        _, pooled = _downsample_to(cell, labels, weight, 3)
        torch.testing.assert_close(pooled, _network_pooling(weight[:, None], level, depth, spatial, strides)[:, 0])


@pytest.mark.parametrize("spatial", [(17, 13), (9, 7, 5)])
def test_a_coarse_cell_takes_a_label_present_in_its_own_block(spatial):
    labels = _labels((2, *spatial), num_classes=4, seed=3)  # no structure: a misplaced cell shows
    onehot = F.one_hot(labels, 4).movedim(-1, 1).float()
    for level in (1, 2):
        coarse, _ = _downsample_to([2**level] * len(spatial), labels, None, 4)
        present = _network_pooling(onehot, level, 3, spatial)  # B K *s: class k occurs in the cell's block
        assert present.gather(1, coarse[:, None]).min() == 1
        majority = (present > 0).sum(1) == 1  # single-class blocks keep their class
        assert torch.equal(coarse[majority], present.argmax(1)[majority])


def test_a_coarse_head_off_the_pooling_grid_is_an_error():
    loss = DiceWeightedCELoss(num_classes=3)
    t = _labels((2, 17, 16))
    with pytest.raises(ValueError, match=r"head 1 spatial size \(6, 8\) is not on a pooling grid"):
        loss([_logits_for(t, 3), torch.zeros(2, 3, 6, 8)], t)


@pytest.mark.parametrize(
    "spec, expected",
    [("halving", [8 / 15, 4 / 15, 2 / 15, 1 / 15]), ("equal", [0.25] * 4), ([2, 0, 1, 1], [0.5, 0, 0.25, 0.25])],
)
def test_deep_supervision_weights_are_normalised(spec, expected):
    assert deep_supervision_weights(spec, 4) == pytest.approx(expected)


def test_explicit_head_weights_scale_each_heads_share_of_the_loss():
    t = _labels()
    good, bad = _logits_for(t, 3), _logits_for((t + 1) % 3, 3)
    loss = DiceWeightedCELoss(num_classes=3, ds_weights=[3, 1, 0])
    totals = [loss([bad if i == j else good for j in range(3)], t).total.item() for i in range(3)]
    assert totals[0] == pytest.approx(3 * totals[1], rel=1e-4) and totals[2] < 1e-4
    with pytest.raises(ValueError, match="holds 3 weights but the model returned 2 outputs"):
        loss([good, good], t)


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_padding_never_votes_so_a_single_cell_gets_the_same_target_at_any_stride(stride):
    # An axis of 3 voxels under a head of stride >= 4 is one cell; the network's padding repeats the last
    # voxel, which a max-pool ignores and a vote must too: the majority of 1, 1, 2 is 1 and the mean
    # weight of 1, 1, 4 is 2, however far the block reaches past the image.
    target = torch.tensor([1, 1, 2]).view(1, 3, 1).expand(2, 3, 5).contiguous()
    weight = torch.tensor([1.0, 1.0, 4.0]).view(1, 3, 1).expand(2, 3, 5)
    labels, pooled = _downsample_to((stride, 1), target, weight, 3)
    assert labels.shape == (2, 1, 5) and (labels == 1).all()
    torch.testing.assert_close(pooled, torch.full((2, 1, 5), 2.0))
