"""`medseg synth`: write a synthetic dataset (the embedded default for demos and tests)."""

from __future__ import annotations

import argparse
import logging

from medseg.data.synth import make_cells, make_lesions
from medseg.errors import ConfigError

log = logging.getLogger("medseg.synth")


def run_synth(args: argparse.Namespace) -> int:
    if args.n < 1 or args.n_test < 0:
        raise ConfigError("--n", f"expected --n >= 1 and --n-test >= 0, got {args.n} and {args.n_test}")
    if args.kind == "cells":
        size = tuple(args.size)
        if min(size) < 32:
            raise ConfigError("--size", f"expected H W of at least 32 pixels, got {size}")
        root = make_cells(args.out, n=args.n, size=size, seed=args.seed, n_test=args.n_test)
    else:
        size = tuple(args.size) if args.size else ((32, 96, 96) if args.dims == 3 else (192, 192))
        if len(size) != args.dims or min(size) < 16:
            raise ConfigError("--size", f"expected {args.dims} sizes of at least 16 for --dims {args.dims}, got {size}")
        root = make_lesions(args.out, n=args.n, size=size, seed=args.seed, n_test=args.n_test, dims=args.dims)
    print(f"wrote {args.n} training + {args.n_test} test cases to {root} (look at {root / 'preview.png'})")
    return 0
