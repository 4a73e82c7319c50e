"""Training-step throughput: our ``train_one_epoch`` against a plain MONAI loop, side by side in one run.

    python benchmarks/train_step.py             # 2D 8x1x128x128 and 3D 2x1x64x64x32, 3 classes (minutes on CPU)
    python benchmarks/train_step.py --quick     # small inputs and networks, a smoke run (seconds)
    python benchmarks/train_step.py --device cuda

Both loops train the same medseg UNet (identical initial weights) on the same in-memory batches, with no
augmentation and no data loader, using SGD (Nesterov momentum 0.99, as nnU-Net) in both:

* ours: :func:`medseg.engine.loop.train_one_epoch` with :class:`medseg.losses.DiceWeightedCELoss` (a
  per-pixel weight map on the CE term), gradient clipping at 12, the ``poly`` :class:`Scheduler` and
  :class:`StepSettings` (AMP from ``resolve_amp("auto")``: bf16/fp16 on CUDA, off on CPU);
* plain: ``for image, label in batches: zero_grad; forward; monai.losses.DiceCELoss; backward; step``
  (same autocast dtype on CUDA, a GradScaler only for fp16), nothing else.

The two loops alternate (ours, plain, ours, plain, ...) after one warm-up epoch each, so a change in the
machine's load hits both alike; each figure is the median over ``--repeats`` epochs of wall-clock
samples per second. On CPU, denormal floats are flushed to zero (``torch.set_flush_denormal``) unless
``--keep-denormals``: with them, single steps of either loop ran up to 50x slower at random moments here
(tiny probabilities and gradients once the logits grow), which drowned the difference between the loops.
A breakdown then times what only our step does (the loss with its weight map and
checks, clipping, the scheduler and the per-step loss read-out) on fixed logits, to explain a gap.
Nothing is asserted: the script prints measured figures.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import time
from dataclasses import dataclass

import monai
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from medseg.config import SchedulerConfig
from medseg.engine.loop import StepSettings, resolve_amp, train_one_epoch
from medseg.engine.optim import build_scheduler
from medseg.losses import DiceWeightedCELoss
from medseg.nets import build_network
from medseg.precision import detect

NUM_CLASSES = 3
GRAD_CLIP = 12.0


@dataclass
class Case:
    name: str
    batch: int
    spatial: tuple[int, ...]
    params: dict  # medseg UNet parameters (model.params)


CASES = {
    "full": [
        Case("2d", 8, (128, 128), {"features": 16, "depth": 4}),
        Case("3d", 2, (64, 64, 32), {"features": 16, "depth": 3}),  # configs/lesions3d_unet.yaml
    ],
    "quick": [
        Case("2d", 2, (32, 32), {"features": 4, "depth": 2}),
        Case("3d", 1, (16, 16, 16), {"features": 4, "depth": 2}),
    ],
}


def make_batches(case: Case, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` batches: ``image`` B 1 *S, ``label`` B 1 *S (3 blob-shaped classes), ``weight`` B 1 *S."""
    gen = torch.Generator().manual_seed(seed)
    pool = F.avg_pool2d if len(case.spatial) == 2 else F.avg_pool3d
    batches = []
    for _ in range(count):
        noise = torch.randn(case.batch, 1, *case.spatial, generator=gen)
        smooth = pool(noise, 9, stride=1, padding=4)  # blobs a few pixels wide
        cuts = torch.quantile(smooth.flatten()[:: max(1, smooth.numel() // 100_000)], torch.tensor([0.6, 0.85]))
        label = torch.bucketize(smooth, cuts)  # 0 background, 1 and 2 foreground classes
        image = smooth * 3 + 0.5 * torch.randn(noise.shape, generator=gen)
        edge = (label != label.roll(1, -1)) | (label != label.roll(1, -2))
        weight = 1.0 + 4.0 * edge.float()  # heavier borders, as a U-Net weight map
        batches.append({"image": image, "label": label.to(torch.uint8), "weight": weight})
    return batches


class Sync:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def build_ours(model: torch.nn.Module, device: torch.device, steps: int, amp: str = "auto", compile: bool = False):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    # sized so that the poly schedule never reaches 0 during the benchmark
    scheduler = build_scheduler(optimizer, SchedulerConfig(name="poly"), epochs=1000, steps_per_epoch=steps)
    amp_dtype = resolve_amp(amp, device)
    settings = StepSettings(device=device, amp_dtype=amp_dtype, grad_clip=GRAD_CLIP)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = DiceWeightedCELoss(NUM_CLASSES).to(device)
    net = torch.compile(model) if compile else model  # as pipelines/train.py does for train.compile

    def epoch(batches):
        return train_one_epoch(net, batches, loss_fn, optimizer, scheduler, scaler, settings)

    return epoch


def build_plain(model: torch.nn.Module, device: torch.device, amp: str = "auto"):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    amp = resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def epoch(batches):
        model.train()
        for batch in batches:
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(image)
            loss = loss_fn(logits.float(), label)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return epoch


def timed(fn, sync: Sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def breakdown(case: Case, device: torch.device, batches: list[dict], repeats: int) -> dict[str, float]:
    """Milliseconds per step of what only one loop does, on fixed logits (no network)."""
    sync = Sync(device)
    batch = batches[0]
    logits = torch.randn(case.batch, NUM_CLASSES, *case.spatial, device=device, requires_grad=True)
    label = batch["label"].to(device)
    weight = batch["weight"].to(device)
    ours, plain = DiceWeightedCELoss(NUM_CLASSES).to(device), DiceCELoss(to_onehot_y=True, softmax=True)

    def ours_loss():
        out = ours(logits, label.long(), weight)
        out.total.backward()
        float(out.total.detach()), {k: float(v) for k, v in out.parts.items()}  # the loop's read-out

    def plain_loss():
        plain(logits, label).backward()

    model = build_network("unet", case.params, spatial_dims=len(case.spatial), in_channels=1,
                          num_classes=NUM_CLASSES).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    scheduler = build_scheduler(optimizer, SchedulerConfig(name="poly"), epochs=1000, steps_per_epoch=10)
    optimizer.step()  # a scheduler steps after the optimizer (torch warns otherwise)
    parts = {
        "loss ours (fwd+bwd, weight map, checks, read-out)": ours_loss,
        "loss MONAI DiceCELoss (fwd+bwd)": plain_loss,
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP),
        "scheduler.step_iteration": scheduler.step_iteration,
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    for fn in parts.values():
        fn()  # warm-up
    for _ in range(max(10, 3 * repeats)):  # interleaved, so a burst of load elsewhere hits every part alike
        for name, fn in parts.items():
            times[name].append(timed(fn, sync))
    # the minimum: these take milliseconds, and on a shared machine any one run can be preempted
    return {name: 1000 * min(t) for name, t in times.items()}


def contenders(device: torch.device, compile: bool) -> dict[str, tuple]:
    """Loop name -> (builder kind, precision, compile). bf16 rows only where the hardware has bf16 (or CUDA)."""
    rows = {"plain MONAI loop, fp32": ("plain", "fp32", False), "ours, fp32": ("ours", "fp32", False)}
    if device.type == "cuda":
        rows = {"plain MONAI loop, AMP": ("plain", "auto", False), "ours, AMP": ("ours", "auto", False)}
    elif detect(device).cpu_bf16:
        rows["ours, bf16 (train.amp: bf16)"] = ("ours", "bf16", False)
        rows["plain MONAI loop + the user's bf16 autocast"] = ("plain", "bf16", False)
    if compile:
        key = "ours, bf16" if "ours, bf16 (train.amp: bf16)" in rows else "ours, fp32"
        rows[f"{key}, torch.compile (train.compile: true)"] = ("ours", "bf16" if "bf16" in key else "fp32", True)
    return rows


@torch.inference_mode()
def validation_dice(model: torch.nn.Module, batches: list[dict], device: torch.device) -> float:
    """Mean foreground Dice (classes 1..K-1, all held-out voxels pooled per class), fp32, eval mode."""
    model.eval()
    hits = torch.zeros(NUM_CLASSES)
    sizes = torch.zeros(NUM_CLASSES)
    for batch in batches:
        pred = model(batch["image"].to(device)).argmax(1).cpu()
        ref = batch["label"][:, 0].long()
        for c in range(1, NUM_CLASSES):
            hits[c] += 2 * ((pred == c) & (ref == c)).sum()
            sizes[c] += (pred == c).sum() + (ref == c).sum()
    return float((hits[1:] / sizes[1:].clamp(min=1)).mean())


def run_case(case: Case, device: torch.device, repeats: int, steps: int, compile: bool) -> None:
    torch.manual_seed(0)
    base = build_network("unet", case.params, spatial_dims=len(case.spatial), in_channels=1, num_classes=NUM_CLASSES)
    params = sum(p.numel() for p in base.parameters())
    batches = make_batches(case, steps)
    held_out = make_batches(case, 4, seed=1)
    samples = steps * case.batch
    sync = Sync(device)
    models, loops = {}, {}
    for name, (kind, amp, compiled) in contenders(device, compile).items():
        models[name] = copy.deepcopy(base).to(device)  # identical initial weights
        epoch = (build_ours(models[name], device, steps, amp, compiled) if kind == "ours"
                 else build_plain(models[name], device, amp))
        loops[name] = functools.partial(epoch, batches)
    warm: dict[str, float] = {}
    for name, fn in loops.items():  # warm-up: oneDNN / cuDNN set-up, allocator growth, compilation
        warm[name] = timed(fn, sync)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):  # alternate, so that a change of load hits every loop alike
        for name, fn in loops.items():
            rates[name].append(samples / timed(fn, sync))
    plain = next(iter(loops))
    plain_rate = statistics.median(rates[plain])
    dice = {name: validation_dice(model, held_out, device) for name, model in models.items()}
    size = "x".join(map(str, (case.batch, 1, *case.spatial)))
    print(f"\n## {case.name}: input {size}, {NUM_CLASSES} classes, medseg UNet {case.params} "
          f"({params / 1e6:.2f}M params) in every loop, {steps} batches per epoch, median of {repeats} epochs "
          f"after a warm-up epoch; validation Dice on 4 held-out batches after the same {(repeats + 1) * steps} steps")
    print(f"| loop | samples/s (median) | min | max | / {plain} (paired median) | first epoch s "
          f"| validation Dice | Dice - plain | Dice - same loop in fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    kinds = contenders(device, compile)
    for name in loops:
        twin = next((n for n, (kind, amp, compiled) in kinds.items()
                     if kind == kinds[name][0] and amp in ("fp32", "auto") and not compiled), name)
        paired = statistics.median(o / p for o, p in zip(rates[name], rates[plain]))
        print(f"| {name} | {statistics.median(rates[name]):.2f} | {min(rates[name]):.2f} | {max(rates[name]):.2f} "
              f"| {statistics.median(rates[name]) / plain_rate:.2f}x ({paired:.2f}x) | {warm[name]:.1f} "
              f"| {dice[name]:.4f} | {dice[name] - dice[plain]:+.4f} | {dice[name] - dice[twin]:+.4f} |")
    print("goals: ours >= 1.5x the plain loop where the CPU has bf16 (else >= 1.0x), Dice within 0.01")
    print("what only one loop does, ms per step (fixed logits, no network; min of interleaved runs):")
    for name, ms in breakdown(case, device, batches, repeats).items():
        print(f"  {name}: {ms:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs and networks (seconds)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed epochs per loop (default 5, cuda 10)")
    parser.add_argument("--steps", type=int, default=None, help="batches per epoch (default 6, cuda 20)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the machine's CPUs)")
    parser.add_argument("--keep-denormals", action="store_true", help="do not flush denormals to zero on CPU")
    parser.add_argument("--cases", nargs="+", choices=["2d", "3d"], default=["2d", "3d"])
    parser.add_argument("--compile", action="store_true", help="also ours with torch.compile (train.compile)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    flushed = not args.keep_denormals and torch.set_flush_denormal(True)
    cuda = device.type == "cuda"
    repeats = args.repeats or (10 if cuda else 5)
    steps = args.steps or (20 if cuda else 6)
    caps = detect(device)
    print(f"torch {torch.__version__}, MONAI {monai.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, {threads} CPU threads, "
          f"CPU bf16 {'native' if caps.cpu_bf16 else 'not native'}, denormals {'flushed' if flushed else 'kept'}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for case in CASES["quick" if args.quick else "full"]:
        if case.name in args.cases:
            run_case(case, device, repeats, steps, args.compile)


if __name__ == "__main__":
    main()
