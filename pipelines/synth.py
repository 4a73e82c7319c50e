"""`medseg synth`: write a synthetic dataset (the embedded default for demos and tests) and its preview."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from medseg.data.readers import load_image, split_name
from medseg.data.synth import make_cells, make_lesions
from medseg.errors import ConfigError
from medseg.visualize import overlay_montage
from pipelines.common import display_slice

log = logging.getLogger("medseg.synth")

PREVIEW_CASES = 6
LESION_SIZES = {3: (96, 96, 32), 2: (192, 192)}  # x y [z]


def write_preview(root: Path, cases: int = PREVIEW_CASES) -> Path:
    """``root/preview.png``: the first training cases with their labels, drawn as training draws cases."""
    root = Path(root)
    dataset = json.loads((root / "dataset.json").read_text())
    pictures, labels, titles = [], [], []
    for entry in dataset["training"][:cases]:
        image = np.asarray(load_image(root / entry["image"]))
        label = np.asarray(load_image(root / entry["label"]))[0]
        picture, label_2d = display_slice(image, label)
        if picture.ndim == 3:  # RGB: show the stored 8-bit colours, not a contrast stretch
            picture = np.clip(picture, 0, 255).astype(np.uint8)
        pictures.append(picture)
        labels.append(label_2d)
        titles.append(split_name(entry["label"])[0])
    instance = dataset.get("label_kind") == "instance"
    return overlay_montage(pictures, labels, root / "preview.png", titles=titles, ncols=3, instance=instance)


def run_synth(args: argparse.Namespace) -> int:
    if args.n < 1 or args.n_test < 0:
        raise ConfigError("--n", f"expected --n >= 1 and --n-test >= 0, got {args.n} and {args.n_test}")
    if args.kind == "cells":
        size = tuple(args.size)
        if min(size) < 32:
            raise ConfigError("--size", f"expected X Y of at least 32 pixels, got {' '.join(map(str, size))}")
        root = make_cells(args.out, n=args.n, size=size, seed=args.seed, n_test=args.n_test,
                          clusters=args.clusters, cluster_size=tuple(args.cluster_size))
    else:
        size = tuple(args.size) if args.size else LESION_SIZES[args.dims]
        if len(size) != args.dims or min(size) < 16:
            axes = " ".join("XYZ"[: args.dims])
            raise ConfigError("--size", f"expected {axes} ({args.dims} sizes of at least 16) for --dims {args.dims}, "
                                        f"got {' '.join(map(str, size))}")
        extra = {"spacing": tuple(args.spacing)} if args.spacing else {}
        if extra and args.dims != 3:
            raise ConfigError("--spacing", "only 3D lesions (--dims 3) have a voxel spacing")
        root = make_lesions(args.out, n=args.n, size=size, seed=args.seed, n_test=args.n_test, dims=args.dims,
                            **extra)
    preview = write_preview(root)
    print(f"wrote {args.n} training + {args.n_test} test cases to {root} (look at {preview})")
    return 0
