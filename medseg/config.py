# Long on purpose (over 450 lines): the one definition of every setting, one pydantic model per config section.
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
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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
    # How instance labels are learned and split again: border | distance | flows (medseg.instances); its
    # options are the `instances` section.
    instance_target: str = "border"
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    val_cases: list[str] | None = None  # explicit validation case names (override val_fraction)
    cache: bool = True  # cache the deterministic part (load + normalise + weight map) in memory
    num_workers: int = Field(2, ge=0)
    spacing: list[float] | None = None  # resample to this spacing (3D scans of mixed resolution)
    # cross-validation: `medseg train CONFIG --fold K` trains fold K of `folds` (run folder <output_dir>/fold_K)
    folds: int | None = Field(None, ge=2)
    fold: int | None = Field(None, ge=0)
    splits: str | None = None  # nnU-Net splits_final.json shape; None: <root>/splits.json (written when missing)

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

    @model_validator(mode="after")
    def _fold_in_range(self) -> DataConfig:
        if self.fold is not None and self.folds is None:
            raise ValueError("fold needs data.folds (the number of folds, e.g. 5)")
        if self.fold is not None and self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} is not one of 0..{self.folds - 1} (data.folds: {self.folds})")
        if self.folds is not None and self.val_cases:
            raise ValueError("data.val_cases and data.folds exclude each other: the folds choose the validation cases")
        return self

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"spacing must be positive, got {v}")
        return v


class NormalizeConfig(_Section):
    """Intensity normalisation (also applied at prediction time, from the model's metadata)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    mode: Literal["percentile", "zscore", "ct", "none"] = "percentile"
    lower: float = Field(1.0, ge=0.0, le=100.0)  # percentile mode: these percentiles map to 0..1
    upper: float = Field(99.8, ge=0.0, le=100.0, validate_default=True)
    window: list[float] = Field(default_factory=lambda: [-1000.0, 400.0], min_length=2, max_length=2)  # ct: HU
    per_channel: bool = True
    nonzero: bool = False  # statistics of nonzero voxels only, zeros kept (percentile, zscore)
    # ct with both: clip to window, then z-score with these dataset statistics (nnU-Net's CT scheme)
    mean: float | None = None
    std: float | None = Field(None, gt=0.0)

    @field_validator("upper")
    @classmethod
    def _above_lower(cls, upper: float, info: ValidationInfo) -> float:
        lower = info.data.get("lower")
        if lower is not None and lower >= upper:
            raise ValueError(f"expected upper > lower ({lower}), got {upper}")
        return upper

    @model_validator(mode="after")
    def _mean_with_std(self) -> NormalizeConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together (ct mode: clip to window, then (x - mean) / std)")
        return self

    @field_validator("window")
    @classmethod
    def _ordered_window(cls, window: list[float]) -> list[float]:
        if window[0] >= window[1]:
            raise ValueError(f"expected [low, high] with low < high, got {window}")
        return window


class WeightMapConfig(_Section):
    """The U-Net border weight map (Ronneberger et al. 2015)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    enabled: bool = False
    w0: float = Field(10.0, ge=0.0)
    sigma: float = Field(5.0, gt=0.0)
    class_balance: bool = True
    physical_units: bool = False


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _range(low_bound: Literal["positive", "non-negative"] | None) -> Any:
    """A ``[low, high]`` pair with ``low <= high`` (and ``0 < low`` / ``0 <= low``)."""
    words = {"positive": "0 < ", "non-negative": "0 <= ", None: ""}[low_bound]

    def check(value: Any) -> Any:
        ok = isinstance(value, list | tuple) and len(value) == 2 and all(_is_number(x) for x in value)
        ok = ok and value[0] <= value[1]
        ok = ok and (low_bound is None or value[0] > 0 or (low_bound == "non-negative" and value[0] == 0))
        if not ok:
            raise ValueError(f"expected [low, high] with {words}low <= high, got {value!r}")
        return [float(x) for x in value]

    return Annotated[list[float], BeforeValidator(check)]


def _degrees(value: Any) -> Any:
    values = value if isinstance(value, list | tuple) else [value]
    if len(values) not in (1, 3) or not all(_is_number(x) and 0 <= x <= 180 for x in values):
        raise ValueError(f"expected degrees in [0, 180], a number or a list of 3 (one per plane), got {value!r}")
    return value


def _per_axis_positive(value: Any) -> Any:
    values = value if isinstance(value, list | tuple) else [value]
    if not values or not all(_is_number(x) and x > 0 for x in values):
        raise ValueError(f"expected a number > 0 or one per spatial axis, got {value!r}")
    return value


