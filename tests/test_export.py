"""ONNX and TorchScript export: round trips for every network in 2D and 3D, the check that refuses a wrong
export, and the export folder as a model for the sliding window."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medseg.export import METADATA_FILE, ExportError, export_model, load_exported, size_divisor
from medseg.inference import SlidingWindowPredictor
from medseg.nets import UNet, build_network

NETWORKS = {
    "unet": {"features": 4, "depth": 2},
    "unetpp": {"features": 4, "depth": 2},
    "unetpp-pruned": {"features": 4, "depth": 2, "deep_supervision": True, "prune_level": 1},
    "segnet": {"features": 4, "depth": 2},
    "unet-anisotropic": {"features": 4, "depth": 2, "strides": "last axis once"},
    "segnet-anisotropic": {"features": 4, "depth": 2, "strides": "last axis once"},
}
PATCH = {2: [20, 12], 3: [12, 8, 10]}  # not multiples of the divisors: the export rounds up


def _model(key: str, dims: int, classes: int = 3) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    name = key.split("-")[0]
    params = dict(NETWORKS[key])
    if "strides" in params:  # per axis: the last one pools once
        params["strides"] = [2, [2] * (dims - 1) + [1]]
    model = build_network(name, params, spatial_dims=dims, in_channels=2, num_classes=classes).eval()
    meta = {"model": {"name": name, "params": params}, "spatial_dims": dims, "in_channels": 2,
            "classes": {f"c{i}": i for i in range(classes)}, "patch_size": PATCH[dims],
            "instances": {"target": "distance", "thresholds": {"foreground": 0.5}}}
    return model, meta


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("key", list(NETWORKS))
def test_round_trip_equals_torch_at_sizes_it_was_not_traced_at(key, dims, fmt, tmp_path):
    model, meta = _model(key, dims)
    report = export_model(model, meta, fmt, tmp_path / "export")
    assert report.max_abs_difference <= 1e-4

    network, loaded = load_exported(tmp_path / "export")
    assert loaded["instances"] == meta["instances"]  # the whole metadata travels, keys it does not know too
    assert loaded["export"]["format"] == fmt and loaded["export"]["size_divisor"] == size_divisor(model, dims)
    # odd sizes, a batch of 3: padding to the divisor and cropping happen outside the exported graph
    sizes = {2: (13, 29), 3: (9, 6, 11)}[dims]
    x = torch.randn(3, 2, *sizes, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
    got = network(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_size_divisor_is_per_axis():
    model, _ = _model("unet-anisotropic", 3)
    assert size_divisor(model, 3) == [4, 4, 2]


def test_pruning_is_exported_as_set():
    pruned, meta = _model("unetpp-pruned", 2)
    assert size_divisor(pruned, 2) == [2, 2]  # one level runs
    pruned.prune_level = 2
    assert size_divisor(pruned, 2) == [4, 4]


class _BranchingUNet(UNet):
    """Branches on the batch size in Python: a trace keeps the branch it saw (batch 1), torch does not."""

    def forward(self, x):
        logits = super().forward(x)
        return logits if x.shape[0] == 1 else 2 * logits


def test_an_export_that_differs_from_torch_is_refused_and_leaves_nothing(tmp_path):
    torch.manual_seed(0)
    model = _BranchingUNet(2, 2, 3, features=4, depth=2).eval()
    meta = {"in_channels": 2, "classes": {"a": 0, "b": 1, "c": 2}, "patch_size": [10, 14]}
    for fmt in ("onnx", "torchscript"):
        with pytest.raises(ExportError, match="differs from torch|fails to run"):
            export_model(model, meta, fmt, tmp_path / "export")
        assert not (tmp_path / "export").exists()
        assert not list(tmp_path.iterdir())  # no staging folder left either


def test_export_replaces_an_earlier_export_but_not_other_files(tmp_path):
    model, meta = _model("unet", 2)
    export_model(model, meta, "onnx", tmp_path / "export")
    export_model(model, meta, "torchscript", tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [METADATA_FILE, "model.pt"]
    assert json.loads((tmp_path / "export" / METADATA_FILE).read_text())["export"]["format"] == "torchscript"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="notes.txt"):
        export_model(model, meta, "onnx", tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_sliding_window_with_the_onnx_network_equals_torch(tmp_path):
    model, meta = _model("segnet", 2)
    export_model(model, meta, "onnx", tmp_path / "export")
    network, _ = load_exported(tmp_path / "export")
    image = torch.randn(2, 37, 26, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = SlidingWindowPredictor(model, meta["patch_size"], 3, overlap=0.5, tta=True, amp="fp32")(image)
    got = SlidingWindowPredictor(network, meta["patch_size"], 3, overlap=0.5, tta=True, amp="fp32")(image)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_broken_export_folder_names_the_file(tmp_path):
    from medseg.errors import DataError

    (tmp_path / METADATA_FILE).write_text("{}")
    with pytest.raises(DataError, match=METADATA_FILE):
        load_exported(tmp_path)
    model, meta = _model("unet", 2)
    export_model(model, meta, "onnx", tmp_path / "e")
    (tmp_path / "e" / "model.onnx").unlink()
    with pytest.raises(DataError, match="model.onnx"):
        load_exported(tmp_path / "e")
    assert np.isfinite(0)
