"""A one-line progress bar on stderr: points done, the point running and how far it is."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class Progress:
    def __init__(self, total: int, point_s: float, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.point_s = point_s  # expected wall seconds per point, for the estimate
        self.stream = stream if stream is not None else sys.stderr
        self.done_points = 0
        self.label = ""
        self.fraction = 0.0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._live = self.stream.isatty()

    def start(self, label: str) -> None:
        self.label = label
        self.fraction = 0.0
        self._draw(force=True)

    def advance(self, fraction: float) -> None:
        self.fraction = min(max(fraction, 0.0), 1.0)
        self._draw()

    def done(self, summary: str) -> None:
        self.done_points += 1
        self.fraction = 0.0
        if self._live:
            self._draw(force=True)
        else:
            # Not a terminal (CI logs): one line per point instead of carriage returns.
            self.stream.write(f"[{self.done_points}/{self.total}] {self.label}: {summary}\n")
            self.stream.flush()

    def close(self) -> None:
        if self._live:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._live or (not force and now - self._drawn < 0.2):
            return
        self._drawn = now
        progress = (self.done_points + self.fraction) / self.total
        filled = int(progress * WIDTH)
        left = (self.total - self.done_points - self.fraction) * self.point_s
        bar = "#" * filled + "-" * (WIDTH - filled)
        self.stream.write(f"\r[{bar}] {self.done_points}/{self.total} {self.label:<28} "
                          f"~{left / 60:4.1f} min left ")
        self.stream.flush()
