"""The contract every network passes; each network's test module subclasses :class:`NetworkContract`.

Tiny models (a few features, depth 2-3) at odd sizes keep the whole suite to a few seconds.
"""

from __future__ import annotations

import pytest
import torch

from medseg.errors import ConfigError
from medseg.nets import build_network

SIZES = {2: (61, 75), 3: (19, 23, 29)}  # odd, not multiples of 2**depth, different per axis
# thin slices on the last axis: pooled only at the last of 3 steps, 1-voxel kernels there until then
ANISOTROPIC = {
    "strides": [[2, 2, 1], [2, 2, 1], [2, 2, 2]],
    "kernel_sizes": [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]],
}
IN_CHANNELS, NUM_CLASSES, BATCH = 2, 3, 2


class NetworkContract:
    """Subclasses set ``name`` and tiny ``params``, and say where the deep-supervision heads are."""

    name: str
    params: dict
    supports_deep_supervision = True
    kernel_levels_beyond_depth = 1  # kernel_sizes has depth + this entries (one per resolution level)

    def anisotropic(self) -> dict:
        """:data:`ANISOTROPIC` for ``self.params['depth'] == 3``, with as many kernel entries as levels."""
        levels = self.params["depth"] + self.kernel_levels_beyond_depth
        return {"strides": ANISOTROPIC["strides"], "kernel_sizes": ANISOTROPIC["kernel_sizes"][:levels]}

    def build(self, spatial_dims: int, **overrides) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_network(
            self.name,
            {**self.params, **overrides},
            spatial_dims=spatial_dims,
            in_channels=IN_CHANNELS,
            num_classes=NUM_CLASSES,
        )

    def head_sizes(self, size: tuple[int, ...], strides=None) -> list[tuple[int, ...]]:
        """Spatial sizes of the extra deep-supervision heads for an input of ``size`` (per-axis ``strides``)."""
        raise NotImplementedError

    @staticmethod
    def image(spatial_dims: int) -> torch.Tensor:
        return torch.randn(BATCH, IN_CHANNELS, *SIZES[spatial_dims], generator=torch.Generator().manual_seed(1))

    @pytest.mark.parametrize("spatial_dims", [2, 3])
    def test_forward_backward_at_odd_size(self, spatial_dims):
        model = self.build(spatial_dims).train()
        x = self.image(spatial_dims)
        out = model(x)
        outputs = out if isinstance(out, list) else [out]
        assert outputs[0].shape == (BATCH, NUM_CLASSES, *SIZES[spatial_dims])
        assert all(torch.isfinite(o).all() for o in outputs)

        sum(o.square().mean() for o in outputs).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name} gets no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert any(p.grad.abs().sum() > 0 for p in model.parameters())

    @pytest.mark.parametrize("spatial_dims", [2, 3])
    def test_eval_returns_one_deterministic_tensor(self, spatial_dims):
        # with its heads and dropout on, so the test also sees that eval mode switches both off
        heads = {"deep_supervision": True} if self.supports_deep_supervision else {}
        model = self.build(spatial_dims, dropout=0.3, **heads).eval()
        x = self.image(spatial_dims)
        with torch.no_grad():
            first, second = model(x), model(x)
        assert isinstance(first, torch.Tensor)
        assert first.shape == (BATCH, NUM_CLASSES, *SIZES[spatial_dims])
        torch.testing.assert_close(first, second, rtol=0, atol=0)

    @pytest.mark.parametrize("size", [(1, 1), (3, 130), (32, 32)])
    def test_any_size_works(self, size):
        model = self.build(2).eval()
        with torch.no_grad():
            out = model(torch.randn(1, IN_CHANNELS, *size))
        assert out.shape == (1, NUM_CLASSES, *size)

    def test_export_gives_the_eval_output(self):
        model = self.build(2).eval()
        x = self.image(2)
        exported = torch.export.export(model, (x,)).module()
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x))

    def test_deep_supervision_structure(self):
        if not self.supports_deep_supervision:
            model = self.build(2).train()
            assert model.deep_supervision is False and len(model.head_names) == 1
            assert isinstance(model(self.image(2)), torch.Tensor)
            return
        model = self.build(2, deep_supervision=True).train()
        assert model.deep_supervision is True
        outputs = model(self.image(2))
        assert isinstance(outputs, list)
        assert len(outputs) == len(model.head_names)  # what loss.deep_supervision_weights is checked against
        assert outputs[0].shape == (BATCH, NUM_CLASSES, *SIZES[2])
        assert [tuple(o.shape[2:]) for o in outputs[1:]] == self.head_sizes(SIZES[2])
        assert all(o.shape[:2] == (BATCH, NUM_CLASSES) for o in outputs)

        without = self.build(2, deep_supervision=False).train()
        assert without.deep_supervision is False and len(without.head_names) == 1
        assert isinstance(without(self.image(2)), torch.Tensor)

    def test_anisotropic_pooling_and_kernels(self):
        params = self.anisotropic()
        model = self.build(3, **params).train()
        x = self.image(3)
        out = model(x)
        outputs = out if isinstance(out, list) else [out]
        assert outputs[0].shape == (BATCH, NUM_CLASSES, *SIZES[3])
        sum(o.square().mean() for o in outputs).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size != (1, 1, 1)]
        assert {m.kernel_size for m in convs} == {(3, 3, 1), (3, 3, 3)}
        pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool3d)]
        assert [tuple(m.stride) for m in pools] == [tuple(s) for s in params["strides"]]
        with torch.no_grad():
            evaluated = model.eval()(x)
        assert evaluated.shape == (BATCH, NUM_CLASSES, *SIZES[3])
        if self.supports_deep_supervision:
            heads = self.build(3, deep_supervision=True, **params).train()(x)
            assert [tuple(o.shape[2:]) for o in heads[1:]] == self.head_sizes(SIZES[3], params["strides"])

    def test_anisotropic_any_size(self):
        model = self.build(3, **self.anisotropic()).eval()
        for size in [(1, 1, 1), (5, 9, 2), (16, 16, 4)]:
            with torch.no_grad():
                assert model(torch.randn(1, IN_CHANNELS, *size)).shape == (1, NUM_CLASSES, *size)

    @pytest.mark.parametrize(
        "param, value",
        [
            ("strides", [[2, 2, 1], [2, 2, 1]]),  # depth 3 needs 3 entries
            ("strides", [[2, 3, 1], [2, 2, 1], [2, 2, 2]]),
            ("strides", [[1, 1, 1], [2, 2, 1], [2, 2, 2]]),
            ("strides", [[2, 2], [2, 2], [2, 2]]),  # 2 axes for a 3D network
            ("kernel_sizes", [[3, 3, 2]] * 4),
            ("kernel_sizes", [3, 3]),
            ("kernel_sizes", "3"),
        ],
    )
    def test_invalid_anisotropy_names_the_key(self, param, value):
        with pytest.raises(ConfigError) as err:
            self.build(3, **{param: value})
        assert err.value.key == f"model.params.{param}"

    @pytest.mark.parametrize(
        "param, value",
        [
            ("depth", 0),
            ("features", 0),
            ("norm", "group"),
            ("activation", "swish"),
            ("dropout", 1.0),
            ("deep_supervision", "yes"),
        ],
    )
    def test_invalid_value_names_the_key(self, param, value):
        with pytest.raises(ConfigError) as err:
            self.build(2, **{param: value})
        assert err.value.key == f"model.params.{param}"

    def test_unknown_parameter_lists_the_valid_ones(self):
        with pytest.raises(ConfigError) as err:
            self.build(2, feature=8)
        assert err.value.key == "model.params.feature"
        assert "features" in err.value.message
