"""The training pipeline's loss: deep-supervision weights from the config, checked against the network."""

import pytest
import torch
import torch.nn.functional as F

from medseg.config import load_config
from medseg.errors import ConfigError
from medseg.nets import build_network
from pipelines.train import build_loss

BASE = {"data": {"root": "nowhere"}, "transforms": {"patch_size": [32, 32]}}


def _setup(name: str, params: dict, *overrides: str):
    cfg = load_config({**BASE, "model": {"name": name, "params": params}}, overrides)
    model = build_network(name, params, spatial_dims=2, in_channels=1, num_classes=3)
    return build_loss(cfg, model, 3), model


def _cost_of_one_bad_head(loss, num_heads: int) -> list[float]:
    """Loss when every full-resolution head is perfect but head ``i``, for each ``i``."""
    t = torch.randint(0, 3, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    good = 20 * F.one_hot(t, 3).movedim(-1, 1).float()
    bad = 20 * F.one_hot((t + 1) % 3, 3).movedim(-1, 1).float()
    return [loss([bad if i == j else good for j in range(num_heads)], t).total.item() for i in range(num_heads)]


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_unetpp_trains_the_head_of_every_prune_level_as_much_as_the_others(level):
    loss, model = _setup("unetpp", {"features": 2, "depth": 4, "prune_level": level})
    assert model.head_names == ("x_0_4", "x_0_1", "x_0_2", "x_0_3") and model.eval_head == f"x_0_{level}"
    costs = _cost_of_one_bad_head(loss, 4)
    # equal weights: a mistake on the head that pruned prediction reads costs as much as on any other
    assert costs[model.head_names.index(model.eval_head)] == pytest.approx(max(costs), rel=1e-5)
    assert min(costs) == pytest.approx(max(costs), rel=1e-5) and min(costs) > 1


def test_the_configured_weights_reach_the_loss_in_output_order():
    loss, model = _setup("unetpp", {"features": 2, "depth": 3}, "loss.deep_supervision_weights=[2, 1, 1]")
    costs = _cost_of_one_bad_head(loss, 3)
    assert costs == pytest.approx([2 * costs[1], costs[1], costs[1]], rel=1e-5)
    alone = 4 * costs[1]  # one bad head with all the weight
    loss, _ = _setup("unetpp", {"features": 2, "depth": 3}, "loss.deep_supervision_weights=halving")
    assert _cost_of_one_bad_head(loss, 3) == pytest.approx([alone * 4 / 7, alone * 2 / 7, alone / 7], rel=1e-5)


def test_unet_halves_by_default_and_segnet_has_one_output():
    loss, model = _setup("unet", {"features": 2, "depth": 3, "deep_supervision": True})
    assert model.head_names == ("level_0", "level_1", "level_2")
    assert loss.ds_weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    loss, model = _setup("segnet", {"features": 2, "depth": 2}, "loss.deep_supervision_weights=equal")
    assert loss.ds_weights == [1.0] and model.head_names == ("logits",)


@pytest.mark.parametrize(
    "name, params, weights, expected",
    [
        ("unetpp", {"depth": 3}, "[1, 1]", "expected 3 weights (one per network output), got 2: [1.0, 1.0]; "
                                            "the network's outputs are x_0_3, x_0_1, x_0_2"),
        ("unetpp", {"depth": 3, "deep_supervision": False}, "[1, 1, 1]", "the network's outputs are x_0_3"),
        ("unet", {"depth": 3}, "[1, 0.5]", "the network's outputs are level_0"),
        ("segnet", {"depth": 2}, "[1, 1]", "the network's outputs are logits"),
        ("unetpp", {"depth": 3, "prune_level": 2}, "[1, 1, 0]", "the head on x_0_2, which prediction uses"),
        ("unetpp", {"depth": 3}, "[0, 1, 1]", "the head on x_0_3, which prediction uses"),
    ],
)
def test_weights_that_do_not_fit_the_network_name_the_key(name, params, weights, expected):
    with pytest.raises(ConfigError) as err:
        _setup(name, {"features": 2, **params}, f"loss.deep_supervision_weights={weights}")
    assert err.value.key == "loss.deep_supervision_weights"
    assert expected in str(err.value)
