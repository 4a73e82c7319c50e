import pytest
import torch

from medseg.errors import ConfigError, InvalidArguments
from medseg.nets import UNetPlusPlus
from tests.nets.contract import IN_CHANNELS, NetworkContract


class TestUNetPlusPlus(NetworkContract):
    name = "unetpp"
    params = {"features": 4, "depth": 3}

    def head_sizes(self, size, strides=None):
        return [size, size]  # x_0_1 and x_0_2, at full resolution


def test_nodes_follow_the_papers_grid():
    model = UNetPlusPlus(2, 1, 2, features=4, depth=3)
    expected = {f"x_{i}_{j}" for i in range(4) for j in range(4 - i)}
    assert set(model.nodes) == expected


@pytest.mark.parametrize("level", [1, 2, 3])
def test_pruned_inference_runs_the_trained_sub_network(level):
    # a size that needs no padding at any level, so the pruned and the full network see the same input
    torch.manual_seed(0)
    model = UNetPlusPlus(2, IN_CHANNELS, 3, features=4, depth=3)
    x = torch.randn(1, IN_CHANNELS, 32, 24)
    with torch.no_grad():
        heads = model.train()(x)  # [x_0_3, x_0_1, x_0_2]; instance norm: train and eval agree
        by_level = {3: heads[0], 1: heads[1], 2: heads[2]}
        model.eval().prune_level = level
        torch.testing.assert_close(model(x), by_level[level])
        model.prune_level = level
        assert model(torch.randn(1, IN_CHANNELS, 7, 5)).shape == (1, 3, 7, 5)


def test_training_ignores_pruning():
    model = UNetPlusPlus(2, 1, 2, features=4, depth=2, prune_level=1).train()
    assert len(model(torch.randn(1, 1, 8, 8))) == 2


def test_prune_level_is_checked():
    model = UNetPlusPlus(2, 1, 2, features=4, depth=2)
    for bad in (0, 3):
        with pytest.raises(InvalidArguments, match="prune_level") as err:
            model.prune_level = bad
        assert not isinstance(err.value, ConfigError)  # the network knows its arguments, not config keys
    with pytest.raises(InvalidArguments, match="deep_supervision"):
        UNetPlusPlus(2, 1, 2, features=4, depth=2, deep_supervision=False, prune_level=1)
