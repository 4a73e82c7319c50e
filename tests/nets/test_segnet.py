import pytest
import torch

from medseg.errors import ConfigError
from medseg.nets import SegNet
from tests.nets.contract import NetworkContract


class TestSegNet(NetworkContract):
    name = "segnet"
    params = {"features": 4, "depth": 3}
    supports_deep_supervision = False
    kernel_levels_beyond_depth = 0  # one kernel size per stage

    def test_deep_supervision_is_not_a_parameter(self):
        with pytest.raises(ConfigError, match="deep_supervision"):
            self.build(2, deep_supervision=True)


def test_classic_configuration_has_the_papers_parameter_count():
    # VGG16's 13 convolutions + BN, a mirrored decoder of 13 (the last one giving the logits); paper: 29.5M
    model = SegNet(2, in_channels=3, num_classes=12)
    assert sum(p.numel() for p in model.parameters()) == 29_449_932


def test_decoder_upsamples_with_the_encoder_indices():
    # a model whose convolutions are identities: the output keeps only each 2x2 window's maximum, in place
    model = SegNet(2, 1, 1, features=1, depth=1, norm="none", activation="relu").eval()
    with torch.no_grad():
        for conv in [
            model.encoder[0][0][0],
            model.encoder[0][1][0],
            model.decoder[0][0][0],
            model.decoder[0][1],
        ]:
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
            conv.bias.zero_()
        x = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 0.0, 5.0, 4.0]]).reshape(1, 1, 2, 4)
        expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 5.0, 0.0]]).reshape(1, 1, 2, 4)
        torch.testing.assert_close(model(x), expected)
