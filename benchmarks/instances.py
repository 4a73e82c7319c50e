"""Instance representations at equal budget: ``border``, ``distance`` and ``flows`` on touching nuclei.

    python benchmarks/instances.py                 # the README budget (20 min measured on 2 busy CPU cores)
    python benchmarks/instances.py --quick         # a smoke run (tiny budget: the scores mean nothing)
    python benchmarks/instances.py --targets flows --epochs 40
    python benchmarks/instances.py --workdir W --reuse   # again on W's trained weights: post-processing only

One synthetic touching-nuclei set (:func:`medseg.data.synth.make_cells` with its default mix: about half the
nuclei in clusters of 2-5 that touch with no background between them) is written once. For each
representation the same experiment runs through medseg's own pipeline functions, as ``medseg`` runs them:

1. :func:`pipelines.train.train` with ``configs/demo_cells.yaml`` (network, patch, augmentation, weight map,
   optimiser, seed, epochs x steps x batch all the same) and only ``data.instance_target`` changed; training
   ends by tuning the post-processing thresholds on the validation cases;
2. :func:`pipelines.predict.predict_batch` with ``instances=True`` on the held-out cases (the tuned
   thresholds from the model metadata);
3. :func:`pipelines.evaluate.evaluate_folders` with ``instances=True``: AP@0.5, AP@0.5:0.95 (mean over the
   cases), PQ, and the merges and splits summed over the held-out cases.

Training samples/s is the training loop's own figure (mean over epochs, data loading included, validation
excluded). Post-processing seconds per 512x512 image: the network output of one held-out 512x512 image is
computed once, then the representation's ``postprocess`` (with the tuned thresholds) runs ``--repeats`` times
with ``torch.set_num_threads(1)`` and BLAS limited to one thread; the median is printed.

Nothing is asserted; every figure is measured in this run. On a shared machine the seconds are ratios at best.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from medseg.config import load_config
from medseg.data.synth import make_cells
from medseg.engine.checkpoint import load_checkpoint
from medseg.instances import build_representation
from pipelines.evaluate import evaluate_folders
from pipelines.predict import Predictor, load_trained_model, predict_batch
from pipelines.train import retune_run, train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_cells.yaml"
TARGETS = ("border", "distance", "flows")
BUDGETS = {  # equal for every representation; the full one is what the README reports
    "full": dict(n=24, n_test=6, size=(256, 256), epochs=20, steps=12, batch=4, repeats=5),
    "quick": dict(n=6, n_test=2, size=(128, 128), epochs=1, steps=2, batch=2, repeats=1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run with a tiny budget")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    p.add_argument("--epochs", type=int, help="override the budget's epochs (each of --steps steps)")
    p.add_argument("--steps", type=int, help="override the budget's steps per epoch")
    p.add_argument("--seed", type=int, default=0, help="seed of the data set and of every training run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for training and prediction (default 1: on a busy 2-core machine two "
                        "threads measured 8x slower than one, their OpenMP workers waiting on each other)")
    p.add_argument("--workdir", type=Path, help="keep data, runs and predictions here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true",
                   help="with --workdir: keep the weights of runs already trained there (same data and budget) and "
                        "only tune their post-processing again (after a post-processing change)")
    p.add_argument("--diameter", type=float, nargs=2, default=(10.0, 40.0), metavar=("LO", "HI"),
                   help="range of nucleus diameters in pixels (default 10 40, `medseg synth cells`'s; e.g. 20 60 to "
                        "check that the post-processing scales with the objects)")
    p.add_argument("--nuclei", type=int, nargs=2, default=(30, 80), metavar=("LO", "HI"),
                   help="range of nuclei per 256x256 pixels (default 30 80; fewer for larger nuclei)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    return p.parse_args(argv)


def one_thread():
    """Torch and BLAS limited to one thread inside the block (threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(1)


def run_target(target: str, data: Path, big: Path, work: Path, budget: dict, seed: int, reuse: bool = False) -> dict:
    overrides = [
        f"data.root={data}", f"data.instance_target={target}", f"experiment.seed={seed}",
        f"experiment.name=bench_{target}", f"experiment.output_dir={work / 'runs' / target}",
        f"train.epochs={budget['epochs']}", f"train.iterations_per_epoch={budget['steps']}",
        f"train.batch_size={budget['batch']}", f"train.val_every={budget['epochs']}",
        "tracking.enabled=false",
    ]
    cfg = load_config(CONFIG, overrides)
    run = work / "runs" / target
    if reuse and (run / "checkpoints" / "last.pt").is_file():
        # the trained weights of an earlier run with this budget; only the post-processing is tuned again
        before = load_config(run / "config.yaml").train
        if (before.epochs, before.iterations_per_epoch, before.batch_size) != (cfg.train.epochs,
                                                                               cfg.train.iterations_per_epoch,
                                                                               cfg.train.batch_size):
            raise SystemExit(f"--reuse: {run} was trained with another budget")
        t0 = time.perf_counter()
        retune_run(run)
        train_seconds = float("nan")
    else:
        t0 = time.perf_counter()
        run = train(cfg, output_dir=run).output_dir  # a new folder when this one holds a training
        train_seconds = time.perf_counter() - t0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    speed = state.get("history", {}).get("time/samples_per_s", [])

    model, meta = load_trained_model(str(run))
    scans = sorted((data / "imagesTs").iterdir())
    pred_dir = work / "pred" / target
    pred_dir.mkdir(parents=True, exist_ok=True)
    records = predict_batch(model, meta, scans, pred_dir, device=torch.device("cpu"), instances=True,
                            show_progress=False)
    failed = [r for r in records if r.status != "ok"]
    if failed:
        raise RuntimeError(f"{target}: prediction failed for {[r.input for r in failed]}: {failed[0].error}")
    _, summary = evaluate_folders(pred_dir, data / "labelsTs", instances=True)
    inst, totals = summary["instances"], summary["instance_totals"]
    return {
        "target": target,
        "ap50": inst["ap_50"], "map": inst["map"], "pq": inst["pq"],
        "merges": totals["merges"], "merged_refs": totals["merged_refs"],
        "splits": totals["splits"], "split_preds": totals["split_preds"],
        "n_ref": totals["n_ref"], "n_pred": totals["n_pred"],
        "fg_dice": summary["per_class"]["foreground"]["dice"],
        "samples_per_s": float(np.mean(speed)) if speed else float("nan"),
        "train_seconds": train_seconds,
        "postprocess_s_512": postprocess_seconds(model, meta, big, budget["repeats"]),
        "thresholds": (meta.get("instances") or {}).get("thresholds", {}),
        "val_map": ((meta.get("instances") or {}).get("tuning") or {}).get("map", float("nan")),
    }


def postprocess_seconds(model: torch.nn.Module, meta: dict, image: Path, repeats: int) -> float:
    """Median seconds of the representation's post-processing of one image's network output, one thread."""
    predictor = Predictor(model, meta, device=torch.device("cpu"), tta=False, overlap=None, sw_batch_size=None,
                          instances=False, probabilities=True)
    out = predictor.window(predictor.load(image)["image"]).float().cpu().numpy()
    k = len(meta["classes"])
    rep_meta = meta["instances"]
    rep = build_representation(rep_meta["target"], rep_meta.get("params"))
    min_size = meta.get("inference", {}).get("min_instance_size", 8)
    threads = torch.get_num_threads()
    times = []
    try:
        torch.set_num_threads(1)
        with one_thread():
            for _ in range(repeats):
                t0 = time.perf_counter()
                rep.postprocess(out[:k], out[k:] if out.shape[0] > k else None, min_size=min_size,
                                **rep_meta.get("thresholds", {}))
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


def table(rows: list[dict]) -> str:
    head = (f"{'target':<10}{'AP@0.5':>8}{'AP@.5:.95':>11}{'PQ':>7}{'merges':>8}{'splits':>8}{'refs':>6}{'preds':>7}"
            f"{'fgDice':>8}{'samples/s':>11}{'post s/512^2':>14}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['target']:<10}{r['ap50']:>8.3f}{r['map']:>11.3f}{r['pq']:>7.3f}{r['merges']:>8.0f}"
                     f"{r['splits']:>8.0f}{r['n_ref']:>6.0f}{r['n_pred']:>7.0f}{r['fg_dice']:>8.3f}"
                     f"{r['samples_per_s']:>11.1f}{r['postprocess_s_512']:>14.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    budget = dict(BUDGETS["quick" if args.quick else "full"])
    budget.update({k: v for k, v in (("epochs", args.epochs), ("steps", args.steps)) if v is not None})
    shape = {"diameter": list(args.diameter), "nuclei": list(args.nuclei)}  # of the synthetic nuclei
    context = nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory(prefix="bench_instances_")
    with context as folder:
        work = Path(folder)
        data = make_cells(work / "cells", n=budget["n"], n_test=budget["n_test"], size=budget["size"], seed=args.seed,
                          **shape)
        big = make_cells(work / "cells512", n=1, size=(512, 512), seed=args.seed + 1, **shape)
        big_image = sorted((big / "imagesTr").iterdir())[0]
        print(f"budget: {budget['epochs']} epochs x {budget['steps']} steps x batch {budget['batch']} "
              f"({budget['epochs'] * budget['steps'] * budget['batch']} patches) per representation; "
              f"{budget['n']} training/validation + {budget['n_test']} held-out {budget['size'][0]}x"
              f"{budget['size'][1]} images (seed {args.seed}, nuclei {shape['diameter'][0]:g}-{shape['diameter'][1]:g} "
              f"px across, {shape['nuclei'][0]}-{shape['nuclei'][1]} per 256^2); torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
        rows = []
        for target in args.targets:
            row = run_target(target, data, big_image, work, budget, args.seed, args.reuse)
            rows.append(row)
            print(f"{target}: thresholds {row['thresholds']} (validation AP@0.5:0.95 {row['val_map']:.3f}), "
                  f"trained in {row['train_seconds']:.0f} s; load {os.getloadavg()[0]:.1f}", flush=True)
    print(table(rows))
    if "border" in args.targets and len(rows) > 1:
        base = next(r for r in rows if r["target"] == "border")
        best = max(rows, key=lambda r: r["map"])
        gain = "the baseline itself" if best is base else f"{best['map'] - base['map']:+.3f} over border"
        print(f"best AP@0.5:0.95: {best['target']} ({gain})")
    if args.json:
        args.json.write_text(json.dumps({"budget": budget, "seed": args.seed, "nuclei": shape, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
