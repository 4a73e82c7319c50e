"""MLflow adapter: the only module of medseg that imports mlflow.

A :class:`Tracker` records one training, prediction or evaluation run: parameters (the flattened resolved
config), tags (versions, git commit, dataset fingerprint, device), per-epoch metrics, artifact files and the
model, logged with ``mlflow.pytorch.log_model`` together with the metadata prediction needs.
:func:`load_model` gives back ``(model, metadata)``.

Where runs go: the ``uri`` argument, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (MLflow's
own default). For a SQLite store the artifacts of a new experiment are kept in ``mlruns/`` next to the
database file, so one folder holds everything and ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` run
there shows it all.

Failure policy, chosen so that tracking never costs a training:

- :meth:`Tracker.start` fails within seconds, with a :class:`TrackingError` naming the URI, when an HTTP
  tracking server does not answer (a raw ``GET <uri>/health`` with a short timeout comes first, then MLflow's
  own calls with retries turned down).
- After a successful start, no tracking call raises for a store problem. A failed call is appended to
  ``<fallback_dir>/tracking_fallback.jsonl`` (one JSON object per call, with its arguments) and logged as a
  warning. When the server has gone away, the tracker warns once and goes offline: later calls only append to
  the file, and every ``retry_every_s`` seconds one short probe checks whether the server is back.

mlflow is imported lazily (importing it costs seconds), so ``--no-tracking`` runs never load it.

Example:
    >>> with Tracker(None, experiment="cells", run_name="unet-fold0", fallback_dir=run_dir) as tracker:
    ...     tracker.log_params(resolved_config)
    ...     tracker.set_tags(environment_tags() | {"dataset.fingerprint": fingerprint, "device": "cuda:0"})
    ...     for epoch in range(epochs):
    ...         tracker.log_metrics({"train.loss": loss, "val.dice": dice}, step=epoch)
    ...     model_uri = tracker.log_model(model, metadata={"classes": 2, "patch_size": [256, 256]})
    >>> model, metadata = load_model(model_uri)
"""

from __future__ import annotations

