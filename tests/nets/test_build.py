import pytest

from medseg.errors import ConfigError, InvalidArguments
from medseg.nets import NETWORKS, UNet, build_network, check_network


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


@pytest.mark.parametrize("name", ["unet", "unetpp", "segnet"])
def test_a_network_raises_a_plain_value_error_naming_all_its_bad_arguments(name):
    with pytest.raises(InvalidArguments) as err:
        NETWORKS.get(name)(2, 1, 2, features=0, depth=0, norm="group")
    assert isinstance(err.value, ValueError) and not isinstance(err.value, ConfigError)
    assert set(err.value.problems) == {"features", "depth", "norm"}


def test_the_config_layer_names_every_problem_by_key_path_and_never_lists_pipeline_arguments():
    with pytest.raises(ConfigError) as err:
        check_network("unet", {"depth": 0, "norm": "group", "feature": 8, "in_channels": 3}, spatial_dims=2)
    problems = dict(err.value.problems)
    assert set(problems) == {"model.params.depth", "model.params.norm", "model.params.feature",
                             "model.params.in_channels"}
    listed = problems["model.params.feature"].split("expected one of: ")[1].split(", ")
    assert "features" in listed and not {"spatial_dims", "in_channels", "num_classes"} & set(listed)
    assert "pipeline" in problems["model.params.in_channels"]


def test_checking_a_network_allocates_nothing():
    check_network("segnet", {"features": 64, "depth": 5}, spatial_dims=3)  # 88M parameters, on the meta device
