"""The precision decision with injected capabilities (no hardware assumed), and bf16 prediction close to fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.engine.loop import resolve_amp
from medseg.inference import SlidingWindowPredictor
from medseg.precision import Capabilities, cpu_flags, detect, native_cpu_bf16, resolve_precision

NONE = Capabilities()
BF16_CPU = Capabilities(cpu_bf16=True)
AMPERE = Capabilities(cuda_bf16=True)


@pytest.mark.parametrize(
    ("precision", "device", "caps", "expected"),
    [
        ("auto", "cpu", NONE, None),  # no native bf16: float32
        ("auto", "cpu", BF16_CPU, torch.bfloat16),
        ("auto", "cuda", NONE, torch.float16),  # before Ampere
        ("auto", "cuda", AMPERE, torch.bfloat16),
        ("fp32", "cpu", BF16_CPU, None),
        ("off", "cuda", AMPERE, None),
        (False, "cpu", BF16_CPU, None),
        (True, "cpu", BF16_CPU, torch.bfloat16),
        ("bf16", "cpu", NONE, torch.bfloat16),  # asked for: honoured (with a warning)
        ("fp16", "cpu", NONE, torch.float16),
        ("fp16", "cuda", AMPERE, torch.float16),
    ],
)
def test_resolve_precision(precision, device, caps, expected):
    assert resolve_precision(precision, device, caps) is expected


def test_training_auto_stays_fp32_on_cpu_even_with_bf16():
    assert resolve_precision("auto", "cpu", BF16_CPU, cpu_auto=False) is None
    assert resolve_precision("bf16", "cpu", BF16_CPU, cpu_auto=False) is torch.bfloat16
    assert resolve_amp("auto", torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16


def test_emulated_bf16_warns(caplog):
    resolve_precision("bf16", "cpu", NONE)
    assert "emulated" in caplog.text
    caplog.clear()
    resolve_precision("bf16", "cpu", BF16_CPU)
    assert "emulated" not in caplog.text


def test_unknown_precision_names_the_options():
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        resolve_precision("int8", "cpu", NONE)


@pytest.mark.parametrize(
    ("flags", "torch_bf16", "expected"),
    [
        ({"avx512f", "avx512_bf16"}, True, True),
        ({"avx512f", "amx_bf16"}, True, True),
        ({"avx512f", "avx512bw"}, True, False),  # oneDNN would emulate bf16 here: slower than fp32
        ({"avx512_bf16"}, False, False),  # a torch build without oneDNN bf16
        (set(), True, False),  # flags unknown (not Linux): stay fp32
    ],
)
def test_native_cpu_bf16_needs_the_flag_and_torch(flags, torch_bf16, expected):
    assert native_cpu_bf16(flags, torch_bf16) is expected


def test_detect_agrees_with_the_cpu_flags():
    caps = detect("cpu")
    assert caps.cuda_bf16 is False
    if caps.cpu_bf16:
        assert cpu_flags() & {"avx512_bf16", "amx_bf16"}


def test_predictor_auto_follows_the_hardware():
    predictor = SlidingWindowPredictor(nn.Identity(), (8, 8), 1)
    assert predictor.amp_dtype is resolve_precision("auto", "cpu", detect("cpu"))
    assert SlidingWindowPredictor(nn.Identity(), (8, 8), 1, amp="fp32").amp_dtype is None
    assert SlidingWindowPredictor(nn.Identity(), (8, 8), 1, amp=torch.bfloat16).amp_dtype is torch.bfloat16


def test_bf16_prediction_of_a_small_net_keeps_the_labels():
    """A tiny 3D conv net: bf16 autocast labels agree with fp32 labels almost everywhere."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv3d(8, 3, 1))
    image = torch.randn(1, 20, 18, 16)
    exact = SlidingWindowPredictor(net, (12, 12, 12), 3, amp="fp32")
    fast = SlidingWindowPredictor(net, (12, 12, 12), 3, amp="bf16")
    assert fast.amp_dtype is torch.bfloat16
    p32, p16 = exact(image), fast(image)
    assert p16.dtype == torch.float32
    assert (p16 - p32).abs().max() < 0.05
    agree = (exact.predict_labels(image) == fast.predict_labels(image)).mean()
    assert agree > 0.98


def test_predict_takes_the_models_precision_and_the_flag_overrides_it():
    from pipelines.predict import Predictor

    meta = {"format": "medseg-model-v1", "spatial_dims": 2, "in_channels": 1, "classes": {"background": 0, "a": 1},
            "label_kind": "semantic", "normalize": {"mode": "none"}, "patch_size": [8, 8], "spacing": None,
            "inference": {"overlap": 0.5, "sw_batch_size": 2, "tta": False, "precision": "fp32"}}

    def engine(**kwargs):
        return Predictor(nn.Conv2d(1, 2, 1), meta, device=torch.device("cpu"), tta=None, overlap=None,
                         sw_batch_size=None, instances=False, probabilities=False, **kwargs)

    assert engine().window.amp_dtype is None
    assert engine(precision="bf16").window.amp_dtype is torch.bfloat16
    meta["inference"].pop("precision")  # a model saved before the setting existed: auto
    assert engine().window.amp_dtype is resolve_precision("auto", "cpu", detect("cpu"))