import contextlib
import getpass
import inspect
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from importlib import metadata as dist_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg import __version__
from medseg.errors import MedsegError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
FALLBACK_FILE = "tracking_fallback.jsonl"
_STATUSES = ("FINISHED", "FAILED", "KILLED")
_PROBE_TIMEOUT_S = 3.0
# MLflow's HTTP client retries 7 times with exponential backoff and waits 120 s per request by default, so a
# dead server would stall every call for minutes. These apply to our calls only, and only where the user has
# not set the variable. Heavy calls (artifacts, models) get a longer timeout: it bounds each socket wait.
_START_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
_CALL_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_HEAVY_LIMITS = {**_CALL_LIMITS, "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


class TrackingError(MedsegError, RuntimeError):
    """The tracking store cannot be used: unreachable server, unknown run id, deleted experiment.

    Args:
        uri: the tracking URI at fault.
        message: what went wrong and what to do about it.
    """

    def __init__(self, uri: str, message: str):
        self.uri = uri
        self.message = message
        super().__init__(f"MLflow tracking URI {uri}: {message}")


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


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


def environment_tags() -> dict[str, str]:
    """Tags describing the software a run used: versions, user and, inside a git work tree, the commit.

    The commit goes to MLflow's own ``mlflow.source.git.commit`` key, which the UI shows with the run;
    ``medseg.git.dirty`` says whether the work tree had uncommitted changes.
    """
    import torch

    tags = {"medseg.version": __version__, "python.version": platform.python_version()}
    for dist in ("monai", "mlflow"):
        with contextlib.suppress(dist_metadata.PackageNotFoundError):
            tags[f"{dist}.version"] = dist_metadata.version(dist)
    # The build, with its local version (2.13.0+cu130, 2.13.0+cpu), which a CUDA wheel's metadata omits.
    tags["torch.version"] = torch.__version__
    with contextlib.suppress(OSError, KeyError):  # no login name in some containers
        tags["mlflow.user"] = getpass.getuser()
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["medseg.git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    return tags


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
    """

    def __init__(self, uri: str | None, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 fallback_dir: Path | None = None, enabled: bool = True, retry_every_s: float = 30.0):
        self.uri = resolve_tracking_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.run_id = run_id
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else None
        self.enabled = enabled
        self.retry_every_s = retry_every_s
        self._client: Any = None
        self._experiment_id: str | None = None
        self._offline_until: float | None = None  # monotonic time of the next probe while offline
        self._ended = False

    @property
    def fallback_file(self) -> Path | None:
        return self.fallback_dir / FALLBACK_FILE if self.fallback_dir is not None else None

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
        _probe(self.uri)
        _before_mlflow_import()
        import mlflow

        with _env_defaults(_START_LIMITS):
            try:
                _ensure_sqlite_folder(self.uri)
                client = mlflow.MlflowClient(tracking_uri=self.uri)
                run = self._resume(client) if self.run_id else self._create(client)
            except TrackingError:
                raise
            except Exception as err:  # the store's own error types vary (REST, SQLAlchemy, file)
                raise TrackingError(self.uri, f"cannot start a run ({_short(err)})") from err
        self._client, self.run_id, self._experiment_id = client, run.info.run_id, run.info.experiment_id
        if _is_http(self.uri):
            where = f"{self.uri.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self.run_id}"
        else:
            where = f"{self.uri} (browse: mlflow ui --backend-store-uri {self.uri})"
        log.info("MLflow run %s: %s", self.run_id, where)
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
                  registered_model_name: str | None = None, name: str = "model") -> str | None:
        """Log ``model`` (pickled, so its class must be importable: ``medseg.nets``) with its ``metadata``.

        Args:
            model: the network, best on CPU (a CUDA model loads only where CUDA is).
            metadata: what prediction needs (classes, label names, normalisation, patch size, spacing). It is
                stored as JSON-compatible data in the ``metadata`` field of the model's ``MLmodel`` file, so
                mapping keys come back as strings; :func:`load_model` returns it.
            registered_model_name: also register the model under this name (a new version each time).
            name: model name inside the run; ``runs:/<run_id>/<name>`` loads it.

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
        import mlflow.pytorch

        options = _model_options(meta)
        signature = inspect.signature(mlflow.pytorch.log_model).parameters
        options["name" if "name" in signature else "artifact_path"] = name  # mlflow 3 renamed artifact_path

        def call() -> str:
            with _fluent_scope(self.uri, self._experiment_id), _quiet("mlflow.pytorch"):
                info = mlflow.pytorch.log_model(model, run_id=self.run_id, registered_model_name=registered_model_name,
                                                await_registration_for=60, **options)
            if registered_model_name:
                return f"models:/{registered_model_name}/{info.registered_model_version}"
            return f"runs:/{self.run_id}/{name}"

        record = {"name": name, "metadata": meta, "registered_model_name": registered_model_name}
        uri = self._call("log_model", record, call, heavy=True)
        if uri is not None or self.fallback_dir is None:
            return uri
        local = self.fallback_dir / f"mlflow-{name}"
        shutil.rmtree(local, ignore_errors=True)
        with _quiet("mlflow.pytorch"):
            mlflow.pytorch.save_model(model, str(local), **_model_options(meta))
        log.warning("Saved the model that could not be logged to %s; load_model(%r) reads it", local, str(local))
        return str(local)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ended with ``status`` (``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``)."""
        if status not in _STATUSES:
            raise ValueError(f"status: expected one of {', '.join(_STATUSES)}, got {status!r}")
        if not self._active() or self._ended:
            return
        self._ended = True
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
                    self.experiment, artifact_location=_artifact_location(self.uri, self.experiment))
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
            raise TrackingError(self.uri, f"run {self.run_id!r} to resume is not in this store ({_short(err)})") \
                from err
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")
        return run

    def _call(self, what: str, record: dict[str, Any], call: Callable[[], Any], heavy: bool = False) -> Any:
        """Run one MLflow call; on failure record it, warn, maybe go offline, and return ``None``."""
        if self._offline_until is not None:
            now = time.monotonic()
            if now < self._offline_until or not _reachable(self.uri):
                if now >= self._offline_until:  # probed just now, still down: wait a full period again
                    self._offline_until = now + self.retry_every_s
                self._record(what, record, "tracking server unreachable (offline)")
                return None
            self._offline_until = None
            log.warning("MLflow server %s is back; run %s is tracked again (calls made meanwhile are in %s)",
                        self.uri, self.run_id, self.fallback_file)
        try:
            with _env_defaults(_HEAVY_LIMITS if heavy else _CALL_LIMITS):
                return call()
        except Exception as err:  # tracking must never end a training; every failure is kept and reported
            self._record(what, record, _short(err))
            if _reachable(self.uri):
                log.warning("MLflow %s failed for run %s (%s); recorded in %s", what, self.run_id, _short(err),
                            self.fallback_file)
            else:
                self._offline_until = time.monotonic() + self.retry_every_s
                log.warning("MLflow server %s is unreachable (%s). Training goes on; tracking calls are "
                            "recorded in %s and the server is retried every %g s", self.uri, _short(err),
                            self.fallback_file, self.retry_every_s)
            return None

    def _record(self, what: str, record: dict[str, Any], error: str) -> None:
        if self.fallback_file is None:
            return
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "call": what,
                 "run_id": self.run_id, "uri": self.uri, "error": error, **record}
        try:
            self.fallback_file.parent.mkdir(parents=True, exist_ok=True)
            with self.fallback_file.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(entry, default=str) + "\n")
        except OSError as err:
            log.warning("Cannot write %s (%s); the failed MLflow %s is lost", self.fallback_file, err, what)


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
    _before_mlflow_import()
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.models import Model

    store = resolve_tracking_uri(tracking_uri)
    try:
        with contextlib.ExitStack() as stack:
            folder = uri
            if not Path(uri).is_dir():
                stack.enter_context(_fluent_scope(store))
                stack.enter_context(_env_defaults(_HEAVY_LIMITS))
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="medseg-model-"))
                folder = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=store)
            model = mlflow.pytorch.load_model(folder, map_location=map_location)
            metadata = Model.load(folder).metadata or {}
    except Exception as err:  # MlflowException, OSError, unpickling errors: all mean "cannot load this"
        raise TrackingError(store, f"cannot load model {uri!r} ({_short(err)})") from err
    return model.eval(), metadata


# -- helpers -------------------------------------------------------------------------------------------------

def _before_mlflow_import() -> None:
    """Turn MLflow's usage telemetry off unless the user chose: its background thread edits ``os.environ``
    while ``requests`` iterates it, failing tracking calls at random (KeyError) on machines without internet
    access, which clinical clusters often are. ``MLFLOW_DISABLE_TELEMETRY=false`` opts back in."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _probe(uri: str) -> None:
    """Raise TrackingError unless an HTTP tracking server answers within a few seconds (others: no-op)."""
    if not _is_http(uri):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered: a proxy or an auth layer may refuse /health, the server is still there
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(uri, f"no MLflow server answers ({reason}; waited at most {_PROBE_TIMEOUT_S:g} s). "
                                 "Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`), fix the URI, "
                                 "or disable tracking") from err


def _reachable(uri: str) -> bool:
    try:
        _probe(uri)
    except TrackingError:
        return False
    return True


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).absolute()


def _ensure_sqlite_folder(uri: str) -> None:
    path = _sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Keep a SQLite store's artifacts beside the database (MLflow would use ``./mlruns`` of the cwd)."""
    path = _sqlite_path(uri)
    if path is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("_") or "experiment"
    return (path.parent / "mlruns" / slug).as_uri()


@contextlib.contextmanager
def _env_defaults(limits: Mapping[str, str]) -> Iterator[None]:
    """Set MLflow's environment variables for one call, leaving any the user set alone."""
    added = [key for key in limits if key not in os.environ]
    os.environ.update({key: limits[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _fluent_scope(uri: str, experiment_id: str | None = None) -> Iterator[None]:
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
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a logger's warnings for one call (mlflow.pytorch warns about pickle, which we choose knowingly:
    the safe "pt2" format needs an input example and a torch.export-able network)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _model_options(metadata: dict[str, Any]) -> dict[str, Any]:
    """Arguments of mlflow.pytorch.log_model/save_model: explicit requirements, so MLflow neither loads the
    model in a subprocess nor asks the network to infer them, and pickle serialisation."""
    import mlflow.pytorch

    requirements = [f"medseg=={__version__}"]
    for dist in ("torch", "monai"):
        with contextlib.suppress(dist_metadata.PackageNotFoundError):
            # the public version: no index serves 2.13.0+cpu or +cu130 under that name, and the serving
            # machine should get the build that suits it (see the README on torch builds)
            version = dist_metadata.version(dist).split("+")[0]
            requirements.append(f"{dist}=={version}")
    options: dict[str, Any] = {"metadata": metadata, "pip_requirements": requirements}
    if "serialization_format" in inspect.signature(mlflow.pytorch.save_model).parameters:
        options["serialization_format"] = "pickle"  # mlflow 3 defaults to "pt2", which needs an input example
    return options


def _limit(name: str, default: int) -> int:
    from mlflow.utils import validation

    return int(getattr(validation, name, default))


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
