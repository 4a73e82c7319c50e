"""Prediction: our sliding window against MONAI's, streaming memory, and folder throughput, in one run.

    python benchmarks/predict.py               # full sizes (about 10 minutes on 2 busy CPU cores)
    python benchmarks/predict.py --quick       # small sizes, untrained network (a smoke run)
    python benchmarks/predict.py --device cuda --parts a c

One medseg 3D UNet (``features 4, depth 3``, 2 classes, patch 64^3) serves every part. In the full run it
is first trained for ``--train-steps`` steps (our loop, Dice + CE, Adam) on patches of a synthetic lesion
volume (:func:`medseg.data.synth.make_lesions`, 1 mm isotropic), so that the Dice below means something;
``--quick`` skips training and only compares the two predictions with each other.

(a) A held-out 192^3 lesion volume, predicted by :class:`medseg.inference.SlidingWindowPredictor` with its
    defaults (4 windows per call, Gaussian blending, inference mode, AMP on CUDA) and by MONAI's
    ``sliding_window_inference`` with its defaults (``sw_batch_size=1``, constant blending, fp32) under
    ``torch.no_grad()``; both at MONAI's default overlap 0.25 (the same 4x4x4 = 64 windows). The two
    alternate (``--repeats`` each, after a warm-up on a small volume); the median seconds, their ratio,
    the Dice of each label map against the reference and the Dice between the two are printed.
(b) Peak memory of :meth:`SlidingWindowPredictor.predict_labels` (the label-streaming path) on a float32
    512x512x256 volume, in a fresh subprocess on the CPU: peak RSS minus the RSS once the model is loaded
    and the volume created, against the volume's float32 size. Overlap 0 there (256 windows instead of
    605 at 0.25, to keep the run short): the live slabs span one to two window heights at any overlap, as
    the printed :meth:`estimate_memory` figures for overlaps 0, 0.25 and 0.5 show. With
    ``--compare-probabilities``, the same in a second fresh process through ``__call__`` + ``argmax``: the
    whole class probabilities, which ``medseg predict`` still builds when it resamples to a target spacing
    or writes instances or probabilities.
(c) 16 NIfTI lesion volumes of 96^3 predicted into a folder by :func:`pipelines.predict.predict_batch`
    (reads the next scan and writes the last in threads while computing) and by a sequential loop over the
    same :class:`medseg.predictor.CasePredictor` (load -> compute -> write, one after the other), run in the
    order sequential, batch, batch, sequential and averaged. The loop's
    own load / compute / write times bound what any overlap can gain: ``sum / max(compute, load + write)``.

Nothing is asserted; every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medseg.config import SchedulerConfig
from medseg.data.synth import make_lesions
from medseg.data.writers import write_image
from medseg.engine.loop import StepSettings, train_one_epoch
from medseg.engine.optim import Scheduler
from medseg.inference import SlidingWindowPredictor
from medseg.losses import DiceWeightedCELoss
from medseg.nets import build_network
from medseg.predictor import CasePredictor
from pipelines.predict import output_path, predict_batch

NUM_CLASSES = 2
SIZES = {
    "full": dict(net={"features": 4, "depth": 3}, patch=64, volume=192, memory=(512, 512, 256), cases=16, case=96),
    "quick": dict(net={"features": 4, "depth": 2}, patch=24, volume=48, memory=(96, 96, 48), cases=4, case=24),
}
OVERLAP = 0.25  # MONAI's default, used by both in (a)


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


def train(model: torch.nn.Module, image: np.ndarray, label: np.ndarray, patch: int, steps: int,
          device: torch.device) -> float:
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = Scheduler(optimizer, SchedulerConfig(name="poly"), epochs=1, steps_per_epoch=steps)
    amp = torch.bfloat16 if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    settings = StepSettings(device=device, amp_dtype=amp, grad_clip=12.0)
    start = time.perf_counter()
    result = train_one_epoch(model, patches(image, label, patch, 2, steps), DiceWeightedCELoss(NUM_CLASSES),
                             optimizer, scheduler, scaler, settings)
    seconds = time.perf_counter() - start
    print(f"trained {steps} steps of 2x1x{patch}^3 in {seconds:.0f} s, mean loss {result.losses['loss']:.3f}")
    return seconds


# -- (a) ours vs MONAI -----------------------------------------------------------------------------------


def part_a(model, size, device, repeats, image, label) -> None:
    patch = (size["patch"],) * 3
    ours = SlidingWindowPredictor(model, patch, NUM_CLASSES, overlap=OVERLAP, device=device)
    model.eval().to(device)
    volume = torch.from_numpy(image)[None].to(device)  # 1 *S

    def run_ours():
        return ours(volume).argmax(0)

    def run_monai():
        with torch.no_grad():
            return sliding_window_inference(volume[None], patch, 1, model, overlap=OVERLAP)[0].argmax(0)

    runs = {"ours (SlidingWindowPredictor, defaults)": run_ours, "MONAI sliding_window_inference": run_monai}
    warm = volume[:, : 2 * size["patch"], : 2 * size["patch"], : 2 * size["patch"]]
    with torch.no_grad():
        ours(warm), sliding_window_inference(warm[None], patch, 1, model, overlap=OVERLAP)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    labels = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync(device)
            start = time.perf_counter()
            labels[name] = fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    (ours_name, monai_name) = runs
    pred = {name: labels[name].cpu().numpy() for name in runs}
    t_ours, t_monai = statistics.median(seconds[ours_name]), statistics.median(seconds[monai_name])
    windows = len(ours._plan(tuple(volume.shape[1:]), torch.device("cpu")).windows)
    print(f"\n## (a) {'x'.join(map(str, volume.shape[1:]))} volume, patch {size['patch']}^3, overlap {OVERLAP} "
          f"({windows} windows), median of {repeats}")
    print(f"ours: sw_batch_size {ours.sw_batch_size}, {ours.blend} blending, AMP {ours.amp_dtype or 'off'}; "
          f"MONAI: sw_batch_size 1, constant blending, fp32, torch.no_grad()")
    print("| predictor | seconds (median) | min | max | Dice vs reference |")
    print("|---|---:|---:|---:|---:|")
    for name in runs:
        print(f"| {name} | {statistics.median(seconds[name]):.2f} | {min(seconds[name]):.2f} "
              f"| {max(seconds[name]):.2f} | {dice(pred[name], label):.4f} |")
    gap = dice(pred[ours_name], label) - dice(pred[monai_name], label)
    agree = float((pred[ours_name] == pred[monai_name]).mean())
    print(f"speed ours vs MONAI: {t_monai / t_ours:.2f}x (goal >= 1.5x); Dice difference ours - MONAI: {gap:+.4f} "
          f"(goal within 0.005); Dice between the two: {dice(pred[ours_name], pred[monai_name]):.4f}, "
          f"voxels agreeing {agree:.5f}")


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


def part_c(model, size, device, folder: Path) -> None:
    scans = sorted((folder / "imagesTr").glob("*.nii.gz"))
    meta = {
        "patch_size": [size["patch"]] * 3,
        "classes": {"background": 0, "lesion": 1},
        "normalize": {"mode": "zscore", "per_channel": True, "nonzero": False},
        "spacing": None,
        "label_kind": "semantic",
        "inference": {"overlap": OVERLAP, "sw_batch_size": 4},
    }
    warm = folder / "out_warm"
    predict_batch(model, meta, scans[:1], warm, device=device, show_progress=False)

    def sequential(out: Path) -> dict[str, float]:
        out.mkdir(parents=True, exist_ok=True)
        engine = CasePredictor(model, meta, device=device, tta=False, overlap=None, sw_batch_size=None,
                           instances=False, probabilities=False)
        times = {"load": 0.0, "compute": 0.0, "write": 0.0}
        for scan in scans:
            t0 = time.perf_counter()
            data = engine.load(scan)
            t1 = time.perf_counter()
            result = engine.compute(data)
            sync(device)
            t2 = time.perf_counter()
            write_image(result["labels"], output_path(scan, out), meta=result["meta"])
            times["load"] += t1 - t0
            times["compute"] += t2 - t1
            times["write"] += time.perf_counter() - t2
        return times

    # A B B A: a change of the machine's load during the run hits both loops alike
    seconds = {"sequential": 0.0, "predict_batch": 0.0}
    parts = {"load": 0.0, "compute": 0.0, "write": 0.0}
    for i, name in enumerate(("sequential", "predict_batch", "predict_batch", "sequential")):
        start = time.perf_counter()
        if name == "sequential":
            for key, value in sequential(folder / f"out_sequential{i}").items():
                parts[key] += value / 2
        else:
            records = predict_batch(model, meta, scans, folder / f"out_batch{i}", device=device, show_progress=False)
        seconds[name] += (time.perf_counter() - start) / 2
    t_seq, t_batch = seconds["sequential"], seconds["predict_batch"]
    failed = [r for r in records if r.status != "ok"]
    n = len(scans)
    bound = sum(parts.values()) / max(parts["compute"], parts["load"] + parts["write"])
    print(f"\n## (c) {n} NIfTI volumes of {size['case']}^3 (int16, gzip), patch {size['patch']}^3, "
          f"overlap {OVERLAP}; files in the page cache for both")
    print("| loop | seconds (mean of 2, order A B B A) | cases/s |")
    print("|---|---:|---:|")
    print(f"| sequential (load -> predict -> save) | {t_seq:.2f} | {n / t_seq:.2f} |")
    print(f"| predict_batch (threaded read/write) | {t_batch:.2f} | {n / t_batch:.2f} |")
    print(f"ratio predict_batch/sequential: {t_seq / t_batch:.2f}x (goal >= 1.3x)"
          + (f"; {len(failed)} cases failed: {failed[0].error}" if failed else ""))
    print(f"sequential loop, seconds per case: load {parts['load'] / n:.3f}, compute {parts['compute'] / n:.3f}, "
          f"write {parts['write'] / n:.3f}; the most any overlap can gain here: {bound:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no training (a smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    parser.add_argument("--repeats", type=int, default=None, help="timed predictions in (a) (default 2, cuda 5)")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (default 20, quick 0)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the machine's CPUs)")
    parser.add_argument("--compare-probabilities", action="store_true",
                        help="(b): also measure __call__ + argmax, in a second process")
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
    steps = args.train_steps if args.train_steps is not None else (0 if args.quick else 20)
    print(f"torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, {threads} CPU "
          f"threads, load average {os.getloadavg()[0]:.2f}; UNet {size['net']}, patch {size['patch']}^3")
    model = build_model(size)
    with tempfile.TemporaryDirectory(prefix="medseg_bench_") as tmp:
        tmp = Path(tmp)
        if "a" in args.parts:
            start = time.perf_counter()
            volume = (size["volume"],) * 3
            make_lesions(tmp / "a", n=1, n_test=1, size=volume, spacing=(1.0, 1.0, 1.0), seed=1)
            print(f"rendered two {size['volume']}^3 lesion volumes in {time.perf_counter() - start:.0f} s")
            if steps:
                train(model, *load_case(tmp / "a", "Tr", "lesions_000"), size["patch"], steps, device)
            image, label = load_case(tmp / "a", "Ts", "lesions_test_000")
            part_a(model, size, device, repeats, image, label)
        if "b" in args.parts:
            part_b(size, mode, threads, args.compare_probabilities)
        if "c" in args.parts:
            with contextlib.redirect_stdout(sys.stderr):  # make_lesions is quiet; keep stdout for figures
                make_lesions(tmp / "c", n=size["cases"], size=(size["case"],) * 3, spacing=(1.0, 1.0, 1.0), seed=2)
            part_c(model, size, device, tmp / "c")


if __name__ == "__main__":
    main()
