"""The planned config against the hand-written ``configs/lesions3d_unet.yaml`` at the same wall-clock budget.

    python benchmarks/plan.py                       # 16 thick-slice lesion volumes, 10 minutes per config
    python benchmarks/plan.py --minutes 2 --n 8     # a short, noisy run

On synthetic anisotropic lesions (``medseg synth lesions --spacing 0.8 0.8 4``), ``medseg plan`` derives a
config (``--hours`` = the budget, ``--memory`` as given); both configs then train through the real CLI on the
same training and validation cases (the planned folds replaced by the hand-written config's validation
cases), validating after every epoch (the hand-written config's epoch cut to 10 steps so that it validates
within short budgets; the planned config keeps the schedule planned for the budget). The two trainings run
AT THE SAME TIME, one torch thread each (``--threads``), so that both see the same machine load during the
same minutes (run one after the other on a shared machine, the second would meet a different load); the
planner is told it has those threads. Each run is stopped with SIGTERM when its budget is spent (the
training saves a checkpoint and stops cleanly); the best validation foreground Dice it reached is read from
its checkpoint. Read a difference smaller than the run-to-run spread (``--repeats``) as no difference.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MEDSEG = [sys.executable, "-m", "pipelines"]


def medseg(*args, env=None, timeout=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*MEDSEG, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"medseg {args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc


def train_together(runs: dict[str, tuple[Path, Path, list[str]]], seconds: float, env) -> dict[str, dict]:
    """Start every ``name: (config, out, overrides)`` training at once, stop each (SIGTERM) when ``seconds``
    of wall clock are spent, and return each one's best validation figures."""
    procs = {}
    start = time.monotonic()
    with contextlib.ExitStack() as logs:
        for name, (config, out, overrides) in runs.items():
            args = [*MEDSEG, "train", str(config), "--no-tracking", "--output", str(out)]
            for item in overrides:
                args += ["--set", item]
            log = logs.enter_context(open(out.parent / f"{out.name}.log", "w"))
            procs[name] = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        ended = _stop_after(procs, start, seconds)
    return {name: _best(out, ended[name]) for name, (_, out, _) in runs.items()}


def _stop_after(procs: dict[str, subprocess.Popen], start: float, seconds: float) -> dict[str, float]:
    """Wait for every process, sending SIGTERM to those still running at ``seconds``; their end times."""
    ended = {}
    while len(ended) < len(procs):
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.monotonic() - start
        if time.monotonic() - start >= seconds:
            for name, proc in procs.items():
                if name not in ended:
                    proc.send_signal(signal.SIGTERM)
            for name, proc in procs.items():
                if name not in ended:
                    proc.wait(timeout=600)
                    ended[name] = time.monotonic() - start
        time.sleep(1)
    return ended


def _best(out: Path, elapsed: float) -> dict:
    ckpt = out / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        log = (out.parent / f"{out.name}.log").read_text()[-2000:]
        return {"seconds": elapsed, "best_dice": None, "epochs": 0, "log": log}
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {"seconds": elapsed, "best_dice": state["best_foreground"], "best_epoch": state["best_epoch"],
            "epochs": state["epoch"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per config (default 10)")
    p.add_argument("--n", type=int, default=16, help="training + validation volumes (default 16)")
    p.add_argument("--size", type=int, nargs=3, default=[96, 96, 24], metavar=("X", "Y", "Z"))
    p.add_argument("--memory", type=float, default=2.0, help="memory budget for the planner, GB (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="repeat the pair (new seeds) to see the spread")
    p.add_argument("--seed", type=int, default=1, help="training seed of the first repeat (default 1)")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="medseg-plan-bench-"))
    env = {**os.environ, "MEDSEG_CACHE_DIR": str(work / "cache"), "OMP_NUM_THREADS": str(args.threads)}
    data = work / "lesions"
    if not (data / "dataset.json").is_file():
        medseg("synth", "lesions", "--out", data, "--n", args.n, "--size", *args.size, "--spacing", 0.8, 0.8, 4.0,
               env=env)
    planned = work / "planned.yaml"
    medseg("plan", data, "--out", planned, "--memory", args.memory, "--device", args.device,
           "--hours", args.minutes / 60, env=env)
    hand = yaml.safe_load((ROOT / "configs" / "lesions3d_unet.yaml").read_text())
    names = sorted(p.name.split("_0000")[0] for p in (data / "imagesTr").iterdir())
    val = names[:: max(2, round(1 / hand["data"]["val_fraction"]))]
    same = [f"data.val_cases={json.dumps(val)}", "train.val_every=1", f"train.device={args.device}",
            "data.num_workers=0"]
    hand_cfg = work / "hand.yaml"
    hand["data"]["root"] = str(data)
    hand_cfg.write_text(yaml.safe_dump(hand))
    load_before = os.getloadavg()[0]
    print(f"load average {load_before:.1f} on {os.cpu_count()} cores before; {args.minutes:g} min per config, "
          f"both at once, {args.threads} torch thread(s) each; {len(names) - len(val)} training / {len(val)} "
          f"validation volumes {' x '.join(map(str, args.size))}, 0.8 x 0.8 x 4 mm", flush=True)
    for repeat in range(args.repeats):
        seed = [f"experiment.seed={args.seed + repeat}"]
        # the planned config runs its own schedule (planned for this budget); the hand-written one keeps its
        # schedule but validates every 10 steps instead of every 5 x 50, so that it reports within short budgets
        runs = {"planned": (planned, work / f"planned-{repeat}", same + seed + ["data.folds=null"]),
                "lesions3d_unet.yaml": (hand_cfg, work / f"hand-{repeat}",
                                        same + seed + ["train.iterations_per_epoch=10"])}
        results = train_together(runs, args.minutes * 60, env)
        print(f"repeat {repeat + 1} (seed {args.seed + repeat}), load average {os.getloadavg()[0]:.1f} at the end:")
        for name, r in results.items():
            dice = "n/a" if r["best_dice"] is None else f"{r['best_dice']:.4f} (epoch {r['best_epoch']})"
            print(f"  {name:22s} best validation foreground Dice {dice}; {r['epochs']} epochs in "
                  f"{r['seconds']:.0f} s", flush=True)
            if r["best_dice"] is None:
                print(r["log"])
    print(f"planned config: {planned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
