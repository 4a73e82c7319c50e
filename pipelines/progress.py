"""Progress reporting: a tqdm bar on a terminal, a few plain lines when the output is a file or a pipe."""

from __future__ import annotations

import sys
import time

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
