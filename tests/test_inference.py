"""Invariants of sliding-window prediction: a window over a per-pixel function returns that function."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from medseg.inference import SlidingWindowPredictor, _pad, gaussian_importance_map, sliding_window_grid


def pointwise(x: torch.Tensor) -> torch.Tensor:
    """``B 2 *P -> B 3 *P`` logits computed pixel by pixel, so any tiling must reproduce it exactly."""
    return torch.cat([2 * x[:, :1] + x[:, 1:], -x[:, 1:], x[:, :1] ** 2], dim=1)


def expected(image: torch.Tensor, output: str = "probabilities") -> torch.Tensor:
    logits = pointwise(image[None].float())[0]
    return logits if output == "logits" else logits.softmax(0)


SHAPES = [  # (image spatial size, patch size): odd sizes, smaller than the patch on some or all axes
    ((37, 53), (16, 16)),
    ((5, 7), (16, 16)),
    ((40, 6), (16, 16)),
    ((19, 23, 17), (8, 8, 8)),
    ((3, 20, 5), (8, 8, 8)),
]


@pytest.mark.parametrize("spatial, patch", SHAPES)
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_returns_the_pointwise_function_everywhere(spatial, patch, overlap, sw_batch_size):
    image = torch.randn(2, *spatial)
    for output in ("probabilities", "logits"):
        predictor = SlidingWindowPredictor(
            pointwise, patch, 3, overlap=overlap, sw_batch_size=sw_batch_size, output=output
        )
        out = predictor(image)
        assert out.shape == (3, *spatial) and out.dtype == torch.float32
        torch.testing.assert_close(out, expected(image, output), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate"])
def test_blend_and_padding_keep_the_function(blend, padding_mode):
    image = torch.randn(2, 6, 45, 1)
    predictor = SlidingWindowPredictor(
        pointwise, (8, 16, 4), 3, blend=blend, padding_mode=padding_mode, output="logits"
    )
    torch.testing.assert_close(predictor(image), expected(image, "logits"), rtol=1e-5, atol=1e-5)


def test_constant_logits_stay_constant_so_the_weights_sum_to_one():
    ones = lambda x: torch.ones(x.shape[0], 2, *x.shape[2:])  # noqa: E731
    out = SlidingWindowPredictor(ones, (7, 9, 5), 2, overlap=0.6, output="logits")(torch.zeros(1, 30, 17, 11))
    torch.testing.assert_close(out, torch.ones_like(out))


def test_numpy_input_of_any_dtype_gives_the_same_result():
    image = torch.randint(-50, 50, (2, 21, 34), dtype=torch.int16)
    array = image.numpy().copy()
    array.setflags(write=False)
    predictor = SlidingWindowPredictor(pointwise, (16, 16), 3)
    torch.testing.assert_close(predictor(array), predictor(image))
    torch.testing.assert_close(predictor(image), expected(image), rtol=1e-5, atol=1e-5)


def test_model_returning_a_list_uses_its_first_element():
    deep = lambda x: [pointwise(x), pointwise(x)[:, :, ::2]]  # noqa: E731
    image = torch.randn(2, 20, 30)
    out = SlidingWindowPredictor(deep, (16, 16), 3)(image)
    torch.testing.assert_close(out, expected(image), rtol=1e-5, atol=1e-5)


def test_module_is_put_in_eval_mode_and_channels_last_changes_nothing():
    conv = nn.Conv3d(2, 3, kernel_size=1).train()
    image = torch.randn(2, 12, 19, 10)
    plain = SlidingWindowPredictor(conv, (8, 8, 8), 3, amp="fp32")(image)
    assert not conv.training
    fast = SlidingWindowPredictor(conv, (8, 8, 8), 3, channels_last=True, amp="fp32")(image)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(plain, conv(image[None])[0].softmax(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial, patch", [((25, 30), (16, 16)), ((11, 14, 9), (8, 8, 8))])
def test_tta_with_a_flip_equivariant_model_equals_no_tta(spatial, patch):
    image = torch.randn(2, *spatial)
    plain = SlidingWindowPredictor(pointwise, patch, 3)(image)
    for axes in (None, (0,), (len(spatial) - 1,)):
        mirrored = SlidingWindowPredictor(pointwise, patch, 3, tta=True, tta_axes=axes)(image)
        torch.testing.assert_close(mirrored, plain, rtol=1e-5, atol=1e-5)


def test_tta_unflips_the_output():
    # The model adds a ramp 0..P-1 along the window's first axis; a flip, predict, flip back adds the
    # reversed ramp, so their average adds (P-1)/2 everywhere. Forgetting to flip back would not.
    patch = (8, 8)
    ramp = torch.arange(patch[0], dtype=torch.float32).view(1, 1, -1, 1)
    model = lambda x: x[:, :1] + ramp  # noqa: E731
    image = torch.randn(1, 20, 13)
    out = SlidingWindowPredictor(model, patch, 1, output="logits", tta=True, tta_axes=(0,))(image)
    torch.testing.assert_close(out, image + (patch[0] - 1) / 2, rtol=1e-5, atol=1e-5)
    plain = SlidingWindowPredictor(model, patch, 1, output="logits")(image)
    assert not torch.allclose(plain, out)


@pytest.mark.parametrize("classes, output", [(2, "probabilities"), (3, "probabilities"), (3, "logits")])
@pytest.mark.parametrize("spatial, patch", [((47, 33), (16, 16)), ((30, 9, 13), (8, 8, 8))])
def test_predict_labels_is_the_argmax_of_the_probabilities(classes, output, spatial, patch):
    image = torch.randn(2, *spatial)
    model = lambda x: pointwise(x)[:, :classes]  # noqa: E731
    predictor = SlidingWindowPredictor(model, patch, classes, output=output, sw_batch_size=3)
    probs = predictor(image)
    labels = predictor.predict_labels(image)
    assert labels.dtype == np.uint8 and labels.shape == spatial
    top2 = probs.topk(2, dim=0).values
    decided = (top2[0] - top2[1] > 1e-5).numpy()  # labels keep K-1 channels; near-ties may round apart
    np.testing.assert_array_equal(labels[decided], probs.argmax(0).numpy()[decided])


def test_single_class_is_a_sigmoid_thresholded_at_one_half():
    image = torch.randn(1, 20, 20)
    predictor = SlidingWindowPredictor(lambda x: x, (8, 8), 1)
    torch.testing.assert_close(predictor(image), image.sigmoid())
    np.testing.assert_array_equal(predictor.predict_labels(image), (image[0] >= 0).numpy())


def test_slabs_stream_in_order_and_match_the_full_prediction():
    image = torch.randn(2, 70, 12, 10)
    done = []
    predictor = SlidingWindowPredictor(pointwise, (8, 8, 8), 3, progress=lambda i, n: done.append(i))
    full = predictor(image)
    total, next_row, first_yield = None, 0, None
    for rows, slab in predictor.iter_slabs(image):
        assert rows.start == next_row and slab.shape == (3, rows.stop - rows.start, 12, 10)
        torch.testing.assert_close(slab, full[:, rows])
        slab.mul_(2)  # a normal tensor that callers may modify
        next_row = rows.stop
        first_yield = len(done) if first_yield is None else first_yield
        total = done[-1]
    assert next_row == 70
    assert first_yield < total / 2  # the first slab came out long before the last window


def test_predict_labels_fills_a_given_array():
    image = torch.randn(2, 30, 20)
    predictor = SlidingWindowPredictor(pointwise, (16, 16), 3)
    out = np.full((30, 20), 255, dtype=np.uint8)
    assert predictor.predict_labels(image, out=out) is out
    np.testing.assert_array_equal(out, predictor.predict_labels(image))


def test_float16_accumulator_is_close():
    image = torch.randn(2, 33, 27)
    exact = SlidingWindowPredictor(pointwise, (16, 16), 3)(image)
    half = SlidingWindowPredictor(pointwise, (16, 16), 3, accumulate_dtype=torch.float16)(image)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), exact, rtol=0, atol=2e-3)


def test_bf16_autocast_is_close():
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    image = torch.randn(2, 30, 30)
    exact = SlidingWindowPredictor(conv, (16, 16), 3, amp=False)(image)
    fast = SlidingWindowPredictor(conv, (16, 16), 3, amp="bf16")(image)
    torch.testing.assert_close(fast, exact, rtol=0, atol=3e-2)


def test_estimate_memory():
    predictor = SlidingWindowPredictor(pointwise, (128, 128, 128), 2, sw_batch_size=2)
    shape = (1, 512, 512, 256)
    full = predictor.estimate_memory(shape)
    streamed = predictor.estimate_memory(shape, labels=True)
    volume = 512 * 512 * 256 * 4
    assert full["input"] == volume and full["accumulator"] == 2 * volume and full["output"] == 0
    assert full["total"] == sum(v for k, v in full.items() if k != "total")
    # labels: one float32 class channel over at most a patch plus a stride of rows, and uint8 labels
    assert streamed["accumulator"] <= volume * (128 + 64) / 512 and streamed["output"] == volume // 4
    assert streamed["total"] < 2 * volume


def test_errors_say_expected_and_received():
    predictor = SlidingWindowPredictor(pointwise, (16, 16), 3)
    with pytest.raises(ValueError, match=r"C \*S with 2 spatial axes.*\(20, 20\)"):
        predictor(torch.zeros(20, 20))
    with pytest.raises(ValueError, match=r"model output must be B K \*P = \(4, 4, 16, 16\); received \(4, 3,"):
        SlidingWindowPredictor(pointwise, (16, 16), 4)(torch.zeros(2, 20, 20))
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindowPredictor(pointwise, (16, 16), 3, overlap=1.0)
    with pytest.raises(ValueError, match="output must be one of"):
        SlidingWindowPredictor(pointwise, (16, 16), 3, output="labels")


@pytest.mark.parametrize("spatial, patch", [((37, 53), (16, 16)), ((5, 40, 33), (8, 16, 16)), ((64,), (16,))])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_grid_covers_the_image_with_windows_inside(spatial, patch, overlap):
    windows = sliding_window_grid(spatial, patch, overlap)
    padded = [max(s, p) for s, p in zip(spatial, patch)]
    covered = np.zeros(padded, dtype=int)
    for window in windows:
        assert all(w.start >= 0 and w.stop <= n and w.stop - w.start == p for w, n, p in zip(window, padded, patch))
        covered[window] += 1
    assert covered.min() >= 1
    for axis, (n, p) in enumerate(zip(padded, patch)):
        starts = sorted({w[axis].start for w in windows})
        # neighbours overlap by at least `overlap` of the patch, up to rounding to whole pixels
        assert all(b - a <= math.ceil(p * (1 - overlap)) for a, b in itertools.pairwise(starts))
        assert starts[0] == 0 and starts[-1] == n - p


def test_grid_without_overlap_tiles_exactly():
    windows = sliding_window_grid((64, 48), (16, 16), 0.0)
    assert len(windows) == 4 * 3
    assert windows[1] == (slice(0, 16), slice(16, 32))  # C order: the last axis moves fastest


@pytest.mark.parametrize("patch", [(16, 16), (9, 12, 7), (1, 5)])
def test_gaussian_importance_map(patch):
    weight = gaussian_importance_map(patch)
    assert weight.shape == patch and weight.max() == pytest.approx(1.0, rel=0.05)
    assert weight.min() > 0
    for axis in range(len(patch)):
        torch.testing.assert_close(weight.flip(axis), weight)
    assert gaussian_importance_map(patch, sigma_scale=0.001, dtype=torch.float16).min() > 0


def test_reflect_padding_matches_numpy_even_beyond_the_image():
    tiles = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    padded = _pad(tiles, (5, 6, 4, 2), "reflect", 0.0)  # F.pad order: last axis first
    reference = np.pad(tiles.numpy(), [(0, 0), (0, 0), (4, 2), (5, 6)], mode="reflect")
    np.testing.assert_array_equal(padded.numpy(), reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compute_with_cpu_stitching_matches_cpu():
    conv = nn.Conv3d(2, 3, kernel_size=3, padding=1)
    image = torch.randn(2, 40, 33, 20)
    cpu = SlidingWindowPredictor(conv, (16, 16, 16), 3)(image)
    for stitch in ("cpu", "cuda", None):
        predictor = SlidingWindowPredictor(conv, (16, 16, 16), 3, device="cuda", stitch_device=stitch, amp=False)
        out = predictor(image)
        assert out.device.type == ("cpu" if stitch == "cpu" else "cuda")
        torch.testing.assert_close(out.cpu(), cpu, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(predictor.predict_labels(image.numpy()), predictor.predict_labels(image))
    amp = SlidingWindowPredictor(conv, (16, 16, 16), 3, device="cuda", stitch_device="cpu")(image)
    torch.testing.assert_close(amp, cpu, rtol=0, atol=3e-2)


class _BufferModel:
    """``2 x + 1`` written into one buffer that every call reuses, like a model caching its output."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.buffer is None or self.buffer.shape != x.shape:
            self.buffer = torch.empty_like(x)
        return torch.mul(x, 2, out=self.buffer).add_(1)


