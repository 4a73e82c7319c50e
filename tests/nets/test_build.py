import pytest

from medseg.errors import ConfigError
from medseg.nets import NETWORKS, UNet, build_network


def test_every_architecture_is_registered():
    assert NETWORKS.names() == ["segnet", "unet", "unetpp"]


def test_build_from_config():
    model = build_network("unet", {"features": 4, "depth": 2}, spatial_dims=3, in_channels=2, num_classes=4)
    assert isinstance(model, UNet)
    assert model.head.out_channels == 4


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="segnet, unet, unetpp") as err:
        build_network("vnet", None, spatial_dims=2, in_channels=1, num_classes=2)
    assert err.value.key == "model.name"


def test_spatial_dims_is_checked():
    with pytest.raises(ConfigError) as err:
        build_network("unet", None, spatial_dims=1, in_channels=1, num_classes=2)
    assert err.value.key == "data.spatial_dims"
