"""What train, predict and augment-preview share: resolving a dataset against a config, the transform chains,
and the metadata a trained model carries so prediction needs no config."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import monai.transforms as T

from medseg.config import ExperimentConfig, read_config, validate_config
from medseg.data.datalist import DatasetInfo, discover
from medseg.data.readers import load_image, load_transforms
from medseg.data.sanity import ValidateImaged
from medseg.errors import ConfigError, DataError
from medseg.instances import Representation, build_representation
from medseg.nets import check_network
from medseg.transforms.presets import (
    build_augmentation,
    build_mirror_pad,
    build_preprocessing,
)

LABEL_KEYS = ("label", "instance", "weight")


def load_experiment(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a config the way every command does (``medseg config`` exactly as ``medseg train``).

    The schema (:func:`medseg.config.validate_config`) and the network's own parameters
    (:func:`medseg.nets.check_network`, built on the meta device) are checked together, so one
    :class:`ConfigError` lists every problem. Dataset problems are ``medseg check``'s.
    """
    raw, where = read_config(source, overrides)
    problems, cfg = [], None
    try:
        cfg = validate_config(raw, where)
    except ConfigError as err:
        problems += err.problems
    model, dims = raw.get("model") or {}, (raw.get("data") or {}).get("spatial_dims", 2)
    if isinstance(model, dict) and isinstance(model.get("params", {}), dict) and dims in (2, 3):
        try:
            check_network(str(model.get("name", "unet")), model.get("params"), dims)
        except ConfigError as err:
            problems += [p for p in err.problems if p not in problems]
    if problems:
        raise ConfigError(*problems[0], source=where, others=problems[1:])
    return cfg


def resolve_dataset(cfg: ExperimentConfig) -> tuple[ExperimentConfig, DatasetInfo]:
    """Discover the cases under ``data.root`` and fill in what the config left to the dataset.

    ``data.label_kind`` comes from dataset.json when not set; ``data.classes`` from the dataset's ``labels``
    (semantic), or background/<cell>/border for instance datasets mapped with ``cell_border``.

    Raises:
        DataError: the dataset has fatal discovery problems (each named with its file) or no cases.
    """
    dataset = discover(cfg.data.root)
    errors = [p for p in dataset.problems if p.severity == "error"]
    if errors:
        raise DataError(cfg.data.root, "dataset problems (run `medseg check`):\n" + "\n".join(map(str, errors)))
    if not dataset.cases:
        raise DataError(cfg.data.root, "no training cases found (expected images/ + labels/ or a dataset.json)")
    label_kind = cfg.data.label_kind or dataset.label_kind or "semantic"
    classes = cfg.data.classes
    if classes is None:
        names = sorted(dataset.labels, key=dataset.labels.get) if dataset.labels else ["background", "foreground"]
        if label_kind == "instance":
            fg = next((n for n in names if dataset.labels.get(n, 0) != 0), "cell")
            names = ["background", fg] + (["border"] if cfg.data.instance_to_semantic == "cell_border" else [])
        classes = {name: i for i, name in enumerate(names)}
    data = cfg.data.model_copy(update={"label_kind": label_kind, "classes": classes})
    cfg = cfg.model_copy(update={"data": data})
    if label_kind == "instance" and cfg.data.instance_to_semantic == "cell_border" and len(classes) != 3:
        raise ConfigError("data.classes", f"cell_border needs 3 classes (background, cell, border), got {classes}")
    representation(cfg)  # an unknown name, option or threshold fails here, before anything is built
    return cfg, dataset


