"""Measure what one training step of a network costs: memory and time, at a given patch and batch size.

The planner sizes patches and batches from these measurements, not from a formula. One probe builds the
network, runs a few forward/backward/SGD steps on random data and records:

- memory: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``) during a step, everything
  included (weights, gradients, optimizer state, activations, workspaces). On CPU, where PyTorch keeps no
  allocator statistics, two measures: a fast one in-process, the tensors autograd saves for the backward
  pass (hooked, each storage counted once) plus weights, gradients, momentum, the input and the largest
  gradient buffer (it came out 25-30 % below the true peak here), used to search; and an exact one, the
  growth of the peak resident memory (``ru_maxrss``) of a fresh subprocess that builds the network and runs
  the steps, used to verify the final plan.
- time: the median seconds of the steps after a warm-up step.

Results are cached in a JSON file keyed by everything that changes them (network, parameters, channels,
classes, patch, batch, device, torch version), so planning the same dataset again runs no probe.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.nets import build_network

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepCost:
    """Measured cost of one training step."""

    bytes: int  # peak memory of the step (see the module docstring for what is counted where)
    seconds: float  # median wall-clock time of a step
    device: str
    method: str  # "cuda-peak", "autograd-saved" or "peak-rss"


def cache_path() -> Path:
    """``$MEDSEG_CACHE_DIR/step_costs.json`` (default ``~/.cache/medseg``)."""
    root = os.environ.get("MEDSEG_CACHE_DIR") or Path.home() / ".cache" / "medseg"
    return Path(root) / "step_costs.json"


def _key(**fields: Any) -> str:
    return json.dumps(fields, sort_keys=True)


class StepProbe:
    """Measures (and caches) :class:`StepCost` of networks on one device.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        cache: JSON cache file (default :func:`cache_path`); None to keep results in memory only.
        steps: timed steps after one warm-up step.
        rss: on CPU, measure ``exact`` requests in a fresh process (peak resident memory); False answers them
            with the fast in-process measure (quicker, about 25-30 % low).
    """

    def __init__(self, device: str = "cpu", cache: Path | None | str = "default", steps: int = 2, rss: bool = True):
        self.device = torch.device(device)
        self.rss = rss
        self.cache = cache_path() if cache == "default" else (Path(cache) if cache else None)
        self.steps = steps
        self._memo: dict[str, StepCost] = self._load()
        self.measured = 0  # probes actually run (not from the cache)

    def _load(self) -> dict[str, StepCost]:
        if self.cache is None or not self.cache.is_file():
            return {}
        try:
            return {k: StepCost(**v) for k, v in json.loads(self.cache.read_text()).items()}
        except (ValueError, TypeError) as err:
            log.warning("ignoring unreadable probe cache %s (%s)", self.cache, err)
            return {}

    def _save(self) -> None:
        if self.cache is None:
            return
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({k: asdict(v) for k, v in self._memo.items()}, indent=1))
            tmp.replace(self.cache)
        except OSError as err:
            log.warning("cannot write the probe cache %s (%s)", self.cache, err)

    def cost(self, name: str, params: dict, *, spatial_dims: int, in_channels: int, num_classes: int,
             patch: list[int], batch: int, exact: bool = False) -> StepCost:
        """The cost of one training step of network ``name`` with ``params`` on ``batch`` patches.

        ``exact``: on CPU, measure the peak resident memory of a fresh process (slower) instead of autograd's
        saved tensors; on CUDA every measure is the allocator's peak.
        """
        rss = exact and self.rss and self.device.type == "cpu"
        key = _key(name=name, params=params, dims=spatial_dims, cin=in_channels, k=num_classes, patch=list(patch),
                   batch=batch, device=self.device.type, torch=torch.__version__, steps=self.steps, rss=rss)
        if key not in self._memo:
            if rss:
                self._memo[key] = measure_step_peak_rss(name, params, spatial_dims, in_channels, num_classes,
                                                        list(patch), batch, self.steps)
            else:
                model = build_network(name, params, spatial_dims=spatial_dims, in_channels=in_channels,
                                      num_classes=num_classes)
                self._memo[key] = measure_step(model, in_channels, list(patch), batch, self.device, self.steps)
            self.measured += 1
            self._save()
        return self._memo[key]


def measure_step_peak_rss(name: str, params: dict, spatial_dims: int, in_channels: int, num_classes: int,
                          patch: list[int], batch: int, steps: int = 2) -> StepCost:
    """CPU: the peak resident-memory growth of a fresh process building the network and running the steps."""
    spec = json.dumps({"name": name, "params": params, "dims": spatial_dims, "cin": in_channels, "k": num_classes,
                       "patch": list(patch), "batch": batch, "steps": steps, "threads": torch.get_num_threads()})
    code = "import sys; from medseg.planning.probe import _peak_rss_child; _peak_rss_child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return StepCost(int(result["bytes"]), float(result["seconds"]), "cpu", "peak-rss")


def _peak_rss_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    model = build_network(spec["name"], spec["params"], spatial_dims=spec["dims"], in_channels=spec["cin"],
                          num_classes=spec["k"])
    cost = measure_step(model, spec["cin"], spec["patch"], spec["batch"], torch.device("cpu"), spec["steps"])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    sys.stdout.write(json.dumps({"bytes": grown, "seconds": cost.seconds}) + "\n")


def _loss(out) -> torch.Tensor:
    outputs = out if isinstance(out, list) else [out]
    return sum(o.float().square().mean() for o in outputs)  # every head contributes, as in training


def measure_step(model: torch.nn.Module, in_channels: int, patch: list[int], batch: int,
                 device: torch.device, steps: int = 2) -> StepCost:
    """Run ``1 + steps`` SGD steps of ``model`` on random ``batch x in_channels x patch`` input and measure."""
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.99, nesterov=True)
    x = torch.randn(batch, in_channels, *patch, device=device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and torch.cuda.is_bf16_supported() else None
    times, peak = [], 0
    for step in range(1 + steps):
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        saved: dict[int, int] = {}
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(_counter(saved), lambda t: t):
            if autocast is not None:
                with autocast:
                    loss = _loss(model(x))
            else:
                loss = _loss(model(x))
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
            peak = max(peak, torch.cuda.max_memory_allocated(device))
        else:
            peak = max(peak, _cpu_step_bytes(model, x, saved))
        if step:
            times.append(time.perf_counter() - start)
    return StepCost(int(peak), float(statistics.median(times)), device.type, "cuda-peak" if cuda else "autograd-saved")


def _counter(saved: dict[int, int]):
    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    return pack


def _cpu_step_bytes(model: torch.nn.Module, x: torch.Tensor, saved: dict[int, int]) -> int:
    """Saved activations + weights, gradients, momentum + input + the largest activation-sized gradient."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(saved.values(), default=0)
    return sum(saved.values()) + 3 * weights + x.numel() * x.element_size() + largest
