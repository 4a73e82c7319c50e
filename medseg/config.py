"""Typed experiment configuration: one YAML file -> validated objects -> resolved YAML saved with every run.

Every section is a pydantic model that forbids unknown keys, so a typo is an error naming the key path and the
keys that were expected; ``--set a.b=c`` overrides are applied to the raw mapping before validation, so they get
the same checks. Only this module reads YAML.

Example:
    >>> cfg = load_config("configs/demo_cells.yaml", overrides=["train.epochs=3"])
    >>> cfg.train.epochs
    3
    >>> text = dump_config(cfg)  # saved beside every run
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.errors import ConfigError

PositiveInt = Field(gt=0)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExperimentSection(_Section):
    """Names and reproducibility."""

    name: str = "medseg"
    run_name: str | None = None
    seed: int = Field(0, ge=0)
    deterministic: bool = False
    output_dir: str = "runs/{name}"  # {name} is replaced by experiment.name


class DataConfig(_Section):
    """Where the cases are and what their labels mean."""

    root: str
    spatial_dims: Literal[2, 3] = 2
    label_kind: Literal["semantic", "instance"] | None = None  # None: read from dataset.json, else semantic
    # Training classes, name -> id (0..K-1, background 0). None: from dataset.json (+ border for cells).
    classes: dict[str, int] | None = None
    instance_to_semantic: Literal["cell_border", "foreground"] = "cell_border"
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    val_cases: list[str] | None = None  # explicit validation case names (override val_fraction)
    cache: bool = True  # cache the deterministic part (load + normalise + weight map) in memory
    num_workers: int = Field(2, ge=0)
    spacing: list[float] | None = None  # resample to this spacing (3D scans of mixed resolution)

    @field_validator("classes")
    @classmethod
    def _classes_contiguous(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is None:
            return v
        ids = sorted(v.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"class ids must be 0..{len(ids) - 1} without gaps or repeats, got {ids}")
        if len(ids) < 2:
            raise ValueError("at least two classes (background and one foreground class) are needed")
        return v

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"spacing must be positive, got {v}")
        return v


class NormalizeConfig(_Section):
    mode: Literal["percentile", "zscore", "ct", "none"] = "percentile"
    lower: float = Field(1.0, ge=0.0, le=100.0)
    upper: float = Field(99.8, ge=0.0, le=100.0)
    window: list[float] = Field(default_factory=lambda: [-1000.0, 400.0], min_length=2, max_length=2)
    per_channel: bool = True
    nonzero: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> NormalizeConfig:
        if self.lower >= self.upper:
            raise ValueError(f"lower percentile ({self.lower}) must be below upper ({self.upper})")
        if self.window[0] >= self.window[1]:
            raise ValueError(f"window must be [low, high] with low < high, got {self.window}")
        return self


class WeightMapConfig(_Section):
    """The U-Net border weight map (Ronneberger et al. 2015)."""

    enabled: bool = False
    w0: float = Field(10.0, ge=0.0)
    sigma: float = Field(5.0, gt=0.0)
    class_balance: bool = True
    physical_units: bool = False


class AugmentationConfig(_Section):
    preset: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)  # overrides of the preset's defaults


class TransformsConfig(_Section):
    patch_size: list[int] = Field(min_length=2, max_length=3)
    foreground_ratio: float = Field(0.5, ge=0.0, le=1.0)  # share of patches centred on foreground
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    weight_map: WeightMapConfig = Field(default_factory=WeightMapConfig)
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, v: list[int]) -> list[int]:
        if any(p <= 0 for p in v):
            raise ValueError(f"every patch size must be a positive integer, got {v}")
        return v


class ModelConfig(_Section):
    name: str = "unet"
    params: dict[str, Any] = Field(default_factory=dict)  # checked by the network's constructor


class LossConfig(_Section):
    dice_weight: float = Field(1.0, ge=0.0)
    ce_weight: float = Field(1.0, ge=0.0)
    include_background: bool = False
    class_weights: list[float] | None = None
    # Weights of the deep-supervision heads in the network's output order (README, Networks): halving, equal,
    # or one weight per output (normalised). None: the network's default (UNet halving, UNet++ equal).
    deep_supervision_weights: str | list[float] | None = None

    @field_validator("deep_supervision_weights", mode="before")
    @classmethod
    def _known_weighting(cls, v: Any) -> Any:
        expected = "expected halving, equal or a list of finite weights >= 0 (one per network output, not all 0)"
        if v is None or v in ("halving", "equal"):
            return v
        numbers = isinstance(v, list) and all(isinstance(w, int | float) and not isinstance(w, bool) for w in v)
        if not numbers or not v or any(not math.isfinite(w) or w < 0 for w in v) or sum(v) == 0:
            raise ValueError(f"{expected}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _something_to_optimise(self) -> LossConfig:
        if self.dice_weight == 0 and self.ce_weight == 0:
            raise ValueError("dice_weight and ce_weight are both 0: nothing to optimise")
        return self


class OptimizerConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.99, ge=0.0, lt=1.0)  # sgd only
    nesterov: bool = True  # sgd only


class SchedulerConfig(_Section):
    name: Literal["poly", "cosine", "step", "plateau", "none"] = "poly"
    warmup_epochs: int = Field(0, ge=0)
    power: float = Field(0.9, gt=0.0)  # poly
    step_size: int = Field(30, gt=0)  # step
    gamma: float = Field(0.1, gt=0.0, le=1.0)  # step, plateau factor
    patience: int = Field(10, ge=0)  # plateau
    min_lr: float = Field(0.0, ge=0.0)


class EarlyStoppingConfig(_Section):
    patience: int | None = Field(None, gt=0)  # validations without improvement; None: off
    min_delta: float = Field(0.0, ge=0.0)


class TrainConfig(_Section):
    epochs: int = Field(100, gt=0)
    batch_size: int = Field(2, gt=0)
    iterations_per_epoch: int | None = Field(None, gt=0)  # None: one pass over the training cases
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    grad_clip: float | None = Field(12.0, gt=0.0)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA when supported, else fp16; off on CPU
    channels_last: bool = False
    val_every: int = Field(1, gt=0)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class InferenceConfig(_Section):
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(4, gt=0)
    tta: bool = False
    cell_class: int | None = Field(None, ge=0)  # instance output: class id of cell interiors
    border_class: int | None = Field(None, ge=0)  # and of the border class separating touching cells
    min_instance_size: int = Field(8, ge=0)


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str | None = None  # None: experiment.name
    registered_model_name: str | None = None


class ExperimentConfig(_Section):
    """One experiment: everything needed to train, and saved (resolved) beside every run."""

    experiment: ExperimentSection = Field(default_factory=ExperimentSection)
    data: DataConfig
    transforms: TransformsConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        dims = self.data.spatial_dims
        axes = " ".join("xyz"[:dims])
        if len(self.transforms.patch_size) != dims:
            raise _KeyedError(
                "transforms.patch_size",
                f"expected {dims} sizes ({axes}) for data.spatial_dims={dims}, got {self.transforms.patch_size}",
            )
        if self.data.spacing is not None and len(self.data.spacing) != dims:
            raise _KeyedError("data.spacing", f"expected {dims} values ({axes}), got {self.data.spacing}")
        classes = self.data.classes
        if classes is not None:
            n = len(classes)
            if self.loss.class_weights is not None and len(self.loss.class_weights) != n:
                raise _KeyedError(
                    "loss.class_weights", f"expected {n} weights (one per class), got {len(self.loss.class_weights)}"
                )
            for key in ("cell_class", "border_class"):
                cid = getattr(self.inference, key)
                if cid is not None and cid >= n:
                    raise _KeyedError(f"inference.{key}", f"class id {cid} out of range: classes are 0..{n - 1}")
        return self

    @property
    def num_classes(self) -> int:
        if self.data.classes is None:
            raise ConfigError("data.classes", "not resolved yet (read from the dataset at run time)")
        return len(self.data.classes)

    @property
    def output_dir(self) -> Path:
        return Path(self.experiment.output_dir.replace("{name}", self.experiment.name))


class _KeyedError(ValueError):
    """A cross-field error raised inside a model validator, carrying the key it is about."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