def representation(cfg: ExperimentConfig) -> Representation | None:
    """The instance representation of an instance dataset's config (None for semantic labels).

    Raises:
        ConfigError: unknown ``data.instance_target`` (listing the valid ones), an option it rejects, a
            semantic mode it cannot work with, an unknown ``instances.postprocess`` threshold, or a
            representation other than ``border`` asked of semantic labels.
    """
    name = cfg.data.instance_target
    if cfg.data.label_kind != "instance":
        if name != "border":
            raise ConfigError("data.instance_target", f"'{name}' needs instance labels; this dataset's are "
                              f"{cfg.data.label_kind or 'semantic'} (data.label_kind)")
        return None
    inst = cfg.instances
    rep = build_representation(
        name, {"border_width": inst.border_width, "mse_weight": inst.mse_weight, "msge_weight": inst.msge_weight}
    )
    if cfg.data.instance_to_semantic not in rep.semantic:
        raise ConfigError("data.instance_to_semantic", f"'{name}' needs one of: {', '.join(rep.semantic)}; "
                          f"got {cfg.data.instance_to_semantic}")
    for key in inst.postprocess:
        if key not in rep.thresholds:
            raise ConfigError(f"instances.postprocess.{key}", f"unknown threshold of '{name}'; expected one of: "
                              f"{', '.join(sorted(rep.thresholds))}")
    return rep


def ensure_writable(folder: Path, what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, before any compute depends on it.

    Raises:
        DataError: naming the folder and the system's reason (read-only, a file in the way, no permission...).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medseg-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise DataError(folder, f"cannot write the {what} folder here: {err.strerror or err}") from None
    return folder


def expected_channels(info: DatasetInfo) -> int:
    """The channel count of the first training case: every other case must have as many (the model's input)."""
    return int(load_image(info.cases[0].images).shape[0])


def _preprocessing(cfg: ExperimentConfig, in_channels: int | None = None) -> list:
    """load -> check (finite, invertible affine, channels) -> [resample to data.spacing] -> normalise, semantic
    target (+ border class, weight map)."""
    keys = ("image", "label")
    chain = list(load_transforms(keys))
    # training refuses NaN/Inf scans; every sample keeps the same keys (no warnings list)
    chain.append(ValidateImaged(("image",), in_channels=in_channels, warnings_key=None))
    if cfg.data.spacing is not None:
        chain.append(T.Spacingd(keys=keys, pixdim=cfg.data.spacing, mode=("bilinear", "nearest")))
    chain.append(
        build_preprocessing(
            spatial_dims=cfg.data.spatial_dims,
            label_kind=cfg.data.label_kind,
            normalize=cfg.transforms.normalize,
            weight_map=cfg.transforms.weight_map,
            instance_to_semantic=cfg.data.instance_to_semantic if cfg.data.label_kind == "instance" else None,
            border_width=cfg.instances.border_width,
        )
    )
    return chain


def training_transform(cfg: ExperimentConfig, in_channels: int | None = None) -> T.Compose:
    """load -> [resample] -> normalise, labels (+ border class, weight map) -> pad -> patch -> augment.

    Everything before the patch sampling is deterministic and cached by CacheDataset; the rest is drawn anew for
    every sample. Patches are centred on foreground with probability ``transforms.foreground_ratio``.
    """
    return T.Compose(_preprocessing(cfg, in_channels) + sampling_and_augmentation(cfg))


def sampling_and_augmentation(cfg: ExperimentConfig) -> list:
    """The random part of the training chain: pad to the patch, sample a patch, augment it, then the instance
    representation's regression targets from the augmented instance map (so they turn with the patch)."""
    tcfg = cfg.transforms
    keys = ["image", "label"] + (["weight"] if tcfg.weight_map.enabled else [])
    rep = representation(cfg)
    targets = rep.target_transform() if rep is not None else None
    if targets is not None:
        keys.append("instance")
    ratio = tcfg.foreground_ratio
    after = [] if targets is None else [targets, T.DeleteItemsd(keys="instance")]
    return [
        T.SelectItemsd(keys=keys),
        build_mirror_pad(tcfg.patch_size, keys=keys),  # images smaller than a patch: mirrored context
        T.RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=tcfg.patch_size, pos=ratio, neg=1.0 - ratio, num_samples=1,
            allow_smaller=False,
        ),
        build_augmentation(tcfg.augmentation.params, spatial_dims=cfg.data.spatial_dims, label_keys=keys[1:]),
        *after,
    ]


