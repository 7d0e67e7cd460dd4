"""Plots of training runs. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import os
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
    """Save a matplotlib figure through a temporary file renamed over ``path``."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, bbox_inches="tight")


def plot_learning_curve(history: Any, path: str | os.PathLike[str], *, title: str = "") -> None:
    """Write a PNG with loss (left) and accuracy (right) per epoch, train against test."""
    plt = _pyplot()
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history.epoch
    for axis, metric, label in ((loss_axis, "loss", "loss"), (acc_axis, "acc", "accuracy")):
        axis.plot(
            epochs,
            getattr(history, f"train_{metric}"),
            "o-",
            color="tab:blue",
            label=f"train {label}",
        )
        axis.plot(
            epochs,
            getattr(history, f"test_{metric}"),
            "s--",
            color="tab:orange",
            label=f"test {label}",
        )
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    if history.test_acc:
        final = history.test_acc[-1]
        acc_axis.set_title(f"final test accuracy {100 * final:.2f}%")
    loss_axis.set_title("cross-entropy loss")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_figure_atomically(figure, path)
    plt.close(figure)
