"""Border weight map: the fast version against the naive reference, side by side.

Touching nuclei (Voronoi cells of random seeds, cut to a radius) at 512x512 (~125 nuclei), 1024x1024
(~500), a 3D volume, and 2048x2048 (~2000, fast only: the naive one would take ~15 min) to show the
cost growing with pixels, not with pixels x objects. The naive reference is the common public
implementation (one full-image distance transform per object, stacked and sorted), taken from
``tests/transforms/reference.py``; at 1024x1024 it needs ~4.5 GB of memory and a minute or more.

Times are process CPU seconds (both versions are single-threaded, so this is robust to other load on
the machine) with wall-clock seconds beside them; the fast version is the best of ``--repeats`` runs,
the naive one a single run.

Usage:
    python benchmarks/weight_map.py [--cases 512 1024 3d 2048] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/

from medseg.transforms.weight_map import border_weight_map  # noqa: E402
from tests.transforms.reference import naive_border_weight_map, touching_nuclei  # noqa: E402

CASES = {  # name: (shape, seeds, nucleus radius in pixels)
    "512": ((512, 512), 125, 18),
    "1024": ((1024, 1024), 500, 18),
    "3d": ((64, 128, 128), 60, 8),
    "2048": ((2048, 2048), 2000, 18),
}
FAST_ONLY = {"2048"}


def timed(fn, *args, **kwargs):
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="runs of the fast version (best is kept)")
    parser.add_argument("--quick", action="store_true", help="only 512x512 and 3D, 2 repeats (~20 s)")
    args = parser.parse_args()
    if args.quick:
        args.cases, args.repeats = ["512", "3d"], 2

    header = f"{'case':>6} {'shape':>14} {'objects':>7} {'fast cpu/wall [s]':>19} {'naive cpu/wall [s]':>20}"
    print(header + f" {'ratio (cpu)':>11} {'fast ns/pixel':>13} {'max |diff|':>10}")
    for name in args.cases:
        shape, seeds, radius = CASES[name]
        inst = touching_nuclei(shape, seeds, radius, seed=0)
        n_objects = len(np.unique(inst)) - 1
        runs = [timed(border_weight_map, inst) for _ in range(max(args.repeats, 1))]
        fast, fast_cpu, fast_wall = min(runs, key=lambda r: r[1])
        per_pixel = fast_cpu / inst.size * 1e9
        row = f"{name:>6} {'x'.join(map(str, shape)):>14} {n_objects:>7} {fast_cpu:>9.3f}/{fast_wall:<9.3f}"
        if name in FAST_ONLY:
            print(row + f" {'(skipped)':>20} {'':>11} {per_pixel:>13.1f} {'':>10}", flush=True)
            continue
        naive, naive_cpu, naive_wall = timed(naive_border_weight_map, inst)
        diff = float(np.abs(fast - naive).max())
        ratio = naive_cpu / fast_cpu
        row += f" {naive_cpu:>10.2f}/{naive_wall:<9.2f} {ratio:>10.0f}x {per_pixel:>13.1f} {diff:>10.1e}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