# Models whose output is their input (or a buffer they reuse): the predictor must never modify it.
ALIASING_MODELS = {
    "nn.Identity": (nn.Identity, lambda x: x),
    "lambda x: x": (lambda: lambda x: x, lambda x: x),
    "reused buffer": (_BufferModel, lambda x: 2 * x + 1),
}


@pytest.mark.parametrize("model_name", list(ALIASING_MODELS))
@pytest.mark.parametrize("channels", [1, 3])  # a sigmoid and a softmax
@pytest.mark.parametrize(
    "spatial, patch",
    [((13, 10), (8, 6)), ((5, 9), (8, 6)), ((9, 7, 5), (4, 4, 4)), ((3, 11, 2), (4, 6, 4))],
)
@pytest.mark.parametrize("tta", [False, True])
def test_identity_and_buffer_models_come_back_unchanged(model_name, channels, spatial, patch, tta):
    build, function = ALIASING_MODELS[model_name]
    image = torch.randn(channels, *spatial)
    original = image.clone()
    logits = function(image)
    for output, blend, padding_mode in itertools.product(
        ("logits", "probabilities"), ("gaussian", "constant"), ("constant", "reflect", "replicate")
    ):
        predictor = SlidingWindowPredictor(
            build(), patch, channels, overlap=0.5, sw_batch_size=2, tta=tta, output=output, blend=blend,
            padding_mode=padding_mode,
        )
        want = logits if output == "logits" else logits.softmax(0) if channels > 1 else logits.sigmoid()
        where = f"{output}, {blend}, {padding_mode}"
        slabs = torch.cat([slab for _, slab in predictor.iter_slabs(image)], dim=1)
        for got in (predictor(image), slabs):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, where=where: f"{where}: {m}")
        torch.testing.assert_close(image, original, rtol=0, atol=0)  # nor the caller's image


