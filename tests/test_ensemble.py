"""Ensembles: the averaged probability map is the mean of the members' maps (with and without TTA), the
regression channels are averaged, and members that disagree on classes or preprocessing are refused."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.engine.checkpoint import save_checkpoint
from medseg.ensemble import ProbabilityEnsemble, check_members
from medseg.errors import ConfigError
from medseg.inference import SlidingWindowPredictor
from medseg.nets import UNet
from pipelines.predict import Predictor, load_models


def _model(seed, classes=3, extra=0):
    torch.manual_seed(seed)
    return UNet(2, 1, classes + extra, features=4, depth=2).eval()


@pytest.mark.parametrize("tta", [False, True])
def test_ensemble_of_two_is_the_average_of_their_probability_maps(tta):
    a, b = _model(0), _model(1)
    image = torch.randn(1, 37, 29, generator=torch.Generator().manual_seed(2))
    maps = [SlidingWindowPredictor(m, [16, 16], 3, overlap=0.5, tta=tta)(image) for m in (a, b)]
    both = SlidingWindowPredictor(ProbabilityEnsemble([a, b], 3), [16, 16], 3, overlap=0.5, tta=tta)(image)
    torch.testing.assert_close(both, (maps[0] + maps[1]) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(maps[0], maps[1], atol=1e-3)  # the members differ: the test can fail


def test_regression_channels_and_one_class_models_are_averaged():
    a, b = _model(0, classes=2, extra=2), _model(1, classes=2, extra=2)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = ProbabilityEnsemble([a, b], 2)(x)
        za, zb = a(x), b(x)
    torch.testing.assert_close(out[:, 2:], (za[:, 2:] + zb[:, 2:]) / 2)
    torch.testing.assert_close(out[:, :2].softmax(1), (za[:, :2].softmax(1) + zb[:, :2].softmax(1)) / 2)
    a1, b1 = _model(0, classes=1), _model(1, classes=1)
    with torch.no_grad():
        mean = (a1(x).sigmoid() + b1(x).sigmoid()) / 2
        torch.testing.assert_close(ProbabilityEnsemble([a1, b1], 1)(x).sigmoid(), mean, rtol=1e-5, atol=1e-6)


def _meta(**changes):
    meta = {"format": "medseg-model-v1", "model": {"name": "unet", "params": {"features": 4, "depth": 2}},
            "spatial_dims": 2, "in_channels": 1, "classes": {"background": 0, "a": 1, "b": 2},
            "label_kind": "semantic", "instance_to_semantic": "cell_border",
            "normalize": {"mode": "none"}, "patch_size": [16, 16], "spacing": None,
            "inference": {"overlap": 0.5, "sw_batch_size": 2, "tta": False}}
    return {**meta, **changes}


def test_predictor_with_two_checkpoints_averages(tmp_path):
    paths = []
    for seed in (0, 1):
        paths.append(save_checkpoint(tmp_path / f"m{seed}.pt", {"model": _model(seed).state_dict(),
                                                                  "metadata": _meta()}))
    image = torch.randn(1, 24, 20, generator=torch.Generator().manual_seed(3))
    out = {}
    for key, sources in (("a", [str(paths[0])]), ("b", [str(paths[1])]), ("ab", [str(p) for p in paths])):
        model, meta = load_models(sources)
        engine = Predictor(model, meta, device=torch.device("cpu"), tta=None, overlap=None, sw_batch_size=None,
                           instances=False, probabilities=True)
        out[key] = engine.compute({"image": MetaTensor(image)})["probabilities"].astype(np.float32)
    np.testing.assert_allclose(out["ab"], (out["a"] + out["b"]) / 2, atol=2e-3)  # float16 maps


@pytest.mark.parametrize("key, value", [("classes", {"background": 0, "a": 1}), ("normalize", {"mode": "zscore"}),
                                        ("spacing", [1.0, 1.0])])
def test_members_must_agree_on_classes_and_preprocessing(key, value):
    with pytest.raises(ConfigError, match=f"'{key}' differs") as err:
        check_members([_meta(), _meta(**{key: value})], ["runs/a", "runs/b"])
    assert "runs/b" in str(err.value) and err.value.key == "--model"
    check_members([_meta(), _meta(patch_size=[32, 32])], ["a", "b"])  # a different patch is fine
