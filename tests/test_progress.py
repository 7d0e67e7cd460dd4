"""The progress bar draws on a terminal and stays quiet elsewhere."""

from __future__ import annotations

import io

from scratchnn.progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_draws_counts_and_running_loss_on_a_terminal() -> None:
    stream = Terminal()
    bar = ProgressBar(total=4, prefix="epoch 1/3", width=8, stream=stream)
    for _ in range(4):
        bar.update(loss=0.25)
    bar.close()
    text = stream.getvalue()
    assert "epoch 1/3 [########] 4/4 loss 0.2500" in text
    assert text.endswith("\r\033[K")  # the line is cleared for the epoch summary


def test_quiet_when_not_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar(total=3, stream=stream)
    bar.update(3, loss=1.0)
    bar.close()
    assert stream.getvalue() == ""
