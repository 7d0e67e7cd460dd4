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

from scratchnn import _checks


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
        self.total = _checks.count("ProgressBar", "total", total)
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
        if n < 0:  # (a count that went back would draw "-100/10" and a bar beyond the line)
            raise ValueError(f"ProgressBar.update: n must be at least 0, got {n}")
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
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):  # no file descriptor, or not a terminal
            columns = 0
        # 0: a terminal that has not been given a size yet (a container's pty before its
        # first resize); shutil then reads $COLUMNS, else takes 80.
        return columns or shutil.get_terminal_size().columns

    def _draw(self, loss: float | Callable[[], float] | None, now: float) -> None:
        if callable(loss):
            loss = loss()
        elapsed = now - self.started
        eta = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        count = f" {self.count}/{self.total}"
        # .4g: a diverging loss (1e30) stays a few characters wide.
        shown_loss = f" loss {loss:.4g}" if loss is not None else ""
        tail = f"{count}{shown_loss} {elapsed:.1f}s<{eta:.1f}s"
        # One line shorter than the terminal: a line that wraps cannot be redrawn with \r,
        # and each redraw would leave a row behind. The bar shrinks first, then whole
        # fields go (the times, the loss, the prefix): a number cut short would misread.
        columns = max(self._columns() - 1, 1)
        width = min(self.width, columns - len(self.prefix) - len(tail) - 3)
        if width >= 5:
            filled = int(width * self.count / self.total)
            text = f"{self.prefix} [{'#' * filled}{'-' * (width - filled)}]{tail}"
        else:
            shorter = [f"{self.prefix}{tail}", f"{self.prefix}{count}{shown_loss}",
                       f"{self.prefix}{count}", count.strip(),
                       f"{100 * self.count // self.total}%"]  # fmt: skip
            text = next((t for t in shorter if len(t) <= columns), "")
        self.stream.write(f"\r{text}\033[K")
        self.stream.flush()
