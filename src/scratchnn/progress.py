"""A dependency-free progress bar for training loops.

It draws on a terminal only (``stream.isatty()``); elsewhere (logs, CI, pipes)
it stays quiet, so that logs hold one line per epoch rather than hundreds of
carriage returns.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO


class ProgressBar:
    """``[#####-----] 512/600 loss 0.4312 12.3s`` redrawn in place.

    >>> import io
    >>> bar = ProgressBar(total=4, prefix="epoch 1/2", stream=io.StringIO())
    >>> bar.update(2, loss=0.5)
    >>> bar.enabled
    False
    """

    def __init__(
        self, total: int, *, prefix: str = "", width: int = 30, stream: TextIO | None = None
    ) -> None:
        self.total = max(int(total), 1)
        self.prefix = prefix
        self.width = width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.count = 0
        self.started = time.perf_counter()
        self._last_draw = 0.0

    def update(self, n: int = 1, *, loss: float | Callable[[], float] | None = None) -> None:
        """Advance by ``n`` steps and redraw (at most 20 times a second).

        ``loss`` may be a function that gives it, called only when the bar draws
        (reading a loss from a GPU waits for the card).
        """
        self.count = min(self.count + n, self.total)
        now = time.perf_counter()
        if self.enabled and (now - self._last_draw > 0.05 or self.count == self.total):
            self._last_draw = now
            self._draw(loss, now)

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _columns(self) -> int:
        """The width of the terminal the bar draws on: its own stream's, which is not
        stdout's when stdout goes to a file (``train > log``)."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):  # no file descriptor, or not a terminal
            return shutil.get_terminal_size().columns

    def _draw(self, loss: float | Callable[[], float] | None, now: float) -> None:
        if callable(loss):
            loss = loss()
        elapsed = now - self.started
        eta = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        # .4g: a diverging loss (1e30) stays a few characters wide.
        tail = f" {self.count}/{self.total}" + (f" loss {loss:.4g}" if loss is not None else "")
        tail += f" {elapsed:.1f}s<{eta:.1f}s"
        # One line shorter than the terminal: a line that wraps cannot be redrawn with \r,
        # and each redraw would leave a row behind. The bar shrinks first, then the text.
        columns = self._columns() - 1
        width = min(self.width, columns - len(self.prefix) - len(tail) - 3)
        if width >= 5:
            filled = int(width * self.count / self.total)
            text = f"{self.prefix} [{'#' * filled}{'-' * (width - filled)}]{tail}"
        else:
            text = f"{self.prefix}{tail}"[: max(columns, 1)]
        self.stream.write(f"\r{text}\033[K")
        self.stream.flush()
