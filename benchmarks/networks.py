"""Parameters, speed and peak memory of every network, 2D and 3D, on CPU and (when present) GPU with AMP.

    python benchmarks/networks.py            # the issue's sizes: 2D 8x1x256x256, 3D 2x1x96x96x96 (slow on CPU)
    python benchmarks/networks.py --quick    # small sizes, a smoke run
    python benchmarks/networks.py --device cpu --threads 1 --repeats 3

Each case runs in a fresh subprocess so that one case's memory does not count in the next. Per case:
``forward`` is inference (eval mode, ``torch.inference_mode``), ``fwd+bwd`` a training step without the
optimizer (train mode, loss = sum of the outputs' means, so deep-supervision heads count too). A warm-up on
a small input absorbs the libraries' start-up; the times are the median of ``--repeats`` runs at full size
(default 1 on CPU, where a 3D training step takes minutes, 5 on GPU). Peak memory over those runs is the
rise of the process's peak resident set (Linux ``/proc``) on CPU, and ``torch.cuda.max_memory_allocated``
on GPU (which includes the model's weights; the CPU figure does not, as they are loaded before).
UNet++ also runs pruned at every level L < depth (inference only: pruning needs no training step).
The numbers are measured, never asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from medseg.nets import UNetPlusPlus, build_network

SIZES = {"full": {2: (8, 256, 256), 3: (2, 96, 96, 96)}, "quick": {2: (2, 64, 64), 3: (1, 32, 32, 32)}}
NETWORKS = ("unet", "unetpp", "segnet")
NUM_CLASSES = 2


# -- one case, in a child process --------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory (MiB) above the level at ``start()``: CUDA allocator peak, or peak RSS on CPU (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = 0
        else:
            # hand freed heap back to the OS first, or this run could reuse it unseen by the RSS
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS, to the current RSS
            self.base = _proc_status_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return (_proc_status_kib("VmHWM") * 1024 - self.base) / 2**20


def _timed(fn, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_case(case: dict) -> dict:
    """Measure one (network, size, device) case; returns the numbers as a dict."""
    device = torch.device(case["device"])
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    batch, *spatial = case["size"]
    model = build_network(
        case["network"], case["params"], spatial_dims=len(spatial), in_channels=1, num_classes=NUM_CLASSES
    ).to(device)
    x = torch.randn(batch, 1, *spatial, device=device)
    amp = torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")
    result = {"params": sum(p.numel() for p in model.parameters())}
    memory = PeakMemory(device)

    def forward(x):
        with torch.inference_mode(), amp:
            model(x)

    def forward_backward(x):
        model.zero_grad(set_to_none=True)
        with amp:
            out = model(x)
            outputs = out if isinstance(out, list) else [out]
            loss = sum(o.float().mean() for o in outputs)
        loss.backward()

    steps = [("fwd", forward, "eval")] + ([("fwd_bwd", forward_backward, "train")] if case["train"] else [])
    warm_up = torch.randn(1, 1, *[32] * len(spatial), device=device)
    for _, fn, mode in steps:  # library start-up costs (oneDNN, CUDA kernels) land here, not in the times
        model.train(mode == "train")
        fn(warm_up)
    for name, fn, mode in steps:
        model.train(mode == "train")
        model.zero_grad(set_to_none=True)  # gradients left over would hide this step's own
        memory.start()
        times = [_timed(fn, x, device) for _ in range(case["repeats"])]
        result[f"{name}_mib"] = memory.peak_mib()
        result[f"{name}_s"] = statistics.median(times)
    return result


# -- the table, in the parent -------------------------------------------------------------------------


def cases(device: str, sizes: dict, repeats: int, threads: int | None):
    depth = inspect.signature(UNetPlusPlus).parameters["depth"].default
    for dims in (2, 3):
        for network in NETWORKS:
            common = dict(network=network, device=device, size=sizes[dims], repeats=repeats, threads=threads)
            yield dict(common, params={}, train=True)
            if network == "unetpp":
                for level in range(depth - 1, 0, -1):
                    yield dict(common, params={"prune_level": level}, train=False)


def run_in_subprocess(case: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or f"exit code {proc.returncode}").splitlines()
        return {"error": lines[-1][:80] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_row(case: dict, r: dict) -> str:
    name = case["network"] + (f" L={case['params']['prune_level']}" if "prune_level" in case["params"] else "")
    size = "x".join(map(str, (case["size"][0], 1, *case["size"][1:])))
    if "error" in r:
        return f"| {name} | {size} | {case['device']} | failed: {r['error']} | | | | |"

    def ms(key):
        return f"{r[key] * 1000:,.0f}" if key in r else "-"

    def mib(key):
        return f"{r[key]:,.0f}" if key in r else "-"

    return (
        f"| {name} | {size} | {case['device']} | {r['params'] / 1e6:.2f}M | {ms('fwd_s')} | {ms('fwd_bwd_s')} "
        f"| {mib('fwd_mib')} | {mib('fwd_bwd_mib')} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs: 2D 2x1x64x64, 3D 1x1x32x32x32")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default CPU 1, GPU 5)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case before it is reported failed")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args()

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
        print("no CUDA device: CPU only\n")
    sizes = SIZES["quick" if args.quick else "full"]
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} CPU threads; default params of each network")
    print("| network | input | device | params | forward ms | fwd+bwd ms | forward peak MiB | fwd+bwd peak MiB |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for device in devices:
        repeats = args.repeats or (1 if device == "cpu" else 5)
        for case in cases(device, sizes, repeats, args.threads):
            print(fmt_row(case, run_in_subprocess(case, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
