"""Progress reporting: a tqdm bar on a terminal, a few plain lines when the output is a file or a pipe; and the
flag that SIGTERM/SIGINT raise so a loop stops cleanly after its current step."""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Any

from tqdm import tqdm


class Progress:
    """Counts steps of a known total; shows loss, it/s and ETA.

    Args:
        title: shown before the bar (e.g. ``"epoch 3/50"``).
        total: steps expected.
        enabled: False makes every call a no-op (other ranks under torchrun).
        lines: plain-text updates per pass when stderr is not a terminal.
    """

    def __init__(self, title: str, total: int, enabled: bool = True, lines: int = 4, unit: str = "it"):
        self.title, self.total, self.enabled, self.unit = title, total, enabled, unit
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=title, unit=unit, leave=False) if enabled and self.tty else None
        self.every = max(1, total // max(lines, 1))
        self.count = 0
        self.start = time.perf_counter()

    def update(self, _step: int = 0, values: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        self.count += 1
        shown = {k: f"{v:.4f}" for k, v in (values or {}).items() if k == "loss"}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif self.count % self.every == 0 or self.count == self.total:
            elapsed = time.perf_counter() - self.start
            rate = self.count / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.count) / rate if rate > 0 else 0.0
            extra = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"{self.title}: {self.count}/{self.total} {extra} {rate:.2f} {self.unit}/s eta {eta:.0f}s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current step; it then saves and exits cleanly."""

    def __init__(self, logger: str = __name__) -> None:
        self.log = logging.getLogger(logger)
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.log.warning("%s received: stopping after this step and saving a checkpoint", self.signal)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