def _field_model(num_classes: int):
    """Class logits from the first input channel, then regression channels: d(input)/d(axis a) per axis
    (vector components, exactly flip-equivariant) and the input itself (a scalar)."""

    def model(tiles: torch.Tensor) -> torch.Tensor:
        x = tiles[:, :1]
        dims = x.ndim - 2
        grads = [torch.from_numpy(np.gradient(x.numpy(), axis=2 + a)) for a in range(dims)]
        logits = torch.cat([x * (c + 1) for c in range(num_classes)], 1)
        return torch.cat([logits, *grads, x], 1)

    return model


@pytest.mark.parametrize("spatial,patch", [((37, 50), (16, 16)), ((19, 13, 22), (8, 8, 8))])
@pytest.mark.parametrize("tta", [False, True])
def test_regression_channels_return_a_known_field(spatial, patch, tta):
    """A linear image: its gradient is the same constant in every window (one-sided at window edges too), and the
    image channel comes back as it was; class channels stay probabilities, regression ones are not softmaxed,
    and mirror TTA negates the flipped components (without that the constant gradient would average to 0)."""
    dims = len(spatial)
    slopes = np.arange(1, dims + 1) * 0.25
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in spatial], indexing="ij"))
    image = torch.from_numpy((grid * slopes.reshape(-1, *[1] * dims)).sum(0, dtype=np.float32))[None]
    predictor = SlidingWindowPredictor(
        _field_model(2), patch, 2, overlap=0.5, regression_channels=dims + 1,
        vector_axes=list(range(dims)) + [None], tta=tta,
    )
    out = predictor(image)
    assert out.shape == (2 + dims + 1, *spatial)
    torch.testing.assert_close(out[:2].sum(0), torch.ones(spatial))
    for a in range(dims):
        torch.testing.assert_close(out[2 + a], torch.full(spatial, float(slopes[a])), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[-1], image[0], atol=1e-4, rtol=1e-5)
    labels = predictor.predict_labels(image)  # from the class channels only
    np.testing.assert_array_equal(labels, out[:2].argmax(0).numpy())


def test_vector_axes_must_match_the_regression_channels():
    with pytest.raises(ValueError, match="vector_axes"):
        SlidingWindowPredictor(_field_model(2), (8, 8), 2, regression_channels=2, vector_axes=[0])
    with pytest.raises(ValueError, match="vector_axes"):
        SlidingWindowPredictor(_field_model(2), (8, 8), 2, regression_channels=1, vector_axes=[2])