def preprocessing_transform(cfg: ExperimentConfig) -> T.Compose:
    """The deterministic part of the training chain alone (augment-preview starts from it)."""
    return T.Compose(_preprocessing(cfg))


def validation_transform(cfg: ExperimentConfig, in_channels: int | None = None) -> T.Compose:
    """Whole cases, deterministic: load -> [resample] -> normalise, semantic label (+ the instance map of
    instance datasets, for tuning the post-processing)."""
    keys = ["image", "label", "case"] + (["instance"] if cfg.data.label_kind == "instance" else [])
    return T.Compose(_preprocessing(cfg, in_channels) + [T.SelectItemsd(keys=keys, allow_missing_keys=True)])


def display_slice(image, *labels):
    """A picture of a case for a montage: ``image`` [C *S] and label maps [*S] (numpy) -> an image [H W] or
    [H W 3] and the labels [H W]. Arrays are [x, y(, z)] as MONAI loads them, so 2D is transposed back to
    rows = y; 3D shows the axial slice (last axis) with the most foreground in the first label map."""
    if image.ndim == 4:
        z = int((labels[0] > 0).reshape(-1, labels[0].shape[-1]).sum(0).argmax())
        image, labels = image[..., z], tuple(lab[..., z] for lab in labels)
    picture = image.transpose(2, 1, 0) if image.shape[0] == 3 else image[0].T
    return (picture, *(lab.T for lab in labels))


def model_metadata(cfg: ExperimentConfig, in_channels: int) -> dict[str, Any]:
    """Everything prediction needs, carried by checkpoints and the MLflow model."""
    return {
        "format": "medseg-model-v1",
        "model": {"name": cfg.model.name, "params": dict(cfg.model.params)},
        "spatial_dims": cfg.data.spatial_dims,
        "in_channels": in_channels,
        "classes": dict(cfg.data.classes or {}),
        "label_kind": cfg.data.label_kind,
        "instance_to_semantic": cfg.data.instance_to_semantic,
        "normalize": cfg.transforms.normalize.model_dump(),
        "patch_size": list(cfg.transforms.patch_size),
        "spacing": cfg.data.spacing,
        "inference": cfg.inference.model_dump(),
        "instances": instances_metadata(cfg),
    }


def instances_metadata(cfg: ExperimentConfig, thresholds: dict[str, float] | None = None) -> dict[str, Any] | None:
    """What ``predict --instances`` needs of the representation: its name, options, output channels and
    post-processing thresholds (the defaults with ``instances.postprocess``, until tuning replaces them)."""
    rep = representation(cfg)
    if rep is None:
        return None
    dims = cfg.data.spatial_dims
    return {
        "target": rep.name,
        "params": {"border_width": rep.border_width, "mse_weight": rep.mse_weight, "msge_weight": rep.msge_weight},
        "regression_channels": rep.regression_channels(dims),
        "vector_axes": rep.vector_axes(dims),
        "thresholds": thresholds if thresholds is not None else rep.check_thresholds(cfg.instances.postprocess),
        "tuned": thresholds is not None,
    }


def dataset_digest(dataset: DatasetInfo) -> str:
    """SHA-256 (first 16 hex digits) of the dataset's contents: every case file's path relative to the dataset
    root and its bytes, in case order. Renaming, editing or adding a file changes it; copying the dataset
    elsewhere or touching its files does not. Reads every file once (about 1 s per GB)."""
    root = Path(dataset.root).resolve() if getattr(dataset, "root", None) else None
    h = hashlib.sha256()
    for case in dataset.cases:
        for p in [*case.images, *([case.label] if case.label else [])]:
            top = Path(p).resolve()
            for path in sorted(top.rglob("*")) if top.is_dir() else [top]:  # a DICOM series is a folder
                if path.is_dir():
                    continue
                name = path.relative_to(root) if root is not None and path.is_relative_to(root) else path.name
                h.update(f"{name}\0".encode())
                with open(path, "rb") as stream:
                    for block in iter(lambda: stream.read(1 << 20), b""):  # noqa: B023 (used at once)
                        h.update(block)
                h.update(b"\0")
    return h.hexdigest()[:16]


