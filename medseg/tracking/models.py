"""Logged models: a trained network logged (or saved) as a medseg pyfunc (:mod:`.pyfunc`), and
:func:`load_model` to read one back, also the ``mlflow.pytorch`` models logged before the pyfunc."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from importlib import metadata as dist_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg import __version__
from medseg.predictor import load_model_file
from medseg.tracking.store import (
    HEAVY_LIMITS,
    TrackingError,
    before_mlflow_import,
    env_defaults,
    resolve_tracking_uri,
    short_error,
)

if TYPE_CHECKING:
    import torch


def load_model(uri: str, map_location: Any = "cpu", tracking_uri: str | None = None,
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a model logged by :meth:`Tracker.log_model`, in eval mode, with its metadata.

    Args:
        uri: ``runs:/<run_id>/model``, ``models:/<name>/<version>`` (or ``models:/<name>@<alias>``, or the
            ``models:/m-<id>`` URI of MLflow 3), or a local model folder such as the fallback copy.
        map_location: passed to ``torch.load``.
        tracking_uri: the store holding the run; ``None`` resolves as in :func:`resolve_tracking_uri`.

    Returns:
        ``(model, metadata)``.

    Raises:
        TrackingError: the model cannot be found or read.
    """
    before_mlflow_import()
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.models import Model

    store = resolve_tracking_uri(tracking_uri)
    try:
        with contextlib.ExitStack() as stack:
            folder = uri
            if not Path(uri).is_dir():
                stack.enter_context(fluent_scope(store))
                stack.enter_context(env_defaults(HEAVY_LIMITS))
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="medseg-model-"))
                folder = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=store)
            described = Model.load(folder)
            metadata = described.metadata or {}
            if "pytorch" in described.flavors:  # logged before the pyfunc
                model = mlflow.pytorch.load_model(folder, map_location=map_location)
            else:
                model, metadata = load_model_file(_weights_path(Path(folder), described), map_location)
    except Exception as err:  # MlflowException, OSError, unpickling errors: all mean "cannot load this"
        raise TrackingError(store, f"cannot load model {uri!r} ({short_error(err)})") from err
    return model.eval(), metadata


@contextlib.contextmanager
def fluent_scope(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI (and experiment) at ours for one fluent call, then restore.

    ``mlflow.pytorch.log_model`` and artifact downloads read the global URI; without the experiment id the
    logged model of MLflow 3 lands in experiment 0, where ``runs:/<run_id>/model`` no longer finds it.
    """
    import mlflow

    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def quiet(logger_name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Silence a logger below ``level`` for one call (mlflow.pytorch warns about pickle, which we choose
    knowingly: the safe "pt2" format needs an input example and a torch.export-able network)."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _requirements() -> list[str]:
    """Explicit requirements, so MLflow does not load the model in a subprocess to infer them."""
    requirements = [f"medseg=={__version__}"]
    for dist in ("torch", "monai"):
        with contextlib.suppress(dist_metadata.PackageNotFoundError):
            # the public version: no index serves 2.13.0+cpu or +cu130 under that name, and the serving
            # machine should get the build that suits it (see the README on torch builds)
            requirements.append(f"{dist}=={dist_metadata.version(dist).split('+')[0]}")
    return requirements


def _pyfunc_options(model: torch.nn.Module, metadata: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What ``mlflow.pyfunc`` saves: the :class:`~.pyfunc.MedsegModel`, the weights (written into ``folder``),
    the signature, a small input example, the metadata and the requirements."""
    from medseg.predictor import save_weights
    from medseg.tracking.pyfunc import WEIGHTS, WEIGHTS_FILE, MedsegModel, signature_and_example

    weights = save_weights(model, metadata, folder / WEIGHTS_FILE)
    signature, example = signature_and_example(metadata)
    return {"python_model": MedsegModel(), "artifacts": {WEIGHTS: str(weights)}, "signature": signature,
            "input_example": example, "metadata": metadata, "pip_requirements": _requirements()}


def log_pyfunc(model: torch.nn.Module, metadata: dict[str, Any], run_id: str, name: str,
               registered_model_name: str | None) -> Any:
    """Log ``model`` into run ``run_id`` as a medseg pyfunc; returns MLflow's ``ModelInfo``."""
    import mlflow.pyfunc
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="medseg-weights-") as tmp:
        return Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                         registered_model_name=registered_model_name, await_registration_for=60,
                         **_pyfunc_options(model, metadata, Path(tmp)))


def save_pyfunc(model: torch.nn.Module, metadata: dict[str, Any], folder: Path) -> Path:
    """Save ``model`` as a medseg pyfunc into the local ``folder`` (the fallback when logging fails)."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="medseg-weights-") as tmp:
        mlflow.pyfunc.save_model(str(folder), **_pyfunc_options(model, metadata, Path(tmp)))
    return folder


def _weights_path(folder: Path, described: Any) -> Path:
    from medseg.tracking.pyfunc import WEIGHTS, WEIGHTS_FILE

    artifacts = (described.flavors.get("python_function") or {}).get("artifacts") or {}
    relative = (artifacts.get(WEIGHTS) or {}).get("path") or f"artifacts/{WEIGHTS_FILE}"
    return folder / relative
