"""The progress bar draws on a terminal and stays quiet elsewhere."""

from __future__ import annotations

import io
import re

import pytest

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
    assert "epoch 1/3 [########] 4/4 loss 0.25 " in text
    assert text.endswith("\r\033[K")  # the line is cleared for the epoch summary


def test_quiet_when_not_a_terminal() -> None:
    stream = io.StringIO()
    bar = ProgressBar(total=3, stream=stream)
    bar.update(3, loss=1.0)
    bar.close()
    assert stream.getvalue() == ""


def test_a_loss_given_as_a_function_is_computed_only_to_draw() -> None:
    # fit passes its running loss so: reading losses from a GPU waits for the card.
    calls: list[int] = []

    def loss() -> float:
        calls.append(1)
        return 0.125

    quiet = ProgressBar(total=3, stream=io.StringIO())
    for _ in range(3):
        quiet.update(loss=loss)
    assert calls == []
    stream = Terminal()
    bar = ProgressBar(total=3, stream=stream)
    for _ in range(3):  # the first draws, the second is within 50 ms of it, the last draws
        bar.update(loss=loss)
    assert 2 <= len(calls) <= 3
    assert stream.getvalue().count(" loss 0.125 ") == len(calls)


@pytest.mark.parametrize("columns", [10, 40, 80])
@pytest.mark.parametrize("loss", [0.4312, 6.3e29, float("nan")])
def test_every_redraw_fits_the_terminal(
    columns: int, loss: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A line as wide as the terminal wraps, and \r then redraws only its last row.
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setenv("LINES", "24")
    stream = Terminal()
    bar = ProgressBar(total=60000, prefix="epoch 10/15", stream=stream)
    for _ in range(3):
        bar.update(20000, loss=loss)
    drawn = [line for line in re.split(r"\r", stream.getvalue()) if line]
    assert len(drawn) >= 2  # the first and the last (redraws are at most 20 a second)
    for line in drawn:
        assert line.endswith("\033[K")  # whatever a longer earlier draw left is cleared
        assert 0 < len(line.removesuffix("\033[K")) <= columns - 1
    if columns == 80:
        assert f"60000/60000 loss {loss:.4g}" in drawn[-1] and "[" in drawn[-1]


def test_a_partial_bar_its_eta_and_at_most_twenty_redraws_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import scratchnn.progress as progress

    monkeypatch.setenv("COLUMNS", "120")
    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    stream = Terminal()
    bar = ProgressBar(total=8, prefix="epoch 1/1", width=8, stream=stream)
    clock[0] += 3.0  # 2 of 8 steps in 3 s: 6 steps to go at 1.5 s each
    bar.update(2, loss=0.5)
    assert stream.getvalue() == "\repoch 1/1 [##------] 2/8 loss 0.5 3.0s<9.0s\033[K"
    clock[0] += 0.01  # within 0.05 s of the last draw: no redraw
    bar.update(1, loss=0.4)
    assert stream.getvalue().count("\r") == 1
    clock[0] += 0.06
    bar.update(1, loss=0.4)
    assert stream.getvalue().endswith("\repoch 1/1 [####----] 4/8 loss 0.4 3.1s<3.1s\033[K")


def test_the_bar_fits_its_own_terminal_when_stdout_goes_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `scratchnn train > log` in a 40-column pane: stderr is the 40-column terminal, and
    # stdout's width (here a wide COLUMNS) is not the bar's.
    pty = pytest.importorskip("pty")
    import fcntl
    import os
    import struct
    import termios

    monkeypatch.setenv("COLUMNS", "200")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    with open(follower, "w", closefd=True) as terminal:
        bar = ProgressBar(total=60000, prefix="epoch 10/15", stream=terminal)
        bar.update(60000, loss=0.4312)
    drawn = os.read(leader, 4096).decode()
    os.close(leader)
    lines = [line.removesuffix("\x1b[K") for line in drawn.split("\r") if line]
    assert lines and all(0 < len(line) <= 39 for line in lines), lines


def test_a_terminal_of_no_size_yet_takes_columns_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A container's pty before its first resize reports 0 columns: the bar drew one letter.
    pty = pytest.importorskip("pty")
    import os

    monkeypatch.setenv("COLUMNS", "80")
    leader, follower = pty.openpty()  # no size set: 0 x 0
    with open(follower, "w", closefd=True) as terminal:
        assert os.get_terminal_size(terminal.fileno()).columns == 0
        ProgressBar(total=10, prefix="epoch 1/2", stream=terminal).update(10, loss=0.5)
    drawn = os.read(leader, 4096).decode()
    os.close(leader)
    assert "epoch 1/2 [" in drawn and "10/10 loss 0.5" in drawn


@pytest.mark.parametrize("columns", range(2, 41))
def test_on_a_narrow_terminal_whole_fields_go_and_no_number_is_cut(
    columns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "epoch 10/15" cut to "epoch 10/1", "30000/60000" to "30000/6": counts that read wrong.
    monkeypatch.setenv("COLUMNS", str(columns))
    stream = Terminal()
    bar = ProgressBar(total=60000, prefix="epoch 10/15", stream=stream)
    bar.update(30000, loss=0.4312)
    line = stream.getvalue().split("\r")[-1].removesuffix("\033[K")
    assert len(line) <= columns - 1
    fields = line.split()
    allowed = {"epoch", "10/15", "30000/60000", "loss", "0.4312", "50%"}
    assert all(f in allowed or re.fullmatch(r"\[#*-*\]|\d+\.\ds<\d+\.\ds", f) for f in fields), line


@pytest.mark.parametrize("total", [0, -5, 2.5, True])
def test_a_bar_needs_a_whole_number_of_steps_and_never_goes_back(total: object) -> None:
    with pytest.raises((TypeError, ValueError), match="ProgressBar: total"):
        ProgressBar(total=total)  # type: ignore[arg-type]
    bar = ProgressBar(total=10, stream=Terminal())
    with pytest.raises(ValueError, match="n must be at least 0, got -100"):
        bar.update(-100)
