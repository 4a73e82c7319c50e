"""MLflow adapter: :class:`Tracker` records a run, :func:`load_model` reads a logged model back.

The failure policy (a start fails fast, later failures go to the fallback journal and never end a training) is
described in :mod:`medseg.tracking`. mlflow is imported lazily, so ``--no-tracking`` runs never load it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.tracking.journal import FallbackJournal
from medseg.tracking.models import fluent_scope, log_pyfunc, quiet, save_pyfunc
from medseg.tracking.store import (
    CALL_LIMITS,
    HEAVY_LIMITS,
    START_LIMITS,
    TrackingError,
    artifact_location,
    before_mlflow_import,
    bound_sqlite_waits,
    ensure_sqlite_folder,
    env_defaults,
    is_http,
    is_locked,
    probe,
    reachable,
    resolve_tracking_uri,
    short_error,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# what the pyfunc needs to rebuild the network and run inference (see medseg.predictor)
MODEL_METADATA_KEYS = ("model", "spatial_dims", "in_channels", "classes", "patch_size", "normalize")
_STATUSES = ("FINISHED", "FAILED", "KILLED")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into ``{"train.lr": "0.001"}``, the flat string form MLflow params take.

    Lists and tuples become JSON (``"[32, 64]"``), an empty mapping ``"{}"``, anything else ``str(value)``.
    """
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        elif isinstance(value, (list, tuple, Mapping)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat



class Tracker:
    """Records one run in MLflow; with ``enabled=False`` every method does nothing (``--no-tracking``).

    Args:
        uri: tracking URI (``http://host:5000``, ``sqlite:///path/mlflow.db``, ...); ``None`` resolves as in
            :func:`resolve_tracking_uri`.
        experiment: experiment name, created when missing. Ignored when resuming: the run keeps its own.
        run_name: display name of a new run; ``None`` lets MLflow pick one.
        run_id: resume this run (a resumed training continues the same MLflow run).
        fallback_dir: the run folder that receives ``tracking_fallback.jsonl`` (and the model, if logging it
            fails); ``None`` means failed calls are only warned about.
        enabled: ``False`` turns the tracker into a no-op that never imports mlflow.
        retry_every_s: while the server is unreachable, how often one call may probe whether it is back.
        system_metrics: record CPU, memory, disk, network (and GPU, when there is one) as ``system/*``
            metrics every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (default 10) while the run lasts.
        annotate: only add to the run ``run_id`` (``medseg evaluate --run-id``): its status and its start and
            end times are left as they are.
    """

    def __init__(self, uri: str | None, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 fallback_dir: Path | None = None, enabled: bool = True, retry_every_s: float = 30.0,
                 system_metrics: bool = False, annotate: bool = False):
        if annotate and run_id is None:
            raise ValueError("annotate=True needs the run_id of the run to add to")
        self.uri = resolve_tracking_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else None
        self._journal = FallbackJournal(self.fallback_dir)
        self.enabled = enabled
        self.retry_every_s = retry_every_s
        self._client: Any = None
        self._experiment_id: str | None = None
        self._offline_until: float | None = None  # monotonic time of the next probe while offline
        self._warned_locked = False
        self._ended = False
        self.system_metrics, self.annotate = system_metrics, annotate
        self._monitor: Any = None

    @property
    def fallback_file(self) -> Path | None:
        return self._journal.path

    def __enter__(self) -> Tracker:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def start(self) -> str | None:
        """Connect, create or find the experiment, start or resume the run; return its id.

        Raises:
            TrackingError: within seconds when the store cannot be reached or ``run_id`` does not exist.
        """
        if not self.enabled:
            return None
        if self._client is not None:
            return self.run_id
        probe(self.uri)
        before_mlflow_import()
        import mlflow

        with env_defaults(START_LIMITS):
            resuming = self.run_id is not None
            try:
                bound_sqlite_waits()
                ensure_sqlite_folder(self.uri)
                client = mlflow.MlflowClient(tracking_uri=self.uri)
                run = self._resume(client) if self.run_id else self._create(client)
            except TrackingError:
                raise
            except Exception as err:  # the store's own error types vary (REST, SQLAlchemy, file)
                raise TrackingError(self.uri, f"cannot start a run ({short_error(err)})") from err
        self._client, self.run_id, self._experiment_id = client, run.info.run_id, run.info.experiment_id
        if is_http(self.uri):
            where = f"{self.uri.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self.run_id}"
        else:
            where = f"{self.uri} (browse: mlflow ui --backend-store-uri {self.uri})"
        log.info("MLflow run %s: %s", self.run_id, where)
        if self.system_metrics and not self.annotate:
            self._monitor = start_system_metrics(self.uri, self.run_id, resume=resuming)
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) mapping as params, flattened with ``"."``; long values are cut to MLflow's limit.

        MLflow never changes a logged param: keys the run already has with the same value are skipped (a
        resumed run logs its config again), keys with a different value are kept as they were, with a warning.
        """
        if not self._active():
            return
        from mlflow.entities import Param

        limit = _limit("MAX_PARAM_VAL_LENGTH", 6000)
        flat = {key: value[:limit] for key, value in flatten(params).items()}

        def call() -> None:
            existing = self._client.get_run(self.run_id).data.params
            changed = sorted(key for key, value in flat.items() if existing.get(key, value) != value)
            if changed:
                log.warning("MLflow run %s keeps its first value of params %s; the new values are not logged",
                            self.run_id, ", ".join(changed))
            new = [Param(key, value) for key, value in flat.items() if key not in existing]
            for chunk in _chunks(new, _limit("MAX_PARAMS_TAGS_PER_BATCH", 100)):
                self._client.log_batch(self.run_id, params=chunk)

        self._call("log_params", {"params": flat}, call)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values turned into strings; an existing tag is overwritten)."""
        if not self._active():
            return
        from mlflow.entities import RunTag

        limit = _limit("MAX_TAG_VAL_LENGTH", 8000)
        values = {str(key): str(value)[:limit] for key, value in tags.items()}

        def call() -> None:
            for chunk in _chunks([RunTag(k, v) for k, v in values.items()], _limit("MAX_PARAMS_TAGS_PER_BATCH", 100)):
                self._client.log_batch(self.run_id, tags=chunk)

        self._call("set_tags", {"tags": values}, call)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics at ``step`` (the epoch). ``None`` values are skipped, NaN is kept.

        Raises:
            TypeError: a value is not a number (names the key).
        """
        if not self._active():
            return
        from mlflow.entities import Metric

        values = {}
        for key, value in metrics.items():
            if value is None:
                continue
            try:
                values[str(key)] = float(value)
            except (TypeError, ValueError) as err:
                raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}") from err
        timestamp = int(time.time() * 1000)
        batch = [Metric(key, value, timestamp, int(step)) for key, value in values.items()]

        def call() -> None:
            for chunk in _chunks(batch, _limit("MAX_METRICS_PER_BATCH", 1000)):
                self._client.log_batch(self.run_id, metrics=chunk)

        self._call("log_metrics", {"metrics": values, "step": int(step)}, call)

    def log_dataset(self, name: str, source: Path, digest: str, context: str = "training",
                    profile: Mapping[str, Any] | None = None) -> None:
        """Record the dataset a run used (MLflow's *Datasets used*): its absolute ``source`` folder, a content
        ``digest`` and a small ``profile`` (e.g. case counts); ``context`` is MLflow's ``mlflow.data.context``."""
        if not self._active():
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source_uri = Path(source).resolve().as_uri()
        record = {"name": name, "source": source_uri, "digest": digest, "context": context,
                  "profile": dict(profile or {})}

        def call() -> None:
            dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source_uri}),
                              profile=json.dumps(dict(profile or {})))
            self._client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

        self._call("log_dataset", record, call)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under ``artifact_path`` (``None``: the run's root)."""
        if not self._active():
            return
        path = Path(path)

        def call() -> None:
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such file or folder to log as an artifact")
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

        self._call("log_artifact", {"path": str(path.resolve()), "artifact_path": artifact_path}, call, heavy=True)

    def log_model(self, model: torch.nn.Module, metadata: Mapping[str, Any],
                  registered_model_name: str | None = None, name: str = "model", *,
                  metrics: Mapping[str, float] | None = None, step: int = 0,
                  version_tags: Mapping[str, Any] | None = None, description: str | None = None) -> str | None:
        """Log ``model`` as an MLflow pyfunc that runs medseg's whole inference (:mod:`.pyfunc`).

        Args:
            model: the network (its weights are stored, with ``metadata``, as ``artifacts/weights.pt``).
            metadata: what prediction needs (classes, normalisation, patch size, spacing, instances...). It is
                also the ``metadata`` field of the model's ``MLmodel`` file; :func:`load_model` returns it.
            registered_model_name: also register the model under this name (a new version each time).
            name: model name inside the run; ``runs:/<run_id>/<name>`` loads it.
            metrics: the model's own figures (e.g. ``best/dice_mean``): logged to the run at ``step`` and
                linked to the logged model, so the model's page lists them.
            version_tags: tags of the registered version (e.g. its Dice, the dataset digest, the git commit).
            description: of the registered version.

        Returns:
            ``models:/<registered name>/<version>`` when registered, else ``runs:/<run_id>/<name>``. When
            logging fails, the model is saved to ``<fallback_dir>/mlflow-<name>`` instead and that folder is
            returned (``None`` without a fallback folder, or when tracking is disabled).

        Raises:
            TypeError: ``metadata`` is not JSON-serialisable.
        """
        if not self._active():
            return None
        meta = json.loads(json.dumps(dict(metadata)))  # fail here, at the boundary, not half-way through a log
        missing = [key for key in MODEL_METADATA_KEYS if key not in meta]
        if missing:
            raise ValueError(f"metadata: missing {', '.join(missing)} (the metadata of a medseg model: "
                             "pipelines.common.model_metadata)")
        values = {str(k): float(v) for k, v in (metrics or {}).items() if v is not None}

        def call() -> str:
            from mlflow.entities import Metric

            with fluent_scope(self.uri, self._experiment_id), quiet("mlflow"):
                info = log_pyfunc(model, meta, self.run_id, name, registered_model_name)
            stamp = int(time.time() * 1000)
            model_id = getattr(info, "model_id", None)
            batch = [Metric(k, v, stamp, int(step), model_id=model_id) for k, v in values.items()]
            for chunk in _chunks(batch, _limit("MAX_METRICS_PER_BATCH", 1000)):
                self._client.log_batch(self.run_id, metrics=chunk)
            if not registered_model_name:
                return f"runs:/{self.run_id}/{name}"
            version = str(info.registered_model_version)
            if description:
                self._client.update_model_version(registered_model_name, version, description=description)
            for key, value in (version_tags or {}).items():
                self._client.set_model_version_tag(registered_model_name, version, str(key), str(value))
            return f"models:/{registered_model_name}/{version}"

        record = {"name": name, "metadata": meta, "registered_model_name": registered_model_name,
                  "metrics": values, "version_tags": dict(version_tags or {}), "description": description}
        uri = self._call("log_model", record, call, heavy=True)
        if uri is not None or self.fallback_dir is None:
            return uri
        local = self.fallback_dir / f"mlflow-{name}"
        shutil.rmtree(local, ignore_errors=True)
        with quiet("mlflow"):
            save_pyfunc(model, meta, local)
        log.warning("Saved the model that could not be logged to %s; load_model(%r) reads it", local, str(local))
        return str(local)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ended with ``status`` (``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``)."""
        if status not in _STATUSES:
            raise ValueError(f"status: expected one of {', '.join(_STATUSES)}, got {status!r}")
        if not self._active() or self._ended:
            return
        self._ended = True
        if self._monitor is not None:
            # its last flush may fail with the store (e.g. a locked sqlite file): never fatal, and not the
            # database layer's traceback: what was lost is system metrics only
            with contextlib.suppress(Exception), quiet("mlflow.store.db.utils", 100), quiet("mlflow.system_metrics"):
                self._monitor.finish()
            self._monitor = None
        if self.annotate:  # evaluate --run-id: the training's status and times stay as they were
            return
        self._call("end", {"status": status}, lambda: self._client.set_terminated(self.run_id, status))

    # -- internals ---------------------------------------------------------------------------------------

    def _active(self) -> bool:
        if not self.enabled:
            return False
        if self._client is None:
            raise RuntimeError("Tracker.start() must be called before logging")
        return True

    def _create(self, client: Any) -> Any:
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    self.experiment, artifact_location=artifact_location(self.uri, self.experiment))
            except Exception:  # created meanwhile by a parallel run: use that one
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        elif experiment.lifecycle_stage != "active":
            raise TrackingError(self.uri, f"experiment {self.experiment!r} is deleted; restore it "
                                          f"(`mlflow experiments restore`) or choose another name")
        else:
            experiment_id = experiment.experiment_id
        return client.create_run(experiment_id, run_name=self.run_name)

    def _resume(self, client: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(self.run_id)
        except MlflowException as err:
            raise TrackingError(self.uri, f"run {self.run_id!r} to resume is not in this store ({short_error(err)})") \
                from err
        if run.info.status != "RUNNING" and not self.annotate:
            client.update_run(self.run_id, status="RUNNING")
        return run

    def _call(self, what: str, record: dict[str, Any], call: Callable[[], Any], heavy: bool = False) -> Any:
        """Run one MLflow call; on failure record it, warn, maybe go offline, and return ``None``."""
        if self._offline_until is not None:
            now = time.monotonic()
            if now < self._offline_until or not reachable(self.uri):
                if now >= self._offline_until:  # probed just now, still down: wait a full period again
                    self._offline_until = now + self.retry_every_s
                self._record(what, record, "tracking server unreachable (offline)")
                return None
            self._offline_until = None
            log.warning("MLflow server %s is back; run %s is tracked again (calls made meanwhile are in %s)",
                        self.uri, self.run_id, self.fallback_file)
        try:
            # mlflow.store.db.utils logs each database error with its traceback; we report it in one line below
            with env_defaults(HEAVY_LIMITS if heavy else CALL_LIMITS), quiet("mlflow.store.db.utils", 100):
                return call()
        except Exception as err:  # tracking must never end a training; every failure is kept and reported
            self._record(what, record, short_error(err))
            if is_locked(err):  # another process holds the sqlite file: journal, retry later, warn once
                self._offline_until = time.monotonic() + self.retry_every_s
                if not self._warned_locked:
                    self._warned_locked = True
                    log.warning("MLflow store %s is locked by another process (%s). Training goes on; tracking "
                                "calls are recorded in %s and the store is retried every %g s", self.uri,
                                short_error(err), self.fallback_file, self.retry_every_s)
            elif reachable(self.uri):
                log.warning("MLflow %s failed for run %s (%s); recorded in %s", what, self.run_id, short_error(err),
                            self.fallback_file)
            else:
                self._offline_until = time.monotonic() + self.retry_every_s
                log.warning("MLflow server %s is unreachable (%s). Training goes on; tracking calls are "
                            "recorded in %s and the server is retried every %g s", self.uri, short_error(err),
                            self.fallback_file, self.retry_every_s)
            return None

    def _record(self, what: str, record: dict[str, Any], error: str) -> None:
        self._journal.append(what, self.run_id, self.uri, error, record)

# -- helpers -------------------------------------------------------------------------------------------------

def start_system_metrics(uri: str, run_id: str, resume: bool) -> Any:
    """MLflow's own system-metrics monitor for a run of ours (``mlflow.start_run(log_system_metrics=True)``
    serves fluent runs only); ``None``, with a warning, when it cannot start. GPU metrics need ``nvidia-ml-py``."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=uri)
        with quiet("mlflow.system_metrics"):
            monitor.start()
    except Exception as err:  # psutil missing, an old MLflow: the training goes on without them
        log.warning("MLflow system metrics are off for run %s (%s)", run_id, short_error(err))
        return None
    return monitor


def _limit(name: str, default: int) -> int:
    from mlflow.utils import validation

    return int(getattr(validation, name, default))


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
