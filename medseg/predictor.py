"""Whole-case inference from a model's metadata: what ``medseg predict`` runs on a scan file and the MLflow pyfunc
(:mod:`medseg.tracking.pyfunc`) runs on an array, one code path for both.

A model's metadata (written by ``medseg train`` into checkpoints, logged models and exports) says everything
needed: normalisation, training spacing, patch size, sliding-window settings and precision, classes, and the
instance representation with its (tuned) post-processing thresholds. :class:`CasePredictor` applies the training
preprocessing, the sliding window (+ mirror TTA), goes back to the scan's own grid through MONAI's inverse when
the model was trained with a spacing, and gives labels and, for cell models, instances.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import monai.transforms as T
import numpy as np
import torch
from torch import nn

from medseg.data.readers import load_transforms
from medseg.data.sanity import ValidateImaged
from medseg.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from medseg.errors import ConfigError, DataError
from medseg.inference import SlidingWindowPredictor
from medseg.instances import build_representation
from medseg.nets import build_network
from medseg.postprocess import cell_instances, probabilities_to_labels
from medseg.transforms.presets import build_normalization

__all__ = ["CasePredictor", "build_trained_network", "load_model_file", "prediction_transform",
           "regression_channels", "save_weights"]

log = logging.getLogger(__name__)


def regression_channels(meta: dict[str, Any]) -> int:
    """``R`` of a model's metadata (0 for models without a representation, e.g. older ones)."""
    return int((meta.get("instances") or {}).get("regression_channels", 0))


def build_trained_network(meta: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None,
                          source: Any = "weights") -> nn.Module:
    """The network a model's metadata describes (``model.name``, ``model.params``, channels, classes and
    regression channels), with ``state_dict`` loaded when given (a DataError naming ``source`` when it does not
    fit), in eval mode."""
    model = build_network(
        meta["model"]["name"], meta["model"]["params"], spatial_dims=meta["spatial_dims"],
        in_channels=meta["in_channels"], num_classes=len(meta["classes"]) + regression_channels(meta),
    )
    if state_dict is not None:
        load_weights(model, state_dict, source, what=f"the {meta['model']['name']} its metadata describes")
    return model.eval()


def save_weights(model: nn.Module, meta: dict[str, Any], path: Path) -> Path:
    """A weights-only file (``{"model": state_dict, "metadata": meta}``), read back by :func:`load_model_file`."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint(Path(path), {"model": state, "metadata": meta})


def load_model_file(path: Path, map_location: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The network and metadata of a checkpoint or weights file (``torch.load(weights_only=True)``).

    Raises:
        DataError: the file carries no model metadata, or its weights do not fit the network it describes.
    """
    state = load_checkpoint(Path(path), map_location=map_location)
    meta = state.get("metadata")
    if not meta:
        raise DataError(path, "checkpoint carries no model metadata (was it written by `medseg train`?)")
    return build_trained_network(meta, state["model"], path), meta


def prediction_transform(meta: dict[str, Any], nonfinite: str = "error", load: bool = True) -> T.Compose:
    """What prediction applies to a scan, rebuilt from a model's metadata (no config needed); a scan that is
    not finite (unless ``nonfinite="replace"``), has a degenerate affine or the wrong channel count fails here,
    before any compute.

    ``load``: read the file and resample it to the training spacing first; without, only the normalisation
    (an array has no geometry: it is taken to be on the model's grid, and :meth:`CasePredictor.predict_array`
    checks it).
    """
    chain = []
    if load:
        chain += list(load_transforms(("image",)))
        chain.append(ValidateImaged(("image",), in_channels=meta.get("in_channels"), nonfinite=nonfinite))
        if meta.get("spacing") is not None:
            chain.append(T.Spacingd(keys=("image",), pixdim=meta["spacing"], mode="bilinear"))
    chain.append(build_normalization(meta["normalize"]))
    return T.Compose(chain)


