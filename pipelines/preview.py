"""`medseg augment-preview`: a PNG grid of augmented training samples with label overlays."""

from __future__ import annotations

import argparse
from pathlib import Path

import monai.transforms as T
import numpy as np

from medseg.data.datalist import to_datalist
from medseg.errors import ConfigError
from medseg.transforms.presets import preview_samples
from medseg.visualize import overlay_montage
from pipelines.common import (
    display_slice,
    load_experiment,
    preprocessing_transform,
    resolve_dataset,
    sampling_and_augmentation,
)


def _displayable(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[C *S] image and [1 *S] label -> a 2D picture and its label (see display_slice)."""
    return display_slice(image, label[0])


def augment_preview(config: Path, out: Path, n: int = 8, seed: int = 0, overrides: list[str] | None = None) -> Path:
    if n < 1:
        raise ConfigError("--n", f"expected at least 1 sample, got {n}")
    cfg, dataset = resolve_dataset(load_experiment(config, overrides or []))
    sample = preprocessing_transform(cfg)(to_datalist(dataset.cases[:1])[0])
    random_part = T.Compose(sampling_and_augmentation(cfg))
    images, labels, titles = [], [], []
    picture, label = _displayable(np.asarray(sample["image"]), np.asarray(sample["label"]))
    images.append(picture)
    labels.append(label)
    titles.append(f"{dataset.cases[0].name} (preprocessed)")
    for i, aug in enumerate(preview_samples(sample, random_part, n, seed)):
        aug = aug[0] if isinstance(aug, list) else aug
        picture, label = _displayable(np.asarray(aug["image"]), np.asarray(aug["label"]))
        images.append(picture)
        labels.append(label)
        titles.append(f"augmented {i + 1}")
    return overlay_montage(images, labels, out, titles=titles, instance=False)


def run_preview_cli(args: argparse.Namespace) -> int:
    path = augment_preview(args.config, args.out, n=args.n, seed=args.seed, overrides=args.overrides)
    print(f"wrote {path}")
    return 0
