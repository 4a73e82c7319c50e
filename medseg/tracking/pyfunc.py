"""The logged model as an MLflow pyfunc: medseg's whole inference on an array, for ``mlflow models serve``.

The model folder holds the network's weights and metadata (``artifacts/weights.pt``, read with
``weights_only=True``) and a :class:`MedsegModel`, whose ``predict`` runs :class:`medseg.predictor.CasePredictor`,
the code ``medseg predict`` runs: normalisation as in training, the sliding window (+ mirror TTA), labels and,
for cell models, instances. Only the reading of files and the resampling to the training spacing are left out:
an array carries no geometry, so it is taken to be on the model's grid already.

Input: one image as medseg's readers give it, ``C *S`` (the channel axis also for one channel: the signature
says so), in MONAI's axis order (x, y[, z]). The signature declares float32; MLflow's server parses JSON
numbers with it, so a float64 JSON payload arrives cast. Params: ``tta`` and ``instances`` (booleans,
defaults from the model).
Output: ``{"labels": *S}`` and, with ``instances``, ``{"instances": *S}`` (int32 ids, 0 = background).
"""

from __future__ import annotations

import threading
from typing import Any

import mlflow.pyfunc
import numpy as np

WEIGHTS = "weights"  # artifact key of the weights file
WEIGHTS_FILE = "weights.pt"


class MedsegModel(mlflow.pyfunc.PythonModel):
    """A trained medseg network behind MLflow's pyfunc interface (see the module docstring for the contract)."""

    def load_context(self, context: Any) -> None:
        import torch

        from medseg.predictor import load_model_file

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.network, self.metadata = load_model_file(context.artifacts[WEIGHTS])
        self._engines: dict[tuple[bool, bool], Any] = {}
        self._lock = threading.Lock()  # the server may call predict from several threads

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        """``model_input``: one image ``C *S``; ``params``: ``tta``, ``instances``; returns the label maps."""
        from medseg.predictor import CasePredictor

        defaults = default_params(self.metadata)
        options = {**defaults, **(params or {})}
        key = (bool(options["tta"]), bool(options["instances"]))
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = CasePredictor(self.network, self.metadata, device=self.device, tta=key[0],
                                       instances=key[1])
                self._engines[key] = engine
            out = engine.predict_array(np.asarray(model_input))
        result = {"labels": out["labels"]}
        if "instances" in out:
            result["instances"] = out["instances"].astype(np.int32)
        return result


def default_params(metadata: dict[str, Any]) -> dict[str, bool]:
    """``tta`` from the model's ``inference.tta``; ``instances`` on for models trained on instance labels."""
    return {"tta": bool((metadata.get("inference") or {}).get("tta", False)),
            "instances": metadata.get("label_kind") == "instance"}


def signature_and_example(metadata: dict[str, Any]) -> tuple[Any, tuple[np.ndarray, dict[str, bool]]]:
    """The pyfunc's signature (float32 ``C *S`` in, labels and instances out, the two params) and a small
    input example (a ramp of at most 32 per axis: any size works, and the example is stored as JSON; not a
    constant image, whose percentile or min-max normalisation divides by zero and made MONAI print a warning
    each time a model was logged)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    dims = int(metadata["spatial_dims"])
    channels = int(metadata["in_channels"])
    spatial = (-1,) * dims
    label_dtype = np.uint8 if len(metadata["classes"]) <= 256 else np.uint16
    defaults = default_params(metadata)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (channels, *spatial))]),
        outputs=Schema([TensorSpec(np.dtype(label_dtype), spatial, "labels"),
                        TensorSpec(np.dtype(np.int32), spatial, "instances")]),
        params=ParamSchema([ParamSpec(name, "boolean", value) for name, value in defaults.items()]),
    )
    size = [min(int(p), 32) for p in metadata["patch_size"]]
    count = channels * int(np.prod(size))
    example = np.linspace(0.0, 1.0, count, dtype=np.float32).reshape(channels, *size)
    return signature, (example, defaults)