class CasePredictor:
    """Predicts one case: preprocess as in training, sliding window, back to the input's geometry.

    Args:
        model: the network, an ensemble, or any callable ``B C *P -> B K(+R) *P`` (an exported network).
        meta: the model's metadata.
        device: where the model runs.
        tta: mirror TTA; ``None``: the model's ``inference.tta``.
        overlap, sw_batch_size: sliding-window settings; ``None``: the model's.
        instances: also give instance ids (cell models).
        probabilities: also give float16 class probabilities (and regression maps).
        nonfinite: ``error`` (a scan with NaN/Inf fails) or ``replace``.
        overrides: ``KEY=NUMBER`` post-processing settings (see :meth:`_apply_overrides`).
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16``; ``None``: the model's ``inference.precision``.
    """

    def __init__(self, model: nn.Module | Any, meta: dict[str, Any], *, device: str | torch.device = "cpu",
                 tta: bool | None = None, overlap: float | None = None, sw_batch_size: int | None = None,
                 instances: bool = False, probabilities: bool = False, nonfinite: str = "error",
                 overrides: list[str] | None = None, precision: str | None = None):
        inf = meta.get("inference", {})
        self.meta = meta
        self.transform = prediction_transform(meta, nonfinite=nonfinite)
        self.array_transform = prediction_transform(meta, load=False)
        self.num_classes = len(meta["classes"])
        rep_meta = meta.get("instances") or {}
        self.window = SlidingWindowPredictor(
            model, meta["patch_size"], self.num_classes,
            overlap=inf.get("overlap", 0.5) if overlap is None else overlap,
            sw_batch_size=inf.get("sw_batch_size", 4) if sw_batch_size is None else sw_batch_size,
            device=device, tta=bool(inf.get("tta", False)) if tta is None else tta,
            regression_channels=regression_channels(meta), vector_axes=rep_meta.get("vector_axes") or None,
            amp=inf.get("precision", "auto") if precision is None else precision,
        )
        log.info("prediction precision: %s", self.window.amp_dtype or "float32")
        self.instances, self.probabilities = instances, probabilities
        if instances and meta.get("label_kind") != "instance":
            log.warning("instances: the model was not trained on instance labels; cells split by connectivity only")
        self.cell_class = inf.get("cell_class") or 1
        self.border_class = inf.get("border_class")
        if self.border_class is None and meta.get("instance_to_semantic") == "cell_border":
            self.border_class = 2
        self.min_size = inf.get("min_instance_size", 8)
        self.representation, self.thresholds = None, {}
        if rep_meta:  # models trained with an instance representation
            self.representation = build_representation(rep_meta["target"], rep_meta.get("params"))
            self.thresholds = dict(rep_meta.get("thresholds") or {})
        self._apply_overrides(overrides or [])

    def _apply_overrides(self, overrides: list[str]) -> None:
        """``instances.postprocess.<name>=<value>`` and ``inference.min_instance_size=<n>`` (``predict --set``)."""
        for item in overrides:
            key, sep, text = item.partition("=")
            key = key.strip()
            try:
                value = float(text)
            except ValueError:
                value = None
            if not sep or value is None:
                example = "instances.postprocess.foreground=0.4"
                raise ConfigError("--set", f"expected KEY=NUMBER, e.g. {example}; got {item!r}")
            if key == "inference.min_instance_size" and value >= 0 and value == int(value):
                self.min_size = int(value)
            elif key.startswith("instances.postprocess.") and self.representation is not None:
                name = key.removeprefix("instances.postprocess.")
                try:
                    self.thresholds = self.representation.check_thresholds({**self.thresholds, name: value})
                except ValueError as err:
                    raise ConfigError(key, str(err)) from None
            else:
                names = sorted(self.representation.thresholds) if self.representation is not None else []
                valid = ", ".join(["inference.min_instance_size"] + [f"instances.postprocess.{n}" for n in names])
                raise ConfigError(key, f"cannot be set at prediction time (or bad value {text!r}); expected one of: "
                                  f"{valid}")
        if overrides:
            log.info("post-processing: min_instance_size %d, thresholds %s", self.min_size, self.thresholds)

    def load(self, scan: Path) -> dict:
        """Read, check and preprocess a scan file: ``{"image": MetaTensor C *S[, "warnings"]}``."""
        return self.transform({"image": str(scan)})

    def compute(self, data: dict, invert: bool = True) -> dict[str, Any]:
        """Predict a preprocessed case: ``{"meta", "labels", ["instances"], ["probabilities", ["regression"]]}``
        (numpy). ``invert``: undo the resampling of :meth:`load` (a case from :meth:`predict_array` has none).
        """
        image = data["image"]
        meta = dict(getattr(image, "meta", {}) or {})
        resampled = invert and self.meta.get("spacing") is not None
        if not (self.instances or self.probabilities or resampled):
            # labels only: streamed slab by slab, never the K x volume of class probabilities in memory
            return {"meta": meta, "labels": self.window.predict_labels(image)}
        probs = self.window(image)
        if resampled:  # back to the scan's own grid through MONAI's inverse
            probs, meta = self._invert(data, probs)
        k = self.num_classes
        out: dict[str, Any] = {"meta": meta, "labels": probabilities_to_labels(probs[:k])}
        if self.instances:
            out["instances"] = self._instances(probs.float().cpu().numpy())
        if self.probabilities:
            out["probabilities"] = probs[:k].cpu().numpy().astype(np.float16)
            if probs.shape[0] > k:
                out["regression"] = probs[k:].cpu().numpy().astype(np.float16)
        return out

    def _instances(self, array: np.ndarray) -> np.ndarray:
        k = self.num_classes
        if self.representation is not None:
            regression = array[k:] if array.shape[0] > k else None
            return self.representation.postprocess(array[:k], regression, min_size=self.min_size, **self.thresholds)
        # a model from before instance representations: its border class, as it was trained
        return cell_instances(array, cell_class=self.cell_class, border_class=self.border_class,
                              min_size=self.min_size)

    def predict_array(self, array: np.ndarray) -> dict[str, Any]:
        """Predict an image given as an array, ``C *S`` in medseg's reader axis order (``*S`` alone for a
        one-channel model); it is taken to be on the model's grid (no resampling).

        Raises:
            DataError: wrong number of axes or channels, not real numbers, or NaN/Inf values.
        """
        image = np.asarray(array)
        dims, channels = int(self.meta["spatial_dims"]), int(self.meta["in_channels"])
        if image.ndim == dims and channels == 1:
            image = image[None]
        expected = f"C *S = {channels} x {dims} spatial axes"
        expected += " (or the spatial axes alone)" if channels == 1 else ""
        if image.ndim != dims + 1 or image.shape[0] != channels:
            raise DataError("input array", f"expected {expected}, got shape {list(image.shape)}")
        if image.dtype.kind not in "biuf":
            raise DataError("input array", f"expected real numbers, got dtype {image.dtype}")
        image = image.astype(np.float32, copy=False)
        if not np.isfinite(image).all():
            raise DataError("input array", "contains NaN or infinite values")
        data = self.array_transform({"image": torch.from_numpy(np.ascontiguousarray(image))})
        return self.compute(data, invert=False)

    def _invert(self, data: dict, probs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        from monai.data import MetaTensor

        pred = MetaTensor(probs.cpu(), meta=dict(data["image"].meta),
                          applied_operations=list(data["image"].applied_operations))
        inverted = self.transform.inverse({"image": pred})["image"]
        return inverted.as_tensor(), dict(inverted.meta)