def _distinct_axes(value: Any) -> Any:
    if value is not None and (not isinstance(value, list) or len(set(value)) != len(value)):
        raise ValueError(f"expected distinct spatial axes (0, 1[, 2]), got {value!r}")
    return value


def _two_axes(value: Any) -> Any:
    if len(value) != 2:
        raise ValueError(f"expected 2 distinct spatial axes (a plane), got {value!r}")
    return value


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Axes = Annotated[
    list[Annotated[int, Field(ge=0)]],
    BeforeValidator(lambda v: list(v) if isinstance(v, tuple) else v),
    AfterValidator(_distinct_axes),
]
Degrees = Annotated[float | list[float], BeforeValidator(_degrees)]
PerAxis = Annotated[float | list[float], BeforeValidator(_per_axis_positive)]


class AugmentationParams(_Section):
    """Every augmentation parameter with the ``cells2d`` values as defaults (README, "Presets").

    Strict types: ``true`` is not a probability, ``"0.5"`` not a number. Probabilities of 0 leave a transform
    out. Per-axis values and axes are checked against ``data.spatial_dims`` by :meth:`dims_problems`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    padding_mode: Literal["reflection", "border", "zeros"] = "reflection"  # context beyond the border: mirror
    flip_prob: Probability = 0.5  # per axis
    flip_axes: Axes | None = None  # None: every spatial axis
    rot90_prob: Probability = 0.75  # with k in 1..3: all four orientations equally likely
    rot90_axes: Annotated[Axes, AfterValidator(_two_axes)] = Field(default_factory=lambda: [0, 1])
    affine_prob: Probability = 0.3
    rotate_deg: Degrees = 45.0  # with rot90 this covers every angle; 3D: one number or one per plane
    scale_range: _range("positive") = Field(default_factory=lambda: [0.85, 1.15])  # per axis
    elastic_prob: Probability = 0.3
    elastic_spacing: PerAxis = 32.0  # control points, pixels
    elastic_magnitude: _range("non-negative") = Field(default_factory=lambda: [1.0, 4.0])  # displacement std, px
    grid_prob: Probability = 0.15
    grid_cells: int = Field(5, ge=1)
    grid_limit: float = Field(0.2, ge=0.0, le=0.99)
    optical_prob: Probability = 0.15
    optical_limit: float = Field(0.2, ge=0.0, le=1.0)
    optical_shift: float = Field(0.1, ge=0.0, le=1.0)
    brightness_prob: Probability = 0.3
    brightness_range: _range("non-negative") = Field(default_factory=lambda: [0.75, 1.25])  # multiplies
    contrast_prob: Probability = 0.3
    contrast_range: _range("non-negative") = Field(default_factory=lambda: [0.75, 1.25])  # about the mean
    gamma_prob: Probability = 0.3
    gamma_range: _range("positive") = Field(default_factory=lambda: [0.7, 1.5])
    noise_prob: Probability = 0.15
    noise_std: float = Field(0.05, ge=0.0, allow_inf_nan=False)  # largest std (drawn in [0, noise_std])
    blur_prob: Probability = 0.15
    blur_sigma: _range("non-negative") = Field(default_factory=lambda: [0.5, 1.5])  # pixels
    jitter_prob: Probability = 0.0
    jitter_brightness: float = Field(0.2, ge=0.0, le=1.0)
    jitter_contrast: float = Field(0.2, ge=0.0, le=1.0)
    jitter_saturation: float = Field(0.2, ge=0.0, le=1.0)
    jitter_hue: float = Field(0.05, ge=0.0, le=0.5)  # turns

    def dims_problems(self, spatial_dims: int) -> list[tuple[str, str]]:
        """``(parameter, message)`` for every value that does not fit ``spatial_dims`` (2 or 3)."""
        problems = []
        for name in ("flip_axes", "rot90_axes"):
            axes = getattr(self, name)
            if axes is not None and any(a >= spatial_dims for a in axes):
                problems.append((name, f"expected spatial axes in 0..{spatial_dims - 1}, got {axes}"))
        if isinstance(self.rotate_deg, list) and len(self.rotate_deg) != (1 if spatial_dims == 2 else 3):
            planes = "1 (one plane in 2D)" if spatial_dims == 2 else "3 (one per plane)"
            problems.append(("rotate_deg", f"expected a number or a list of {planes}, got {self.rotate_deg}"))
        if isinstance(self.elastic_spacing, list) and len(self.elastic_spacing) != spatial_dims:
            problems.append(("elastic_spacing", f"expected a number or a list of {spatial_dims}, "
                                                f"got {self.elastic_spacing}"))
        return problems


_NO_AUGMENTATION = {name: 0.0 for name in AugmentationParams.model_fields if name.endswith("_prob")}
# Each preset: the parameters it changes from the AugmentationParams defaults (which are cells2d's).
AUGMENTATION_PRESETS: dict[str, dict[str, Any]] = {
    "cells2d": {},
    "lesions2d": {
        "affine_prob": 0.5, "scale_range": [0.8, 1.2], "elastic_prob": 0.2, "elastic_spacing": 64.0,
        "elastic_magnitude": [2.0, 6.0],
        "brightness_prob": 0.0, "contrast_prob": 0.0,  # the colour jitter does brightness and contrast for RGB
        "gamma_prob": 0.2, "noise_prob": 0.1, "noise_std": 0.03, "blur_prob": 0.1, "jitter_prob": 0.5,
        "jitter_hue": 0.03,
    },
    "lesions3d": {
        "rot90_prob": 0.0,  # volumes are often anisotropic; enable for isotropic patches
        "affine_prob": 0.2, "rotate_deg": 15.0, "elastic_prob": 0.1, "elastic_magnitude": [1.0, 3.0],
        "grid_prob": 0.0, "optical_prob": 0.0, "brightness_prob": 0.15, "contrast_prob": 0.15, "gamma_prob": 0.15,
        "noise_prob": 0.1, "blur_prob": 0.1, "blur_sigma": [0.5, 1.0],
    },
    "none": _NO_AUGMENTATION,
}


class AugmentationConfig(_Section):
    """A named preset and the parameters that differ from it; resolved to the full :class:`AugmentationParams`."""

    preset: str = "none"
    params: AugmentationParams = Field(default_factory=lambda: AugmentationParams(**_NO_AUGMENTATION))

    @model_validator(mode="before")
    @classmethod
    def _preset_under_params(cls, data: Any) -> Any:
        """``params`` start from the preset's values, so a config names only what it changes."""
        if isinstance(data, AugmentationConfig):
            return data
        if isinstance(data, Mapping):
            preset, params = data.get("preset", "none"), data.get("params")
            if preset in AUGMENTATION_PRESETS and (params is None or isinstance(params, Mapping)):
                data = {**data, "params": {**AUGMENTATION_PRESETS[preset], **dict(params or {})}}
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in AUGMENTATION_PRESETS:
            raise ValueError(f"unknown augmentation preset '{value}'; expected one of: "
                             f"{', '.join(AUGMENTATION_PRESETS)}")
        return value


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
    # auto: bf16 on CUDA when supported, else fp16; fp32 on CPU, where bf16 (AVX512-BF16/AMX CPUs) must be asked for
    amp: Literal["auto", "bf16", "fp16", "fp32", "off"] = "auto"
    channels_last: bool = False
    compile: bool = False  # torch.compile the network (first steps slower while it compiles)
    val_every: int = Field(1, gt=0)
    # what picks the best checkpoint and drives early stopping: dice = mean Dice of the foreground classes;
    # ap = instance AP@0.5:0.95 (instance labels; post-processing with the untuned thresholds); auto = ap for
    # instance labels, else dice
    monitor: Literal["auto", "dice", "ap"] = "auto"
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ddp_timeout: float = Field(1800.0, gt=0.0)  # seconds a DDP collective may wait for the other processes


