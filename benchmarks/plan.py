"""The planned config against the hand-written ``configs/lesions3d_unet.yaml`` at the same wall-clock budget.

    python benchmarks/plan.py                       # 16 thick-slice lesion volumes, 10 minutes per config
    python benchmarks/plan.py --minutes 2 --n 8     # a short, noisy run

On synthetic anisotropic lesions (``medseg synth lesions --spacing 0.8 0.8 4``), ``medseg plan`` derives a
config (``--hours`` = the budget, ``--memory`` as given); both configs then train through the real CLI on the
same training and validation cases (the planned folds replaced by the hand-written config's validation
cases), validating after every epoch (the hand-written config's epoch cut to 10 steps so that it validates
within short budgets; the planned config keeps the schedule planned for the budget). Each run is stopped
with SIGTERM when its budget is spent (the training saves a checkpoint and stops cleanly); the best
validation foreground Dice it reached is read from its checkpoint. Wall-clock budgets on a shared machine
measure the machine as much as the configs: run it on a quiet one, and read a difference smaller than the
run-to-run spread as no difference. Nothing is asserted.
"""

from __future__ import annotations

import argparse
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
    return subprocess.run([*MEDSEG, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=True)


def train_for(config: Path, out: Path, seconds: float, overrides: list[str], env) -> dict:
    """Train until ``seconds`` of wall clock are spent (SIGTERM), return the best validation figures."""
    args = [*MEDSEG, "train", str(config), "--no-tracking", "--output", str(out)]
    for item in overrides:
        args += ["--set", item]
    start = time.monotonic()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    elapsed = time.monotonic() - start
    ckpt = out / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        return {"seconds": elapsed, "best_dice": None, "epochs": 0, "log": proc.stdout.read()[-2000:]}
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
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="medseg-plan-bench-"))
    env = {**os.environ, "MEDSEG_CACHE_DIR": str(work / "cache"), "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1")}
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
    results = {}
    # the planned config runs its own schedule (planned for this budget); the hand-written one keeps its
    # schedule but validates every 10 steps instead of every 5 x 50, so that it reports within short budgets
    for name, config, extra in (("planned", planned, ["data.folds=null"]),
                                ("lesions3d_unet.yaml", hand_cfg, ["train.iterations_per_epoch=10"])):
        results[name] = train_for(config, work / name.split(".")[0], args.minutes * 60, same + extra, env)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.minutes:g} min per config, "
          f"{len(names) - len(val)} training / {len(val)} validation volumes {' x '.join(map(str, args.size))}, "
          "0.8 x 0.8 x 4 mm")
    for name, r in results.items():
        dice = "n/a" if r["best_dice"] is None else f"{r['best_dice']:.4f} (epoch {r['best_epoch']})"
        print(f"  {name:22s} best validation foreground Dice {dice}; {r['epochs']} epochs in {r['seconds']:.0f} s")
    print(f"planned config: {planned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
