"""The offline fallback journal: tracking calls that did not reach the store, one JSON object per line."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FALLBACK_FILE = "tracking_fallback.jsonl"


class FallbackJournal:
    """Appends failed tracking calls, with their arguments, to ``<folder>/tracking_fallback.jsonl``.

    Args:
        folder: the run folder; ``None`` keeps no journal (failed calls are only warned about).
    """

    def __init__(self, folder: Path | None):
        self.path = Path(folder) / FALLBACK_FILE if folder is not None else None

    def append(self, what: str, run_id: str | None, uri: str, error: str, record: dict[str, Any]) -> None:
        """Add one failed call ``what`` (``"log_metrics"``, ...) with its ``record`` and the ``error``."""
        if self.path is None:
            return
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "call": what,
                 "run_id": run_id, "uri": uri, "error": error, **record}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(entry, default=str) + "\n")
        except OSError as err:
            log.warning("Cannot write %s (%s); the failed MLflow %s is lost", self.path, err, what)
