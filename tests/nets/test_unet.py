import pytest
import torch

from medseg.nets import UNet
from medseg.nets.blocks import coarse_size
from tests.nets.contract import NetworkContract


class TestUNet(NetworkContract):
    name = "unet"
    params = {"features": 4, "depth": 3}

    def head_sizes(self, size, strides=None):
        strides = strides or [[2] * len(size)] * 3
        return [tuple(coarse_size(size, k, strides)) for k in (1, 2)]


def test_classic_configuration_has_the_papers_parameter_count():
    model = UNet(2, 1, 2, features=64, depth=4, norm="none", activation="relu", upsample="transpose")
    assert sum(p.numel() for p in model.parameters()) == 31_030_658


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_linear_upsampling_and_batch_norm(spatial_dims):
    model = UNet(spatial_dims, 1, 2, features=4, depth=2, norm="batch", upsample="linear")
    x = torch.randn(2, 1, *(13,) * spatial_dims)
    assert model(x).shape == (2, 2, *(13,) * spatial_dims)
