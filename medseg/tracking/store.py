"""Where runs go and whether the store answers: URI resolution, the HTTP health probe, SQLite layout and the
short MLflow HTTP limits. No mlflow import here (the adapter imports it lazily)."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from medseg.errors import MedsegError

DEFAULT_DB = "mlflow.db"
PROBE_TIMEOUT_S = 3.0
# MLflow's HTTP client retries 7 times with exponential backoff and waits 120 s per request by default, so a
# dead server would stall every call for minutes. These apply to our calls only, and only where the user has
# not set the variable. Heavy calls (artifacts, models) get a longer timeout: it bounds each socket wait.
START_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
CALL_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
HEAVY_LIMITS = {**CALL_LIMITS, "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
# MLflow's sqlite sessions wait 20 s for a lock another process holds ("PRAGMA busy_timeout = 20000"), so a
# locked store stalled training 20 s per call. Our connections give up after this many milliseconds instead.
SQLITE_BUSY_MS = 1000
_BUSY_PRAGMA = re.compile(r"^\s*PRAGMA\s+busy_timeout\s*=\s*\d+\s*;?\s*$", re.IGNORECASE)


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


def probe(uri: str) -> None:
    """Raise TrackingError unless an HTTP tracking server answers within a few seconds (others: no-op)."""
    if not is_http(uri):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered: a proxy or an auth layer may refuse /health, the server is still there
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(uri, f"no MLflow server answers ({reason}; waited at most {PROBE_TIMEOUT_S:g} s). "
                                 "Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`), fix the URI, "
                                 "or disable tracking") from err


def reachable(uri: str) -> bool:
    try:
        probe(uri)
    except TrackingError:
        return False
    return True


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).absolute()


def is_locked(err: BaseException) -> bool:
    """The error of a store whose sqlite file another process holds locked."""
    return "database is locked" in str(err) or "database table is locked" in str(err)


def bound_sqlite_waits() -> None:
    """Make every SQLite connection SQLAlchemy opens from now on (MLflow's store) wait at most
    ``SQLITE_BUSY_MS`` for another process's lock, also where MLflow asks for 20 s per session."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "connect", _sqlite_busy_timeout):
        event.listen(Engine, "connect", _sqlite_busy_timeout)
        event.listen(Engine, "before_cursor_execute", _bounded_busy_pragma, retval=True)


def _sqlite_busy_timeout(dbapi_connection, _record) -> None:
    import sqlite3

    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")


def _bounded_busy_pragma(conn, cursor, statement, parameters, context, executemany):
    if conn.dialect.name == "sqlite" and _BUSY_PRAGMA.match(statement):
        statement = f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}"
    return statement, parameters


def ensure_sqlite_folder(uri: str) -> None:
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Keep a SQLite store's artifacts beside the database (MLflow would use ``./mlruns`` of the cwd)."""
    path = sqlite_path(uri)
    if path is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("_") or "experiment"
    return (path.parent / "mlruns" / slug).as_uri()


@contextlib.contextmanager
def env_defaults(limits: Mapping[str, str]) -> Iterator[None]:
    """Set MLflow's environment variables for one call, leaving any the user set alone."""
    added = [key for key in limits if key not in os.environ]
    os.environ.update({key: limits[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def before_mlflow_import() -> None:
    """Turn MLflow's usage telemetry off unless the user chose: its background thread edits ``os.environ``
    while ``requests`` iterates it, failing tracking calls at random (KeyError) on machines without internet
    access, which clinical clusters often are. ``MLFLOW_DISABLE_TELEMETRY=false`` opts back in."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def short_error(err: BaseException) -> str:
    """An exception as one line of at most 300 characters, for warnings and the journal."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