# ------------------------------------------------------------------------------------------------ loading


def load_config(source: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Load, override and validate an experiment config.

    Args:
        source: a YAML file or an already parsed mapping.
        overrides: ``"a.b=c"`` strings; values are parsed as YAML (``3`` -> int, ``[1, 2]`` -> list).

    Raises:
        ConfigError: naming the file, the key path and the expected form, for every problem found.
    """
    where = None
    if isinstance(source, Mapping):
        raw: Any = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ConfigError("", "config file not found", source=where)
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError("", f"not valid YAML: {err}", source=where) from err
        if raw is None:
            raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"expected a mapping of sections at the top level, got {type(raw).__name__}", where)
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, where)


def validate_config(raw: Mapping[str, Any], source: str | None = None) -> ExperimentConfig:
    """Validate a raw mapping; every problem is reported (one line each) in one :class:`ConfigError`."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(e) for e in err.errors()]
        (key, message), others = problems[0], problems[1:]
        raise ConfigError(key, message, source=source, others=others) from None


def _describe(error: Mapping[str, Any]) -> tuple[str, str]:
    loc = list(error.get("loc", ()))
    ctx_err = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _KeyedError):
        return ctx_err.key, str(ctx_err)
    key = _key_path(loc)
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        return key, f"unknown key; expected one of: {', '.join(valid)}"
    if error["type"] == "missing":
        return key, "required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] not in ("value_error",) and "input" in error:
        msg += f" (got {error['input']!r})"
    return key, msg


def _key_path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def _valid_keys(loc: list[Any]) -> list[str]:
    model: Any = ExperimentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override to a raw config mapping in place."""
    if "=" not in item:
        raise ConfigError("--set", f"expected KEY=VALUE (e.g. train.epochs=5), got {item!r}")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError("--set", f"expected a dotted key like train.optimizer.lr, got {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(key, f"--set value {text!r} is not valid YAML: {err}") from err
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is a value ({child!r}), cannot set {key} inside it")
        node = child
    node[parts[-1]] = value


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump_config(cfg: ExperimentConfig, path: str | Path | None = None) -> str:
    """The resolved config as YAML (written to ``path`` when given). Loading it gives an equal config."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text)
    return text
