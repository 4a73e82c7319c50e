"""Prediction: our sliding window against MONAI's, streaming memory, and folder throughput, in one run.

    python benchmarks/predict.py --threads 1   # full sizes (about 15-20 minutes on 2 busy CPU cores)
    python benchmarks/predict.py --quick       # small sizes, barely trained network (a smoke run)
    python benchmarks/predict.py --device cuda --parts a c

(a) One medseg 3D UNet (``features 8, depth 3``, 2 classes) is first trained by our loop (Dice + CE, Adam,
    bf16 autocast where the CPU has it) on 48^3 crops of a synthetic 208^3 lesion volume
    (:func:`medseg.data.synth.make_lesions`, 1 mm), checking every ``check_every`` steps the Dice of its
    prediction of that volume and stopping once it is > 0.8 (the best weights are kept): the point is a
    network that predicts the lesions, so that "the two label maps agree" means something, not
    generalisation. The volume is then predicted (patch 64^3, overlap 0.25, 64 windows: the same windows for
    ours and MONAI, see ``OVERLAP``) by:

    * ours: :meth:`SlidingWindowPredictor.predict_labels` with its defaults (4 windows per call, Gaussian,
      inference mode, ``amp="auto"``: bf16 where the hardware has it) and, for the bf16 decision, in fp32;
    * MONAI ``sliding_window_inference`` at its defaults (``sw_batch_size=1``, constant blending,
      ``torch.no_grad()``, fp32) and at its best settings (``sw_batch_size=4``, Gaussian,
      ``torch.inference_mode()``, fp32: what its API offers), then with the bf16 autocast a MONAI user can
      wrap around it (the same precision trick, so the ratio that isolates the rest of the path); MONAI
      runs the network followed by a softmax, so that both blend probabilities;
    * with ``--channels-last``: both again with channels_last_3d windows.

    They alternate (``--repeats`` each, after a warm-up run each on the whole volume); medians, ratios, Dice
    against the reference and against MONAI best are printed, then where the time goes: the window gathering
    and the network timed alone on the same window batches, the rest being blending, normalising, argmax and
    copies; reading + z-scoring the NIfTI file is timed once (the same for all).
(b) Peak memory of :meth:`SlidingWindowPredictor.predict_labels` (the label-streaming path) on a float32
    512x512x256 volume, in a fresh subprocess on the CPU: peak RSS minus the RSS once the model is loaded
    and the volume created, against the volume's float32 size (overlap 0). With
    ``--compare-probabilities``, the same through ``__call__`` + ``argmax`` in a second fresh process.
(c) ``--cases`` (32) gzip NIfTI lesion volumes of 256x256x128 (4 rendered, the rest byte copies) predicted
    into a folder with a small UNet (``features 4, depth 1``) at overlap 0 (each voxel predicted once), so
    that reading, decompressing and writing are a real share: :func:`pipelines.predict.predict_batch` (reads
    the next scan and writes the last in threads while computing) against the naive loop over the same
    :class:`medseg.predictor.CasePredictor` and writing function (load -> compute -> write), in the order
    naive, batch, batch, naive; once writing the label maps only, once with ``--save-probabilities`` too
    (float16 class probabilities, a compressed ``.npz``: the I/O-heavy way to predict). The naive loop's own
    load / compute / write times bound what any overlap can gain: ``sum / max(compute, load + write)``. Then
    the write time and size of one label map at compression levels 0, 1 (default), 6 and 9.

Nothing is asserted; every figure is measured in this run. Use ``--threads 1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import itertools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from medseg.config import SchedulerConfig
from medseg.data.synth import make_lesions
from medseg.data.writers import write_image
from medseg.engine.loop import StepSettings, resolve_amp, train_one_epoch
from medseg.engine.optim import Scheduler
from medseg.inference import SlidingWindowPredictor, _WindowLoader, gaussian_importance_map
from medseg.losses import DiceWeightedCELoss
from medseg.nets import build_network
from medseg.precision import detect, resolve_precision
from medseg.predictor import CasePredictor
from pipelines.predict import CaseRecord, output_path, predict_batch, write_case

NUM_CLASSES = 2
SIZES = {
    "full": dict(net={"features": 8, "depth": 3}, patch=64, volume=208, train_patch=48, check_every=50,
                 memory=(512, 512, 256), cases=32, case=(256, 256, 128), folder_net={"features": 4, "depth": 1}),
    "quick": dict(net={"features": 4, "depth": 2}, patch=24, volume=60, train_patch=24, check_every=10,
                  memory=(96, 96, 48), cases=4, case=(32, 32, 24), folder_net={"features": 4, "depth": 1}),
}
OVERLAP = 0.25  # MONAI's default, used by both in (a)
# (a)'s volumes are sized so that both place the same windows: (volume - patch) a multiple of MONAI's step
# patch x (1 - overlap) (208 = 64 + 3 x 48; quick 60 = 24 + 2 x 18). Elsewhere ours spreads the windows evenly
# (nnU-Net) and MONAI steps by a fixed interval with the last window pushed back: different windows, and a
# network's prediction depends on where its window starts, so the label maps would differ for that alone.
FOLDER_OVERLAP = 0.0  # (c): every voxel predicted once, the least compute a sliding window can do


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(size: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network("unet", size["net"], spatial_dims=3, in_channels=1, num_classes=NUM_CLASSES)


def load_case(folder: Path, split: str, case: str) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic case as (z-scored float32 image ``W H D``, uint8 labels ``W H D``), as nibabel reads it."""
    image = np.asarray(nib.load(folder / f"images{split}" / f"{case}_0000.nii.gz").dataobj, dtype=np.float32)
    label = np.asarray(nib.load(folder / f"labels{split}" / f"{case}.nii.gz").dataobj).astype(np.uint8)
    return (image - image.mean()) / max(float(image.std()), 1e-6), label


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    a, b = pred > 0, ref > 0
    total = int(a.sum()) + int(b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0


# -- training, so that Dice means something ------------------------------------------------------------


def patches(image: np.ndarray, label: np.ndarray, patch: int, batch: int, steps: int, seed: int = 0):
    """Random ``patch``^3 crops, half of them centred on a lesion voxel (foreground oversampling)."""
    rng = np.random.default_rng(seed)
    foreground = np.argwhere(label > 0)
    high = np.array(image.shape) - patch
    for _ in range(steps):
        images, labels = [], []
        for _ in range(batch):
            if len(foreground) and rng.random() < 0.5:
                start = np.clip(foreground[rng.integers(len(foreground))] - patch // 2, 0, high)
            else:
                start = rng.integers(0, high + 1)
            region = tuple(slice(s, s + patch) for s in start)
            images.append(image[region][None])
            labels.append(label[region][None])
        yield {"image": torch.from_numpy(np.stack(images)), "label": torch.from_numpy(np.stack(labels))}


def train(model: torch.nn.Module, image: np.ndarray, label: np.ndarray, size: dict, max_steps: int,
          device: torch.device) -> float:
    """Our loop (Dice + CE, Adam 1e-3: at 3e-3 the Dice swung between 0.1 and 0.8 from check to check; bf16
    autocast where the hardware has it) on ``train_patch`` crops of the volume, in rounds of ``check_every``
    steps, until the Dice of its prediction of the volume is > 0.8; the best weights seen are kept (as
    training keeps ``best.pt``). Returns their Dice."""
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = Scheduler(optimizer, SchedulerConfig(name="none"), epochs=1, steps_per_epoch=max_steps)
    amp = resolve_amp("bf16" if detect(device).cpu_bf16 else "auto", device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    settings = StepSettings(device=device, amp_dtype=amp)
    check = SlidingWindowPredictor(model, (size["patch"],) * 3, NUM_CLASSES, overlap=OVERLAP, device=device)
    batches = patches(image, label, size["train_patch"], 2, max_steps)
    start, steps, best, best_state = time.perf_counter(), 0, -1.0, None
    while steps < max_steps and best <= 0.8:
        n = min(size["check_every"], max_steps - steps)
        result = train_one_epoch(model, itertools.islice(batches, n), DiceWeightedCELoss(NUM_CLASSES), optimizer,
                                 scheduler, scaler, settings)
        steps += n
        reference = dice(check.predict_labels(torch.from_numpy(image)[None]), label)
        if reference > best:
            best, best_state = reference, copy.deepcopy(model.state_dict())
        print(f"  {steps} steps ({time.perf_counter() - start:.0f} s, training in {amp or 'fp32'}): "
              f"loss {result.losses['loss']:.3f}, Dice of its prediction of the volume {reference:.3f}", flush=True)
    model.load_state_dict(best_state)
    model.eval()
    print(f"kept the weights of the best check: Dice {best:.3f} (goal > 0.8)")
    return best


# -- (a) ours vs MONAI -----------------------------------------------------------------------------------


class Contender:
    """One way to predict the volume's labels; ``run`` returns a uint8 label map ``*S``."""

    def __init__(self, name: str, run, network, gather):
        self.name, self.run, self.network, self.gather = name, run, network, gather
        self.seconds: list[float] = []


def _amp(dtype: torch.dtype | None, device: torch.device):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _monai(model, volume, patch, sw_batch, mode, dtype, device, grad_mode):
    """MONAI ``sliding_window_inference`` of ``1 C *S`` over the network + softmax (the probabilities ours
    blends too: blending logits instead differs where windows overlap); blended probabilities -> argmax."""
    with grad_mode(), _amp(dtype, device):
        probs = sliding_window_inference(volume[None], patch, sw_batch, lambda x: model(x).softmax(1),
                                         overlap=OVERLAP, mode=mode)
    return probs[0].argmax(0).to(torch.uint8).cpu().numpy()


def _network_seconds(model, tiles: list[torch.Tensor], dtype, device, memory_format=None) -> float:
    """The network alone on the run's window batches, in the run's precision and layout (best of 2)."""
    if memory_format is not None:
        tiles = [t.contiguous(memory_format=memory_format) for t in tiles]
    best = float("inf")
    with torch.inference_mode(), _amp(dtype, device):
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            for t in tiles:
                model(t)
            sync(device)
            best = min(best, time.perf_counter() - start)
    return best


def contenders(model, size, device, volume, channels_last: bool) -> list[Contender]:
    patch = (size["patch"],) * 3
    bf16 = resolve_precision("auto", device.type, detect(device))
    found = []

    def ours(precision, cl=False):
        predictor = SlidingWindowPredictor(model, patch, NUM_CLASSES, overlap=OVERLAP, device=device, amp=precision,
                                           channels_last=cl)
        plan = predictor._plan(tuple(volume.shape[1:]), device)
        step = predictor.sw_batch_size

        def gather():
            loader = _WindowLoader(volume, device, step)
            return [loader.load(plan.windows[i: i + step]).clone() for i in range(0, len(plan.windows), step)]

        name = f"ours, {predictor.amp_dtype or 'fp32'}".replace("torch.", "") + (", channels_last" if cl else "")
        fmt = predictor.memory_format
        return Contender(name, lambda: predictor.predict_labels(volume),
                         lambda tiles: _network_seconds(predictor.model, tiles, predictor.amp_dtype, device, fmt),
                         gather)

    def monai(sw_batch, mode, dtype, grad_mode, label, cl=False):
        fmt = torch.channels_last_3d if cl else None
        net = model
        if cl:  # what a MONAI user would do: the network and each window batch channels-last
            net = lambda x: model(x.contiguous(memory_format=fmt))  # noqa: E731
        slices = dense_patch_slices(tuple(volume.shape[1:]), patch, _get_scan_interval(
            tuple(volume.shape[1:]), patch, 3, (OVERLAP,) * 3))

        def gather():
            return [torch.cat([volume[None][(slice(None), slice(None), *s)] for s in slices[i: i + sw_batch]])
                    for i in range(0, len(slices), sw_batch)]

        name = f"MONAI {label}"
        return Contender(name, lambda: _monai(net, volume, patch, sw_batch, mode, dtype, device, grad_mode),
                         lambda tiles: _network_seconds(model, tiles, dtype, device, fmt), gather)

    found.append(ours("auto"))
    if bf16 is not None:
        found.append(ours("fp32"))
    found.append(monai(1, "constant", None, torch.no_grad, "defaults (sw_batch_size 1, constant, no_grad, fp32)"))
    found.append(monai(4, "gaussian", None, torch.inference_mode,
                       "best (sw_batch_size 4, gaussian, inference_mode, fp32)"))
    if bf16 is not None:
        found.append(monai(4, "gaussian", bf16, torch.inference_mode,
                           "best + the user's bf16 autocast (sw_batch_size 4, gaussian, inference_mode)"))
    if channels_last:
        found.append(ours("auto", cl=True))
        found.append(monai(4, "gaussian", bf16, torch.inference_mode, "best + bf16 autocast + channels_last", cl=True))
    return found


def same_windows(shape: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, bool]:
    """Our windows and MONAI's for ``shape``: (our count, whether both place exactly the same ones)."""
    ours = SlidingWindowPredictor(torch.nn.Identity(), patch, NUM_CLASSES, overlap=OVERLAP)._plan(
        shape, torch.device("cpu")).windows
    theirs = dense_patch_slices(shape, patch, _get_scan_interval(shape, patch, len(shape), (OVERLAP,) * len(shape)))
    def starts(windows):
        return sorted(tuple((s.start, s.stop) for s in w) for w in windows)

    return len(ours), starts(ours) == starts(theirs)


def part_a(model, size, device, repeats, image, label, read_seconds: float, channels_last: bool) -> None:
    model.eval().to(device)
    volume = torch.from_numpy(image)[None].to(device)  # 1 *S
    count, same = same_windows(tuple(volume.shape[1:]), (size["patch"],) * 3)
    runs = contenders(model, size, device, volume, channels_last)
    # warm-up on the whole volume, once each: oneDNN builds its primitives per precision, layout and shape
    for c in runs:
        c.run()
    for _ in range(repeats):  # alternate, so that a change of load hits every contender alike
        for c in runs:
            sync(device)
            start = time.perf_counter()
            c.labels = c.run()
            sync(device)
            c.seconds.append(time.perf_counter() - start)
    by_name = {c.name.split(" (")[0]: c for c in runs}
    best, fp32 = by_name["MONAI best"], by_name.get("ours, fp32")
    t_best = statistics.median(best.seconds)
    print(f"\n## (a) {'x'.join(map(str, volume.shape[1:]))} volume, patch {size['patch']}^3, overlap {OVERLAP} "
          f"({count} windows, {'the same windows for both' if same else 'NOT the same windows as MONAI'}; "
          f"MONAI's network followed by softmax: both blend probabilities), median of {repeats} alternating "
          f"runs after a warm-up")
    print("| predictor | seconds (median) | min | max | Dice vs reference | Dice vs MONAI best | MONAI best / this |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in runs:
        t = statistics.median(c.seconds)
        print(f"| {c.name} | {t:.2f} | {min(c.seconds):.2f} | {max(c.seconds):.2f} | {dice(c.labels, label):.4f} "
              f"| {dice(c.labels, best.labels):.4f} | {t_best / t:.2f}x |")
    ours = runs[0]
    defaults = next(c for c in runs if c.name.startswith("MONAI defaults"))
    t_ours = statistics.median(ours.seconds)
    print(f"ours ({ours.name}) vs MONAI defaults: {statistics.median(defaults.seconds) / t_ours:.2f}x; "
          f"vs MONAI best settings: {t_best / t_ours:.2f}x (goal >= 1.5x); Dice between "
          f"the two label maps {dice(ours.labels, best.labels):.4f} (goal >= 0.995)")
    identity_check(model, volume, size, device, ours, fp32 or ours)
    if fp32 is not None:
        same = dice(ours.labels, fp32.labels)
        print(f"bf16 decision: Dice between our bf16 and fp32 label maps {same:.4f}, voxels agreeing "
              f"{float((ours.labels == fp32.labels).mean()):.6f} -> inference.precision auto "
              f"{'may use bf16 (>= 0.995)' if same >= 0.995 else 'must stay fp32 (< 0.995)'}")
    attribute(runs, read_seconds)


def identity_check(model, volume, size, device, ours: Contender, ours_fp32: Contender) -> None:
    """MONAI fp32 given our Gaussian weight map (``roi_weight_map``): the same windows, weights and network, so
    that what is left of a difference between the label maps is ours. MONAI's own Gaussian floors the weights
    at 1e-3, ours (nnU-Net's) lets them fall to ~1e-9 at a window's corners: near a window's edge MONAI still
    counts that window's prediction, ours all but ignores it."""
    patch = (size["patch"],) * 3
    weights = gaussian_importance_map(patch).to(device)
    with torch.inference_mode():
        probs = sliding_window_inference(volume[None], patch, 4, lambda x: model(x).softmax(1), overlap=OVERLAP,
                                         mode="gaussian", roi_weight_map=weights)
    labels = probs[0].argmax(0).to(torch.uint8).cpu().numpy()
    print(f"identity check, MONAI fp32 with our Gaussian weight map (roi_weight_map): Dice vs {ours_fp32.name} "
          f"{dice(ours_fp32.labels, labels):.4f} (voxels agreeing {float((ours_fp32.labels == labels).mean()):.6f}), "
          f"vs {ours.name} {dice(ours.labels, labels):.4f}")


def attribute(runs: list[Contender], read_seconds: float) -> None:
    """Split each contender's median into gathering the windows, the network, and the rest (blending,
    normalising, argmax, copies), by timing the first two alone on the same window batches."""
    print("\nWhere the time goes (the network (best of 2) and the window gathering timed alone on the same window "
          f"batches; reading and z-scoring the NIfTI file, the same for all and not in the figures above: "
          f"{read_seconds:.2f} s)")
    print("| predictor | total | gather windows | network | blend + normalise + argmax + copies |")
    print("|---|---:|---:|---:|---:|")
    for c in runs:
        start = time.perf_counter()
        tiles = c.gather()
        gather = time.perf_counter() - start
        network = c.network(tiles)
        total = statistics.median(c.seconds)
        rest = total - gather - network
        print(f"| {c.name} | {total:.2f} | {gather:.2f} | {network:.2f} ({network / total:.0%}) "
              f"| {rest:.2f} ({rest / total:.0%}) |")
        del tiles


# -- (b) peak memory, in a child process -----------------------------------------------------------------


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_child(spec: dict) -> dict:
    """Runs in a fresh process: the peak RSS rise of ``predict_labels`` on a float32 volume."""
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    size = SIZES[spec["mode"]]
    model = build_model(size)
    patch = (size["patch"],) * 3
    predictor = SlidingWindowPredictor(model, patch, NUM_CLASSES, overlap=spec["overlap"], device="cpu")
    volume = torch.randn(1, *size["memory"], generator=torch.Generator().manual_seed(0))  # float32 C *S
    with torch.inference_mode():  # oneDNN and allocator set-up, so that it does not count as the predictor's
        model(volume[None, :, : patch[0], : patch[1], : patch[2]])
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    if spec["path"] == "predict_labels":
        labels = predictor.predict_labels(volume)
    else:  # the probabilities path: all K x S probabilities, then argmax
        probs = predictor(volume)
        labels = probs.argmax(0).cpu().numpy().astype(np.uint8)
        del probs
    seconds = time.perf_counter() - start
    return {
        "rise": _status_bytes("VmHWM") - base,
        "base": base,
        "volume": volume.numel() * 4,
        "labels": labels.nbytes,
        "model": sum(p.numel() * p.element_size() for p in model.parameters()),
        "seconds": seconds,
        "windows": len(predictor._plan(tuple(volume.shape[1:]), torch.device("cpu")).windows),
        "estimates": {
            str(o): SlidingWindowPredictor(model, patch, NUM_CLASSES, overlap=o).estimate_memory(
                volume.shape, labels=True)
            for o in (spec["overlap"], OVERLAP, 0.5)
        },
    }


def part_b(size: dict, mode: str, threads: int, compare: bool) -> None:
    mib = 2**20
    shape = "x".join(map(str, size["memory"]))
    print(f"\n## (b) peak memory predicting a float32 {shape} volume to labels, CPU, fresh process each, "
          f"overlap 0, sw_batch_size 4")
    print("| path | windows | seconds | RSS after model + volume MiB | peak rise MiB | rise / volume float32 |")
    print("|---|---:|---:|---:|---:|---:|")
    first = None
    for path in ("predict_labels", "call_argmax") if compare else ("predict_labels",):
        spec = {"mode": mode, "threads": threads, "overlap": 0.0, "path": path}
        proc = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            print(f"| {path} | failed: {lines[-1] if lines else proc.returncode} | | | | |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        first = first or r
        name = ("SlidingWindowPredictor.predict_labels (streaming)" if path == "predict_labels"
                else "__call__ + argmax (whole probabilities)")
        print(f"| {name} | {r['windows']} | {r['seconds']:.0f} | {r['base'] / mib:.0f} | {r['rise'] / mib:.0f} "
              f"| {r['rise'] / r['volume']:.2f}x |")
    if first is None:
        return
    r = first
    print(f"volume float32 {r['volume'] / mib:.0f} MiB, uint8 label map {r['labels'] / mib:.0f} MiB (inside the rise), "
          f"model weights {r['model'] / mib:.1f} MiB; goal for predict_labels: rise <= 2x volume + model = "
          f"{(2 * r['volume'] + r['model']) / mib:.0f} MiB")
    for overlap, est in r["estimates"].items():
        print(f"  estimate_memory(labels=True) at overlap {overlap}: accumulator {est['accumulator'] / mib:.0f} MiB, "
              f"labels {est['output'] / mib:.0f} MiB, window batch {est['window_batch'] / mib:.0f} MiB")


# -- (c) folder throughput ---------------------------------------------------------------------------------


def folder_cases(folder: Path, size: dict, count: int) -> list[Path]:
    """``count`` gzip NIfTI lesion volumes: a few rendered, the rest byte copies under other names (reading
    and decompressing cost the same; rendering 32 would take minutes)."""
    with contextlib.redirect_stdout(sys.stderr):  # make_lesions is quiet; keep stdout for figures
        make_lesions(folder, n=min(count, 4), size=size["case"], spacing=(1.0, 1.0, 1.0), seed=2)
    rendered = sorted((folder / "imagesTr").glob("*.nii.gz"))
    for i in range(len(rendered), count):
        shutil.copyfile(rendered[i % len(rendered)], folder / "imagesTr" / f"copy_{i:03d}_0000.nii.gz")
    return sorted((folder / "imagesTr").glob("*.nii.gz"))


def part_c(size, device, folder: Path, count: int, level: int | None) -> None:
    scans = folder_cases(folder, size, count)
    for probabilities in (False, True):
        folder_throughput(size, device, folder, scans, level, probabilities)
    compression_levels(scans[0], size, device, level)


def folder_model(size: dict) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = build_network("unet", size["folder_net"], spatial_dims=3, in_channels=1, num_classes=NUM_CLASSES).eval()
    meta = {
        "patch_size": [size["patch"]] * 3,
        "classes": {"background": 0, "lesion": 1},
        "normalize": {"mode": "zscore", "per_channel": True, "nonzero": False},
        "spacing": None,
        "label_kind": "semantic",
        "inference": {"overlap": FOLDER_OVERLAP, "sw_batch_size": 4},
    }
    return model, meta


def folder_throughput(size, device, folder: Path, scans: list[Path], level: int | None, probabilities: bool) -> None:
    """``predict_batch`` against the naive loop over the same scans, writing labels (and probabilities)."""
    model, meta = folder_model(size)
    predict_batch(model, meta, scans[:1], folder / "out_warm", device=device, show_progress=False,
                  probabilities=probabilities)

    def sequential(out: Path) -> dict[str, float]:
        """The naive loop: load -> predict -> write, one case after the other, the same CasePredictor and
        the same writing function as ``predict_batch``."""
        out.mkdir(parents=True, exist_ok=True)
        engine = CasePredictor(model, meta, device=device, tta=False, overlap=None, sw_batch_size=None,
                               instances=False, probabilities=probabilities)
        times = {"load": 0.0, "compute": 0.0, "write": 0.0}
        for scan in scans:
            t0 = time.perf_counter()
            data = engine.load(scan)
            t1 = time.perf_counter()
            result = engine.compute(data)
            sync(device)
            t2 = time.perf_counter()
            target = output_path(scan, out)
            write_case(CaseRecord(target.name.split(".")[0], str(scan), str(target)), result, out, level)
            times["load"] += t1 - t0
            times["compute"] += t2 - t1
            times["write"] += time.perf_counter() - t2
        return times

    # A B B A: a change of the machine's load during the run hits both loops alike
    seconds = {"sequential": 0.0, "predict_batch": 0.0}
    parts = {"load": 0.0, "compute": 0.0, "write": 0.0}
    for i, name in enumerate(("sequential", "predict_batch", "predict_batch", "sequential")):
        out = folder / f"out_{name}{i}{'_probabilities' if probabilities else ''}"
        out.mkdir()
        start = time.perf_counter()
        if name == "sequential":
            for key, value in sequential(out).items():
                parts[key] += value / 2
        else:
            records = predict_batch(model, meta, scans, out, device=device, show_progress=False,
                                    compression_level=level, probabilities=probabilities)
        seconds[name] += (time.perf_counter() - start) / 2
        if i:  # the page cache should hold the inputs, not the outputs of earlier rounds
            shutil.rmtree(out)
    t_seq, t_batch = seconds["sequential"], seconds["predict_batch"]
    failed = [r for r in records if r.status != "ok"]
    n = len(scans)
    bound = sum(parts.values()) / max(parts["compute"], parts["load"] + parts["write"])
    mib = sum(s.stat().st_size for s in scans) / n / 2**20
    print(f"\n## (c) {n} gzip NIfTI volumes of {'x'.join(map(str, size['case']))} (int16, {mib:.1f} MiB each, "
          f"page-cached), UNet {size['folder_net']}, patch {size['patch']}^3, overlap {FOLDER_OVERLAP}, "
          f"precision auto, output compression level {'default' if level is None else level}; writing "
          f"{'labels + float16 probabilities (--save-probabilities)' if probabilities else 'labels'}")
    print("| loop | seconds (mean of 2, order A B B A) | cases/s |")
    print("|---|---:|---:|")
    print(f"| naive sequential (load -> predict -> write) | {t_seq:.2f} | {n / t_seq:.2f} |")
    print(f"| predict_batch (reads ahead and writes behind in threads) | {t_batch:.2f} | {n / t_batch:.2f} |")
    print(f"ratio predict_batch/sequential: {t_seq / t_batch:.2f}x (goal >= 1.3x)"
          + (f"; {len(failed)} cases failed: {failed[0].error}" if failed else ""))
    print(f"naive loop, seconds per case: load (gunzip + z-score) {parts['load'] / n:.3f}, compute "
          f"{parts['compute'] / n:.3f}, write {parts['write'] / n:.3f}; the most overlapping can gain: {bound:.2f}x "
          f"(sum / max(compute, load + write))")


def compression_levels(scan: Path, size: dict, device, level: int | None) -> None:
    """Seconds and size of writing one predicted label map at each zlib level."""
    model, meta = folder_model(size)
    engine = CasePredictor(model, meta, device=device, tta=False, overlap=None, sw_batch_size=None,
                           instances=False, probabilities=False)
    result = engine.compute(engine.load(scan))
    print("| output compression level | write seconds (best of 3) | MiB |")
    print("|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for level in (0, 1, 6, 9):
            path, best = Path(tmp) / f"l{level}.nii.gz", float("inf")
            for _ in range(3):
                start = time.perf_counter()
                write_image(result["labels"], path, meta=result["meta"], compression_level=level)
                best = min(best, time.perf_counter() - start)
            print(f"| {level}{' (default)' if level == 1 else ''} | {best:.3f} | {path.stat().st_size / 2**20:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no training (a smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    parser.add_argument("--repeats", type=int, default=None, help="timed predictions in (a) (default 2, cuda 5)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="most training steps; training stops once the Dice of the volume is > 0.8 "
                             "(default 1000, quick 0)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="(a): load the trained network from this file if it exists (no training), else save it "
                             "there after training")
    parser.add_argument("--channels-last", action="store_true",
                        help="(a): also ours and MONAI with channels_last_3d windows")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the machine's CPUs)")
    parser.add_argument("--compare-probabilities", action="store_true",
                        help="(b): also measure __call__ + argmax, in a second process")
    parser.add_argument("--cases", type=int, default=None, help="(c): volumes in the folder (default 32, quick 4)")
    parser.add_argument("--compression-level", type=int, default=None, help="(c): zlib level of the outputs")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)  # internal: part (b) in a fresh process
    args = parser.parse_args()

    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    logging.basicConfig(level=logging.WARNING)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormals made CPU steps erratic here (see benchmarks/train_step.py)
    mode = "quick" if args.quick else "full"
    size = SIZES[mode]
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    steps = args.train_steps if args.train_steps is not None else (0 if args.quick else 1000)
    print(f"torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, {threads} CPU "
          f"threads, load average {os.getloadavg()[0]:.2f}; UNet {size['net']}, patch {size['patch']}^3")
    model = build_model(size)
    with tempfile.TemporaryDirectory(prefix="medseg_bench_") as tmp:
        tmp = Path(tmp)
        if "a" in args.parts:
            start = time.perf_counter()
            make_lesions(tmp / "a", n=1, size=(size["volume"],) * 3, spacing=(1.0, 1.0, 1.0), seed=1)
            print(f"rendered a {size['volume']}^3 lesion volume in {time.perf_counter() - start:.0f} s")
            start = time.perf_counter()
            image, label = load_case(tmp / "a", "Tr", "lesions_000")
            read_seconds = time.perf_counter() - start
            if args.weights and args.weights.is_file():  # trained by an earlier run of this script
                model.load_state_dict(torch.load(args.weights, weights_only=True))
                check = SlidingWindowPredictor(model, (size["patch"],) * 3, NUM_CLASSES, overlap=OVERLAP, device=device)
                reference = dice(check.predict_labels(torch.from_numpy(image)[None]), label)
                print(f"weights from {args.weights}: Dice of its prediction of the volume {reference:.3f}")
            elif steps:
                train(model, image, label, size, steps, device)
                if args.weights:
                    torch.save(model.state_dict(), args.weights)
            part_a(model, size, device, repeats, image, label, read_seconds, args.channels_last)
        if "b" in args.parts:
            part_b(size, mode, threads, args.compare_probabilities)
        if "c" in args.parts:
            part_c(size, device, tmp / "c", args.cases or size["cases"], args.compression_level)


if __name__ == "__main__":
    main()
