"""Plots of training runs. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from scratchnn.files import atomic_path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError("plots need matplotlib: pip install 'scratchnn[train]'") from error
    return plt


def save_figure_atomically(figure: Any, path: str | os.PathLike[str]) -> None:
    """Save a matplotlib figure through a temporary file renamed over ``path``, then close it.

    The format is that of ``path``'s suffix (``.png``, ``.svg``, ``.pdf``, ...);
    a missing or unknown suffix raises ``ValueError`` before anything is written.
    """
    try:
        if not os.fspath(path):  # (Path("") would be the current directory, ".")
            raise ValueError("the path to write the figure to is empty")
        suffix = Path(path).suffix.lower().removeprefix(".")
        formats = figure.canvas.get_supported_filetypes()
        if suffix not in formats:
            raise ValueError(
                f"{os.fspath(path)}: cannot tell the image format from the suffix "
                f"{'.' + suffix if suffix else '(none)'}; use one of "
                + ", ".join(f".{name}" for name in sorted(formats))
            )
        with atomic_path(path) as temporary:
            # The temporary's own suffix is not the target's, so the format is named.
            figure.savefig(temporary, dpi=110, bbox_inches="tight", format=suffix)
    finally:
        _pyplot().close(figure)


# Beyond this a finite number is drawn as a diverged one (no point): matplotlib's axis
# arithmetic overflows within a few powers of ten of the float64 maximum (1.8e308).
_LARGEST_DRAWN = 1e300


def _drawable(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= _LARGEST_DRAWN


def plot_learning_curve(
    history: Any, path: str | os.PathLike[str], *, title: str = "", test_set: bool | None = None
) -> None:
    """Write a PNG with loss (left) and accuracy (right) per epoch, train against test.

    ``test_set`` says whether the run had one; by default, whether any test metric is a
    number (``fit`` without a test set records NaN for them, as a run that diverged from
    its first epoch does).
    """
    plt = _pyplot()
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history.epoch
    for axis, metric, label in ((loss_axis, "loss", "loss"), (acc_axis, "acc", "accuracy")):
        for split, style, colour in (("train", "o-", "tab:blue"), ("test", "s--", "tab:orange")):
            values = [v if _drawable(v) else math.nan for v in getattr(history, f"{split}_{metric}")]
            axis.plot(epochs, values, style, color=colour, label=f"{split} {label}")
        axis.set_xlabel("epoch")
        if 0 < len(epochs) <= 20:  # whole epochs only: no "epoch 0.96" beside one point
            axis.set_xticks(list(epochs))
        else:
            axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    had_test = (
        test_set
        if test_set is not None
        else any(not math.isnan(v) for v in [*history.test_loss, *history.test_acc])
    )
    which = "test" if had_test else "training"
    accuracies = history.test_acc if had_test else history.train_acc
    if accuracies:
        final = accuracies[-1]
        acc_axis.set_title(
            f"final {which} accuracy: none (the scores hold NaN)"
            if math.isnan(final)
            else f"final {which} accuracy {100 * final:.2f}%"
        )
    # A loss that is not finite (or too large to draw) draws no point: say where the run
    # diverged instead.
    losses = zip(history.epoch, history.train_loss, history.test_loss)
    broken = [
        (e, [a, b] if had_test else [a])
        for e, a, b in losses
        if not _drawable(a) or (had_test and not _drawable(b))
    ]
    diverged = ""
    if broken:
        epoch, values = broken[0]
        what = "not finite" if not all(map(math.isfinite, values)) else "too large to draw"
        diverged = f" ({what} from epoch {epoch}: diverged)"
    loss_axis.set_title(f"cross-entropy loss{diverged}")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure_atomically(figure, path)
