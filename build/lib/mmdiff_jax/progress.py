"""A progress bar on stderr for long data jobs (checking a folder, writing shards): redrawn in place on a terminal,
a line every 10% otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, stream=None):
        self.total, self.desc, self.done = max(int(total), 0), desc, 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._next_line = 0.1

    def update(self, n: int = 1) -> None:
        self.done += n
        fraction = self.done / self.total if self.total else 1.0
        if self.tty:
            self._draw("\r", "")
        elif fraction >= self._next_line or self.done == self.total:
            self._draw("", "\n")
            while self._next_line <= fraction:
                self._next_line += 0.1

    def close(self) -> None:
        if self.tty:
            self._draw("\r", "\n")

    def _draw(self, head: str, tail: str) -> None:
        seconds = time.perf_counter() - self.start
        fraction = self.done / self.total if self.total else 1.0
        bar = "#" * int(30 * fraction)
        rate = self.done / seconds if seconds > 0 else 0.0
        self.stream.write(f"{head}{self.desc}: [{bar:<30}] {self.done}/{self.total} ({100 * fraction:.0f}%, "
                          f"{seconds:.0f} s, {rate:.0f}/s){tail}")
        self.stream.flush()