class InferenceConfig(_Section):
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(4, gt=0)
    tta: bool = False
    # autocast: auto = bf16 where the hardware has it (CPU AVX512-BF16/AMX, Ampere+ GPU), fp16 on older GPUs
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    cell_class: int | None = Field(None, ge=0)  # instance output: class id of cell interiors
    border_class: int | None = Field(None, ge=0)  # and of the border class separating touching cells
    min_instance_size: int = Field(8, ge=0)


class InstancesConfig(_Section):
    """Options of the instance representation ``data.instance_target`` (instance datasets only)."""

    border_width: int = Field(1, ge=1)  # thickness of the border class (cell_border), pixels
    # weights of the regression terms; None: the representation's own (flows: MSE 3, MSGE 1; distance: MSE 1)
    mse_weight: float | None = Field(None, ge=0.0)  # regression MSE (distance, flows)
    msge_weight: float | None = Field(None, ge=0.0)  # mean squared gradient error (flows)
    # Post-processing thresholds kept fixed (border: foreground; distance: foreground, marker; flows:
    # foreground, slope); the others are tuned on the validation cases at the end of training.
    postprocess: dict[str, float] = Field(default_factory=dict)
    tune: bool = True  # tune the thresholds on validation (else the defaults, overridden by postprocess)


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
    instances: InstancesConfig = Field(default_factory=InstancesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        """Checks across sections; every problem found is reported together."""
        problems = self._dims_problems()
        classes = self.data.classes
        if classes is not None:
            count = len(classes)
            if self.loss.class_weights is not None and len(self.loss.class_weights) != count:
                problems.append(("loss.class_weights",
                                 f"expected {count} weights (one per class), got {len(self.loss.class_weights)}"))
            for key in ("cell_class", "border_class"):
                class_id = getattr(self.inference, key)
                if class_id is not None and class_id >= count:
                    problems.append((f"inference.{key}",
                                     f"class id {class_id} out of range: classes are 0..{count - 1}"))
        if problems:
            raise _KeyedError(problems)
        return self

    def _dims_problems(self) -> list[tuple[str, str]]:
        dims = self.data.spatial_dims
        axes = " ".join("xyz"[:dims])
        problems = []
        if len(self.transforms.patch_size) != dims:
            problems.append(("transforms.patch_size", f"expected {dims} sizes ({axes}) for data.spatial_dims={dims}, "
                                                      f"got {self.transforms.patch_size}"))
        if self.data.spacing is not None and len(self.data.spacing) != dims:
            problems.append(("data.spacing", f"expected {dims} values ({axes}), got {self.data.spacing}"))
        augmentation = self.transforms.augmentation.params.dims_problems(dims)
        problems += [(f"transforms.augmentation.params.{name}", message) for name, message in augmentation]
        return problems

    @property
    def num_classes(self) -> int:
        if self.data.classes is None:
            raise ConfigError("data.classes", "not resolved yet (read from the dataset at run time)")
        return len(self.data.classes)

    @property
    def output_dir(self) -> Path:
        return Path(self.experiment.output_dir.replace("{name}", self.experiment.name))


class _KeyedError(ValueError):
    """Cross-field errors raised inside a model validator, each with the key it is about."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))


# ------------------------------------------------------------------------------------------------ loading


def load_config(source: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Load, override and validate an experiment config.

    Args:
        source: a YAML file or an already parsed mapping.
        overrides: ``"a.b=c"`` strings; values are parsed as YAML (``3`` -> int, ``[1, 2]`` -> list).

    Raises:
        ConfigError: naming the file, the key path and the expected form, for every problem found.
    """
    raw, where = read_config(source, overrides)
    return validate_config(raw, where)


def read_config(source: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> tuple[dict, str | None]:
    """The raw mapping of a config with ``overrides`` applied, not validated yet, and the file it came from.

    Raises:
        ConfigError: the file is missing, not YAML, not a mapping, or an override is malformed.
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
    return raw, where


def validate_config(raw: Mapping[str, Any], source: str | None = None) -> ExperimentConfig:
    """Validate a raw mapping; every problem is reported (one line each) in one :class:`ConfigError`."""
    return validate_section(ExperimentConfig, raw, source=source)


SectionT = TypeVar("SectionT", bound=BaseModel)


def validate_section(model: type[SectionT], values: Any, key: str = "", source: str | None = None) -> SectionT:
    """``values`` (a mapping or already a ``model``) as a validated ``model``, the config section at ``key``.

    The library's builders take their settings through this, so a setting is checked by its pydantic model
    alone, wherever it comes from (a config file, a model's metadata, a Python caller).

    Raises:
        ConfigError: every problem, each named by its key path below ``key``.
    """
    if isinstance(values, model):
        return values
    try:
        return model.model_validate({} if values is None else values)
    except ValidationError as err:
        problems = [problem for e in err.errors() for problem in _describe(e, model, key)]
        (first, message), others = problems[0], problems[1:]
        raise ConfigError(first, message, source=source, others=others) from None


def _describe(error: Mapping[str, Any], model: type[BaseModel], prefix: str) -> list[tuple[str, str]]:
    """``(key path, message)`` problems of one pydantic error."""
    loc = list(error.get("loc", ()))
    ctx_err = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _KeyedError):
        return list(ctx_err.problems)
    key = _key_path([*prefix.split("."), *loc] if prefix else loc)
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1], model)
        return [(key, f"unknown key; expected one of: {', '.join(valid)}")]
    if error["type"] == "missing":
        return [(key, "required key is missing")]
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] not in ("value_error",) and "input" in error:
        msg += f" (got {error['input']!r})"
    return [(key, msg)]


def _key_path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def _valid_keys(loc: list[Any], model: Any) -> list[str]:
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
