"""A dependency-free progress bar for training loops.

It draws on a terminal only (``stream.isatty()``); elsewhere (logs, CI, pipes)
it stays quiet, so that logs hold one line per epoch rather than hundreds of
carriage returns.
"""

from __future__ import annotations

import sys
import time
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

    def update(self, n: int = 1, *, loss: float | None = None) -> None:
        """Advance by ``n`` steps and redraw (at most 20 times a second)."""
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

    def _draw(self, loss: float | None, now: float) -> None:
        filled = int(self.width * self.count / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self.started
        eta = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        text = f"\r{self.prefix} [{bar}] {self.count}/{self.total}"
        if loss is not None:
            text += f" loss {loss:.4f}"
        text += f" {elapsed:.1f}s<{eta:.1f}s"
        self.stream.write(text)
        self.stream.flush()
