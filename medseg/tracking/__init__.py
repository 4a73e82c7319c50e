"""Experiment tracking: the only package of medseg that imports mlflow (lazily, in :mod:`.mlflow_adapter`).

A :class:`Tracker` records one training, prediction or evaluation run: parameters (the flattened resolved
config), tags (versions, git commit, dataset fingerprint, device), per-epoch metrics, artifact files and the
model, logged as a pyfunc that runs medseg's whole inference (:mod:`.pyfunc`) with the metadata prediction needs.
:func:`load_model` gives back ``(model, metadata)``.

Where runs go (:mod:`.store`): the ``uri`` argument, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow.db`` (MLflow's own default). For a SQLite store the artifacts of a new experiment are
kept in ``mlruns/`` next to the database file, so one folder holds everything and
``mlflow ui --backend-store-uri sqlite:///mlflow.db`` run there shows it all.

Failure policy, chosen so that tracking never costs a training:

- :meth:`Tracker.start` fails within seconds, with a :class:`TrackingError` naming the URI, when an HTTP
  tracking server does not answer (a raw ``GET <uri>/health`` with a short timeout comes first, then MLflow's
  own calls with retries turned down).
- After a successful start, no tracking call raises for a store problem. A failed call is appended to
  ``<fallback_dir>/tracking_fallback.jsonl`` (:mod:`.journal`: one JSON object per call, with its arguments)
  and logged as a warning. When the server has gone away, the tracker warns once and goes offline: later calls
  only append to the file, and every ``retry_every_s`` seconds one short probe checks whether the server is
  back.

:func:`environment_tags` (:mod:`.environment`) describes the software a run used.

Example:
    >>> with Tracker(None, experiment="cells", run_name="unet-fold0", fallback_dir=run_dir) as tracker:
    ...     tracker.log_params(resolved_config)
    ...     tracker.set_tags(environment_tags() | {"dataset.fingerprint": fingerprint, "device": "cuda:0"})
    ...     for epoch in range(epochs):
    ...         tracker.log_metrics({"train/loss": loss, "val/dice_mean": dice}, step=epoch)
    ...     model_uri = tracker.log_model(model, metadata={"classes": 2, "patch_size": [256, 256]})
    >>> model, metadata = load_model(model_uri)
"""

from medseg.tracking.environment import environment_tags
from medseg.tracking.journal import FALLBACK_FILE, FallbackJournal
from medseg.tracking.mlflow_adapter import Tracker, flatten
from medseg.tracking.models import load_model
from medseg.tracking.store import DEFAULT_DB, TrackingError, resolve_tracking_uri

__all__ = [
    "DEFAULT_DB",
    "FALLBACK_FILE",
    "FallbackJournal",
    "Tracker",
    "TrackingError",
    "environment_tags",
    "flatten",
    "load_model",
    "resolve_tracking_uri",
]
