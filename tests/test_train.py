"""Training runs: learning on real data, reproducibility, checkpoints, resume, the command line."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import scratchnn as snn
from scratchnn.checkpoint import CheckpointError, load_checkpoint, load_model
from scratchnn.cli import main
from scratchnn.data import find_dataset_files
from scratchnn.optim import SGD, make_optimizer
from scratchnn.runs import RunConfig, preset_config, train_run
from scratchnn.train import History, evaluate, fit

try:
    find_dataset_files("fashion-mnist")
    HAVE_DATA = True
except FileNotFoundError:
    HAVE_DATA = False
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"
)

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")


CENTRES = 3 * np.random.default_rng(123).standard_normal((10, 20))


def blobs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ten Gaussian clusters in 20 dimensions: generated data a network can learn."""
    centres = CENTRES
    t = rng.integers(0, 10, n)
    return (centres[t] + rng.standard_normal((n, 20))).astype(np.float32), t


def small_config(**overrides: object) -> RunConfig:
    settings: dict[str, object] = {"hidden": [32], "epochs": 2, "limit": 2000, "batch_size": 100}
    settings.update(overrides)
    return preset_config("default", **settings)


def test_fit_learns_generated_data() -> None:
    rng = np.random.default_rng(0)
    train, test = blobs(2000, rng), blobs(500, rng)
    net = snn.models.mlp([20, 32, 10], rng=rng)
    history = fit(
        net, make_optimizer("adam", lr=0.01), train, test, epochs=5, batch_size=50, rng=rng
    )
    assert len(history) == 5 and history.epoch == [1, 2, 3, 4, 5]
    assert history.train_loss[-1] < 0.5 * history.train_loss[0] or history.train_loss[-1] < 0.05
    assert history.test_acc[-1] > 0.9  # chance is 0.1


def test_fit_stops_after_max_iterations() -> None:
    rng = np.random.default_rng(1)
    net = snn.models.mlp([20, 8, 10], rng=rng)
    calls: list[int] = []

    class Counting:
        def __init__(self) -> None:
            self.inner = make_optimizer("sgd", lr=0.1)

        def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
            calls.append(1)
            self.inner.update(params, grads)

    history = fit(
        net, Counting(), blobs(1000, rng), epochs=10, batch_size=100, rng=rng, max_iterations=25
    )
    assert len(calls) == 25 and len(history) == 3  # two full epochs and a partial one


def test_lr_decay_schedule_depends_on_the_epoch_alone() -> None:
    rng = np.random.default_rng(2)
    net = snn.models.mlp([20, 8, 10], rng=rng)
    seen: list[float] = []

    class Recording:
        lr = 0.5

        def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
            seen.append(self.lr)

    optimizer = Recording()
    history = fit(net, optimizer, blobs(200, rng), epochs=2, batch_size=100, rng=rng, lr_decay=0.5)
    assert seen == [0.5, 0.5, 0.25, 0.25]
    seen.clear()
    fit(net, optimizer, blobs(200, rng), epochs=3, batch_size=100, rng=rng, lr_decay=0.5, history=history)
    assert seen == [0.125, 0.125] and optimizer.lr == 0.5  # epoch 3 only; the base rate is restored
    with pytest.raises(ValueError, match="lr_decay"):
        fit(net, optimizer, blobs(200, rng), epochs=1, batch_size=100, rng=rng, lr_decay=1.5)


def test_training_metrics_use_a_fixed_subset_and_leave_the_shuffle_alone() -> None:
    train, test = blobs(600, np.random.default_rng(3)), blobs(100, np.random.default_rng(4))
    runs = {}
    for size in (200, None):
        rng = np.random.default_rng(5)
        net = snn.models.mlp([20, 8, 10], rng=rng)
        history = fit(
            net,
            make_optimizer("sgd", lr=0.1),
            train,
            test,
            epochs=2,
            batch_size=100,
            rng=rng,
            train_eval_size=size,
            train_eval_seed=7,
        )
        runs[size] = (net, rng.random(), history)
    (net_sub, draw_sub, h_sub), (net_all, draw_all, h_all) = runs[200], runs[None]
    # The subset changes only what is measured: same weights, same generator state, same test.
    np.testing.assert_array_equal(net_sub.params["W1"], net_all.params["W1"])
    assert draw_sub == draw_all and h_sub.test_acc == h_all.test_acc
    assert h_all.train_acc[-1] == evaluate(net_all, *train)[1]
    chosen = np.sort(np.random.default_rng(7).choice(600, 200, replace=False))
    assert h_sub.train_acc[-1] == evaluate(net_sub, train[0][chosen], train[1][chosen])[1]
    with pytest.raises(ValueError, match="train_eval_size"):
        fit(net_sub, make_optimizer("sgd"), train, epochs=1, batch_size=100, rng=rng, train_eval_size=0)

@needs_data
def test_a_small_network_learns_fashion_mnist(tmp_path: Path) -> None:
    history = train_run(small_config(epochs=3), tmp_path, stream=io.StringIO())
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.test_acc[-1] > 0.7  # chance is 0.1; 2,000 examples and 3 epochs


@needs_data
def test_the_same_seed_gives_the_same_run_bit_for_bit(tmp_path: Path) -> None:
    train_run(small_config(), tmp_path / "a", stream=io.StringIO())
    train_run(small_config(), tmp_path / "b", stream=io.StringIO())
    train_run(small_config(seed=1), tmp_path / "c", stream=io.StringIO())
    a, _ = load_model(tmp_path / "a" / "model.safetensors")
    b, _ = load_model(tmp_path / "b" / "model.safetensors")
    c, _ = load_model(tmp_path / "c" / "model.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["W1"], c["W1"])


@needs_data
def test_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    train_run(small_config(epochs=4), tmp_path / "straight", stream=io.StringIO())
    train_run(small_config(epochs=2), tmp_path / "split", stream=io.StringIO())
    history = train_run(None, tmp_path / "split", resume=True, epochs=4, stream=io.StringIO())
    assert history.epoch == [1, 2, 3, 4]
    straight, _ = load_model(tmp_path / "straight" / "model.safetensors")
    split, _ = load_model(tmp_path / "split" / "model.safetensors")
    assert all(np.array_equal(straight[k], split[k]) for k in straight)
    saved = json.loads((tmp_path / "split" / "history.json").read_text())
    assert (
        saved["test_acc"]
        == json.loads((tmp_path / "straight" / "history.json").read_text())["test_acc"]
    )


@needs_data
def test_kill_9_mid_run_leaves_a_loadable_checkpoint_and_resume_matches(tmp_path: Path) -> None:
    args = ["train", "--hidden", "16", "--limit", "600", "--batch-size", "100", "--epochs", "30"]
    straight = tmp_path / "straight"
    assert main([*args, "--out", str(straight)]) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "scratchnn", *args, "--out", str(killed)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:  # wait for a few epochs, then kill in the middle of one
        if line.startswith(b"epoch   5/"):
            break
    time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()
    checkpoint = load_checkpoint(killed / "checkpoint.safetensors")
    assert 5 <= checkpoint.epoch < 30
    assert main(["train", "--resume", "--out", str(killed)]) == 0
    a, _ = load_model(straight / "model.safetensors")
    b, _ = load_model(killed / "model.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)


@needs_data
def test_output_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["train", "--hidden", "16", "--limit", "500", "--epochs", "2", "--out", str(tmp_path)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "final test accuracy" in printed and str(tmp_path) in printed
    history = json.loads((tmp_path / "history.json").read_text())
    assert list(history) == ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"]
    assert history["epoch"] == [1, 2] and all(len(v) == 2 for v in history.values())
    csv_lines = (tmp_path / "history.csv").read_text().splitlines()
    assert (
        csv_lines[0] == "epoch,train_loss,train_acc,test_loss,test_acc,seconds"
        and len(csv_lines) == 3
    )
    png = (tmp_path / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 600 and height > 250
    assert History.from_dict(history).test_acc == history["test_acc"]


@needs_data
def test_evaluate_prints_accuracy_and_confusion_matrix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["train", "--hidden", "16", "--limit", "500", "--epochs", "1", "--out", str(tmp_path)])
        == 0
    )
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "model.safetensors")]) == 0
    printed = capsys.readouterr().out
    history = json.loads((tmp_path / "history.json").read_text())
    assert f"test accuracy {100 * history['test_acc'][-1]:.2f}%" in printed
    for name in ("T-shirt/top", "Trouser", "Ankle boot"):
        assert name in printed
    rows = [line for line in printed.splitlines() if "|" in line]
    assert (
        len(rows) == 10
        and sum(int(v) for row in rows for v in row.split("|")[1].split()[:10]) == 10000
    )


def run_cli(argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "epochs"),
        (["--lr", "-0.1"], "learning rate"),
        (["--lr", "nan"], "lr"),
        (["--activation", "swish"], "activation"),
        (["--optimizer", "lbfgs"], "optimizer"),
        (["--init", "zeros!"], "initializer"),
        (["--hidden", "0"], "hidden"),
        (["--batch-size", "-5"], "batch-size"),
        (["--lr-decay", "1.5"], "decay"),
        # The preset's settings were blamed ("dropout applies to the cnn model only").
        (["--preset", "cnn", "--model", "mlp"], "--model mlp does not fit --preset cnn (a cnn)"),
        (["--preset", "book", "--model", "cnn"], "--model cnn does not fit --preset book (a mlp)"),
    ],
)
def test_bad_options_fail_with_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["train", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()


def test_an_empty_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Path("") is the current directory, whose files --overwrite would delete.
    assert run_cli(["train", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err


def test_unwritable_output_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["train", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "output directory" in err and len(err.strip().splitlines()) == 1


def test_resume_of_a_corrupt_checkpoint_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert main(["train", "--resume", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.safetensors" in err and "Traceback" not in err
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "checkpoint.safetensors")


def test_resume_refuses_changed_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--resume", "--lr", "0.5", "--out", str(tmp_path)]) == 2
    assert "--lr" in capsys.readouterr().err


def test_book_preset_is_the_books_network() -> None:
    config = preset_config("book")
    assert config.hidden == [50] and config.activation == "relu" and config.init == "0.01"
    assert config.optimizer == "sgd" and config.lr == 0.1 and config.batch_size == 100
    assert config.iterations == 10_000


def test_an_interrupted_fit_keeps_the_schedule_a_function_of_the_epoch() -> None:
    # epoch k runs at lr * decay**(k - 1), as torch's ExponentialLR, even across an interruption
    rng = np.random.default_rng(2)
    data = blobs(200, rng)
    net = snn.models.mlp([20, 8, 10], rng=rng)
    optimizer = make_optimizer("sgd", lr=1.0)
    rates: list[float] = []

    def record(epoch: int, history: History) -> None:
        rates.append(optimizer.lr)
        if epoch == 2 and len(rates) == 2:
            raise KeyboardInterrupt  # Ctrl-C after the second epoch

    history = History()
    with pytest.raises(KeyboardInterrupt):
        fit(net, optimizer, data, epochs=4, batch_size=50, rng=rng, lr_decay=0.5,
            history=history, callbacks=[record])  # fmt: skip
    assert optimizer.lr == 1.0  # the base rate, not the decayed one
    fit(net, optimizer, data, epochs=4, batch_size=50, rng=rng, lr_decay=0.5,
        history=history, callbacks=[record])  # fmt: skip
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = torch.optim.lr_scheduler.ExponentialLR(sgd, gamma=0.5)
    expected = []
    for _ in range(4):
        expected.append(sgd.param_groups[0]["lr"])
        sgd.step()
        schedule.step()
    assert rates == expected == [1.0, 0.5, 0.25, 0.125]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda net, d: fit(net, SGD(0.1), (d[0][:0], d[1][:0]), epochs=1, batch_size=10,
                            rng=np.random.default_rng(0)), "training set is empty"),
        (lambda net, d: fit(net, SGD(0.1), (d[0], d[1][:-1]), epochs=1, batch_size=10,
                            rng=np.random.default_rng(0)), "has 100 inputs but 99 labels"),
        (lambda net, d: fit(net, SGD(0.1), d, (d[0], d[1][:-3]), epochs=1, batch_size=10,
                            rng=np.random.default_rng(0)), "test set has 100 inputs but 97"),
        (lambda net, d: fit(net, SGD(0.1), d, epochs=1, batch_size=10, max_iterations=0,
                            rng=np.random.default_rng(0)), "max_iterations must be >= 1"),
        (lambda net, d: evaluate(net, d[0][:0], d[1][:0]), "evaluate: the data is empty"),
        (lambda net, d: evaluate(net, d[0], d[1][:50]), "has 100 inputs but 50 labels"),
        (lambda net, d: evaluate(net, d[0], d[1], batch_size=0), "batch_size must be >= 1"),
    ],
)  # fmt: skip
def test_empty_or_mismatched_data_is_refused_before_any_step(call: Any, message: str) -> None:
    rng = np.random.default_rng(3)
    net = snn.models.mlp([20, 8, 10], rng=rng)
    before = {key: value.copy() for key, value in net.params.items()}
    with pytest.raises(ValueError, match=message):
        call(net, blobs(100, rng))
    assert all(np.array_equal(value, before[key]) for key, value in net.params.items())


def test_float_sizes_and_negative_dropout_are_refused_by_the_builders() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match=r"mlp: a layer size must be an int, got 2\.7"):
        snn.models.mlp([784, 2.7, 10], rng=rng)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="cnn: dropout must be in"):
        snn.models.cnn(rng=rng, dropout=-0.5)


def test_a_preset_is_copied_not_shared() -> None:
    config = preset_config("cnn")
    config.hidden.append(1)
    config.channels[0] = 7
    assert preset_config("cnn").hidden == [256] and preset_config("cnn").channels == [32, 64]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"hidden": [2.5]}, "hidden must be a list of integers"),
        ({"lr": "0.1"}, "lr must be a number"),
        ({"activation": 3}, "activation must be a string"),
        ({"lr": 10**400}, "lr is a number beyond the float range"),  # was an OverflowError
    ],
)
def test_run_config_names_a_setting_of_the_wrong_type(setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RunConfig(**setting).check()  # as from a hand-edited or foreign checkpoint


def test_a_preset_with_bad_overrides_is_refused_when_made_not_when_run() -> None:
    with pytest.raises(ValueError, match="lr must be a number"):
        preset_config("default", lr="0.1")
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        preset_config("book", epochs=0)
    with pytest.raises(ValueError, match=r"unknown run settings \['hiden'\]"):
        preset_config("default", hiden=[8])  # a TypeError from the dataclass before
    with pytest.raises(ValueError, match="unknown preset None"):
        preset_config(None)  # type: ignore[arg-type]


def test_build_network_names_a_config_that_is_not_one() -> None:
    from scratchnn.runs import build_network

    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="build_network takes a RunConfig, got NoneType"):
        build_network(None, rng)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown activation"):
        build_network(RunConfig(activation="swish"), rng)  # unchecked configs are checked


def test_confusion_matrix_refuses_labels_it_would_miscount() -> None:
    from scratchnn.runs import confusion_matrix

    assert confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 2).tolist() == [[1, 0], [1, 1]]
    for labels, predictions, message in [
        (np.array([-1, 1]), np.array([0, 1]), r"labels must lie in \[0, 3\)"),  # once row 2
        (np.array([0, 1]), np.array([0, 3]), "predictions must lie in"),
        (np.array([0.0, 1.0]), np.array([0, 1]), "labels must be integers"),
        (np.array([0, 1, 2]), np.array([0, 1]), "of one length"),
    ]:
        with pytest.raises(ValueError, match=message):
            confusion_matrix(labels, predictions, 3)


def test_the_bars_running_loss_is_the_mean_per_example() -> None:
    # 1001 examples in batches of 1000: the last batch holds one example and must weigh one
    # thousandth of the first, as PyTorch scripts' running_loss += loss.item() * len(x).
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((1001, 5)), rng.integers(0, 3, 1001)
    network = snn.Sequential([snn.Affine(rng.standard_normal((5, 3)), np.zeros(3))])
    losses: list[tuple[int, float]] = []
    gradient = network.gradient

    def recorded(xb: np.ndarray, tb: np.ndarray) -> Any:
        grads = gradient(xb, tb)
        losses.append((len(xb), float(network.last_loss)))
        return grads

    network.gradient = recorded  # type: ignore[method-assign]
    stream = Terminal()
    fit(network, SGD(0.1), (x, t), epochs=1, batch_size=1000, rng=rng, progress_stream=stream)
    shown = float(stream.getvalue().rsplit(" loss ", 1)[1].split()[0])
    sizes, values = np.array(losses).T
    assert sizes.tolist() == [1000, 1]
    assert shown == float(f"{np.average(values, weights=sizes):.4g}")
    assert abs(values[0] - values[1]) > 1e-3  # else both means would agree


def test_evaluate_scores_yes_no_answers_as_accuracy_does() -> None:
    # One sigmoid output: the arg-max of one column is always 0, which compared with
    # itself gave 100%. By hand: logit > 0 against target >= 0.5.
    rng = np.random.default_rng(19)
    net = snn.Sequential(
        [snn.Affine(rng.standard_normal((4, 1)), np.zeros(1))], loss=snn.SigmoidWithLoss()
    )
    x, t = rng.standard_normal((300, 4)), rng.integers(0, 2, (300, 1)).astype(np.float64)
    by_hand = float(np.mean((x @ net.params["W1"] > 0) == (t >= 0.5)))
    assert 0.1 < by_hand < 0.9
    _, accuracy = evaluate(net, x, t, batch_size=64)
    assert accuracy == pytest.approx(by_hand, abs=1e-12) == net.accuracy(x, t)


def test_a_history_takes_numpy_numbers_as_append_does() -> None:
    from scratchnn.train import HISTORY_KEYS

    data = {key: [1, 2] if key == "epoch" else [np.float32(0.5), np.int64(1)] for key in HISTORY_KEYS}
    history = History.from_dict(data)
    assert history.train_loss == [0.5, 1.0] and type(history.train_loss[0]) is float


def test_fit_calls_callbacks_given_as_a_generator_every_epoch() -> None:
    rng = np.random.default_rng(20)
    net = snn.Sequential([snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])
    x, t = rng.standard_normal((10, 3)), rng.integers(0, 2, 10)
    seen: list[int] = []
    callbacks = (c for c in [lambda epoch, history: seen.append(epoch)])
    fit(net, SGD(0.1), (x, t), epochs=3, batch_size=5, rng=rng, callbacks=callbacks)
    assert seen == [1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"train_eval_size": 2.5}, TypeError, "fit: train_eval_size must be an int"),
        ({"train_eval_size": True}, TypeError, "fit: train_eval_size must be an int"),
        ({"train_eval_size": 0}, ValueError, "fit: train_eval_size must be >= 1"),
        ({"train_eval_seed": None}, TypeError, "fit: train_eval_seed must be an int"),
        ({"train_eval_seed": -1}, ValueError, "fit: train_eval_seed must be >= 0"),
    ],
)
def test_fit_names_a_bad_evaluation_subset(kwargs: dict, error: type, message: str) -> None:
    rng = np.random.default_rng(21)
    net = snn.Sequential([snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])
    x, t = rng.standard_normal((10, 3)), rng.integers(0, 2, 10)
    with pytest.raises(error, match=message):
        fit(net, SGD(0.1), (x, t), epochs=1, batch_size=5, rng=rng, **kwargs)


def test_format_confusion_needs_a_name_per_class() -> None:
    from scratchnn.runs import format_confusion

    matrix = np.array([[3, 1], [0, 2]])
    text = format_confusion(matrix, ["cat", "dog"])
    assert text.splitlines()[2].split() == ["cat", "|", "3", "1", "(0)"]
    for names in (["cat"], ["cat", "dog", "eel"]):
        with pytest.raises(ValueError, match="a name per class"):
            format_confusion(matrix, names)


def drawn_curve(rows: list[dict[str, float]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The figure plot_learning_curve draws for a history of ``rows``, caught unsaved."""
    pytest.importorskip("matplotlib")
    from scratchnn import plots

    drawn: list[Any] = []
    monkeypatch.setattr(plots, "save_figure_atomically", lambda figure, path: drawn.append(figure))
    history = History()
    for epoch, row in enumerate(rows, start=1):
        history.append(epoch=epoch, seconds=1.0, **row)
    plots.plot_learning_curve(history, tmp_path / "curve.png")
    (figure,) = drawn
    return figure


def test_the_learning_curve_of_a_fit_without_a_test_set_names_training_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan = float("nan")
    figure = drawn_curve([{"train_loss": 0.7, "train_acc": 0.625, "test_loss": nan,
                           "test_acc": nan}], tmp_path, monkeypatch)  # fmt: skip
    _, acc_axis = figure.axes
    assert acc_axis.get_title() == "final training accuracy 62.50%"  # not "test ... nan%"
    assert list(acc_axis.get_xticks()) == [1.0]  # whole epochs, not 0.96 ... 1.04


def test_the_learning_curve_of_a_diverged_run_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A NaN last test accuracy took the branch for runs without a test set ("final
    # training accuracy nan%"), and infinite losses drew no point and no word.
    inf, nan = float("inf"), float("nan")
    figure = drawn_curve([{"train_loss": 0.7, "train_acc": 0.6, "test_loss": 0.8, "test_acc": 0.55},
                          {"train_loss": inf, "train_acc": nan, "test_loss": inf, "test_acc": nan}],
                         tmp_path, monkeypatch)  # fmt: skip
    loss_axis, acc_axis = figure.axes
    assert acc_axis.get_title() == "final test accuracy: none (the scores hold NaN)"
    assert loss_axis.get_title() == "cross-entropy loss (not finite from epoch 2: diverged)"


def test_a_model_whose_first_layer_does_not_fit_its_images_is_named(tmp_path: Path) -> None:
    from scratchnn.checkpoint import save_model
    from scratchnn.runs import load_network

    rng = np.random.default_rng(22)
    params = {"W1": rng.standard_normal((100, 8)), "b1": np.zeros(8),
              "W2": rng.standard_normal((8, 10)), "b2": np.zeros(10)}  # fmt: skip
    path = tmp_path / "model.safetensors"
    save_model(path, params, RunConfig(hidden=[8], dtype="float64").to_dict())
    with pytest.raises(ValueError, match=r"model\.safetensors: its first layer takes 100 inputs"):
        load_network(path)


@pytest.mark.parametrize(
    ("row", "error", "words"),
    [
        ({"train_loss": None}, TypeError, "needs exactly the keys"),  # None: left out
        ({"epoch": 2}, ValueError, "epoch must be 1, got 2"),
        ({"epoch": 1.0}, ValueError, "epoch must be 1, got 1.0"),
        ({"train_loss": "0.5"}, TypeError, "train_loss must be a real number"),
        ({"extra": 1.0}, TypeError, "needs exactly the keys"),
    ],
)
def test_history_append_refuses_a_row_it_would_store_wrongly(
    row: dict, error: type, words: str
) -> None:
    # epoch 2.5 was stored as 2, a missing key raised KeyError halfway through the row.
    good = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "test_loss": float("nan"),
            "test_acc": float("nan"), "seconds": 1.0}  # fmt: skip
    history = History()
    bad = {key: value for key, value in {**good, **row}.items() if value is not None}
    with pytest.raises(error, match=words):
        history.append(**bad)
    assert len(history) == 0 and history.train_loss == []  # nothing half-added
    history.append(**good)
    assert history.epoch == [1] and np.isnan(history.test_acc[0])


def test_optimizer_update_names_arguments_that_are_not_dicts() -> None:
    params = {"W": np.ones(2)}
    for args, name in [((params, None), "grads"), ((None, {"W": np.ones(2)}), "params")]:
        with pytest.raises(TypeError, match=f"SGD.update: {name} must be a dict"):
            SGD(0.1).update(*args)  # type: ignore[arg-type]



def test_evaluate_a_regression_network_has_a_loss_and_no_accuracy() -> None:
    # One output and MeanSquaredError: no classes to choose from. fit evaluates every
    # epoch, so this must not raise (it did, after an epoch of training).
    rng = np.random.default_rng(23)
    net = snn.Sequential(
        [snn.Affine(rng.standard_normal((3, 1)), np.zeros(1))], loss=snn.MeanSquaredError()
    )
    x, t = rng.standard_normal((20, 3)), rng.standard_normal((20, 1))
    loss, accuracy = evaluate(net, x, t, batch_size=8)
    assert np.isnan(accuracy)
    # torch.nn.MSELoss: the mean of the squared errors
    assert loss == pytest.approx(float(np.mean((x @ net.params["W1"] - t) ** 2)), rel=1e-12)
    history = fit(net, SGD(0.01), (x, t), epochs=2, batch_size=5, rng=rng)
    assert len(history) == 2 and np.isnan(history.train_acc[-1])


def test_fit_takes_a_seed_of_any_size_and_sys_maxsize_as_a_size() -> None:
    import sys

    rng = np.random.default_rng(24)
    net = snn.Sequential([snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])
    x, t = rng.standard_normal((10, 3)), rng.integers(0, 2, 10)
    fit(net, SGD(0.1), (x, t), epochs=1, batch_size=sys.maxsize, rng=rng,
        train_eval_size=sys.maxsize, train_eval_seed=2**127)  # fmt: skip


def test_a_layer_that_skips_the_base_init_still_runs() -> None:
    class Doubling(snn.Layer):
        def __init__(self) -> None:  # no super().__init__(): it worked before, it still does
            self._out_shape = None
            self._out_dtype = None
            self._in_dtypes = ()
            self._caller_owned = ()
            self._gpu_forward = False

        def _forward(self, x: np.ndarray) -> np.ndarray:
            return 2 * x

        def _backward(self, dout: np.ndarray) -> np.ndarray:
            return 2 * dout

    layer = Doubling()
    np.testing.assert_array_equal(layer.forward(np.ones(2)), [2.0, 2.0])
    np.testing.assert_array_equal(layer.to("cpu").backward(np.ones(2)), [2.0, 2.0])


@pytest.mark.parametrize(
    ("broken", "words"),
    [
        (lambda x, t: (x, t + 10), "fit: the test set: SoftmaxWithLoss: labels must lie in [0, 10)"),
        (lambda x, t: (x[:, :19], t), "fit: the test set: Affine: expected input of shape (batch, 20)"),
        (lambda x, t: (x, t.astype(float)), "fit: the test set: SoftmaxWithLoss: class-index labels"),
        # Only a later label out of range: every label is checked, not the first batch's.
        (lambda x, t: (x, np.concatenate([t[:-1], [10]])), "fit: the test set: labels must lie in"),
    ],
)
def test_a_test_set_the_network_cannot_take_fails_before_the_first_step(
    broken: Any, words: str
) -> None:
    rng = np.random.default_rng(80)
    train, test = blobs(300, rng), broken(*blobs(120, rng))  # beyond the checked batch of 50
    net = snn.models.mlp([20, 16, 10], rng=rng)
    before = {key: array.copy() for key, array in net.params.items()}
    with pytest.raises(ValueError) as caught:
        fit(net, SGD(0.1), train, test, epochs=1, batch_size=50, rng=rng)
    assert str(caught.value).startswith(words)
    assert all(np.array_equal(net.params[key], array) for key, array in before.items())


def test_fit_takes_lists_beyond_the_training_metrics_subset() -> None:
    rng = np.random.default_rng(81)
    x, t = blobs(300, rng)
    net = snn.models.mlp([20, 16, 10], rng=np.random.default_rng(82))
    history = fit(net, SGD(0.1), (x.tolist(), t.tolist()), epochs=2, batch_size=50,
                  rng=np.random.default_rng(83), train_eval_size=100)  # fmt: skip
    twin = snn.models.mlp([20, 16, 10], rng=np.random.default_rng(82))
    same = fit(twin, SGD(0.1), (x, t), epochs=2, batch_size=50,
               rng=np.random.default_rng(83), train_eval_size=100)  # fmt: skip
    assert history.train_loss == same.train_loss and history.train_acc == same.train_acc


def test_fit_keeps_the_layers_own_error_as_the_cause_and_takes_two_part_sets() -> None:
    class Strict:  # a user's layer with an error class of its own
        class ShapeError(ValueError):
            def __init__(self, shape: tuple[int, ...], why: str) -> None:
                super().__init__(f"bad shape {shape}: {why}")

        def forward(self, x: np.ndarray) -> np.ndarray:
            if x.shape[1] != 20:
                raise Strict.ShapeError(x.shape, "20 features expected")
            return x

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout

    rng = np.random.default_rng(84)
    train = blobs(100, rng)
    net = snn.Sequential([Strict(), snn.Affine(rng.standard_normal((20, 10)), np.zeros(10))])
    x, t = blobs(20, rng)
    with pytest.raises(ValueError, match=r"fit: the test set: bad shape \(20, 19\)") as caught:
        fit(net, SGD(0.1), train, (x[:, :19], t), epochs=1, batch_size=50, rng=rng)
    assert isinstance(caught.value.__cause__, Strict.ShapeError)
    with pytest.raises(ValueError, match=r"fit: the test set must be a pair \(inputs, labels\), got 3 parts"):
        fit(net, SGD(0.1), train, (x, t, t), epochs=1, batch_size=50, rng=rng)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"rng": None}, TypeError, "fit: rng must be a numpy.random.Generator"),
        ({"rng": 0}, TypeError, "fit: rng must be a numpy.random.Generator"),
        ({"lr_decay": True}, TypeError, "fit: lr_decay must be a number, got True"),
        ({"lr_decay": "0.9"}, TypeError, "fit: lr_decay must be a number, got '0.9'"),
        ({"callbacks": print}, TypeError, r"for one, give \[function\]"),
        ({"callbacks": [print, 1]}, TypeError, "each callback must be a function, got 1"),
        ({"progress_stream": "log.txt"}, TypeError, "progress_stream must be a text stream"),
        ({"optimizer": SGD}, TypeError, "optimizer must be an optimiser object"),
    ],
)
def test_fit_refuses_arguments_it_would_ignore_or_fail_on_late(
    kwargs: dict, error: type, message: str
) -> None:
    # Each was accepted: rng=None shuffled unseeded, a file name as the stream was ignored,
    # a callback that is not one failed after a whole epoch had trained.
    rng = np.random.default_rng(21)
    net = snn.Sequential([snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])
    x, t = rng.standard_normal((10, 3)), rng.integers(0, 2, 10)
    arguments = {"optimizer": SGD(0.1), "epochs": 1, "batch_size": 5, "rng": rng, **kwargs}
    optimizer = arguments.pop("optimizer")
    with pytest.raises(error, match=message):
        fit(net, optimizer, (x, t), **arguments)
    assert net.params["W1"].tolist() == np.random.default_rng(21).standard_normal((3, 2)).tolist()


def test_fit_counts_in_python_ints_whatever_numbers_it_is_given() -> None:
    # int8 127 epochs: epochs + 1 wrapped to -128 and no epoch ran, with only a warning.
    rng = np.random.default_rng(22)
    x, t = blobs(200, rng)
    runs = []
    for epochs, batch_size in ((3, 100), (np.int8(3), np.uint8(100))):
        net = snn.models.mlp([20, 8, 10], rng=np.random.default_rng(0))
        history = fit(net, SGD(0.1), (x, t), epochs=epochs, batch_size=batch_size,
                      rng=np.random.default_rng(1))  # fmt: skip
        runs.append((history.to_dict(), net.params["W1"].copy()))
    assert runs[0][0]["train_loss"] == runs[1][0]["train_loss"]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    net = snn.models.mlp([20, 8, 10], rng=np.random.default_rng(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow in the epoch count
        history = fit(net, SGD(0.1), (x[:20], t[:20]), epochs=np.int8(127), batch_size=20,
                      rng=np.random.default_rng(1), train_eval_size=None)  # fmt: skip
    assert len(history) == 127


def test_fit_trains_every_layer_and_evaluation_puts_their_modes_back() -> None:
    # network.train() each epoch, as PyTorch's model.train(): layers built in evaluation
    # mode (taken from a network put in eval) train too. A BatchNorm frozen by hand trains
    # again, as documented; the evaluations after each epoch leave each layer's mode as
    # they found it.
    rng = np.random.default_rng(23)
    x, t = blobs(200, rng)
    norm, dropout = snn.BatchNorm(8), snn.Dropout(0.5, rng=np.random.default_rng(1))
    layers = [snn.Affine(0.1 * rng.standard_normal((20, 8)), np.zeros(8)), norm, snn.Relu(),
              dropout, snn.Affine(0.1 * rng.standard_normal((8, 10)), np.zeros(10))]  # fmt: skip
    snn.Sequential(layers).eval()
    net = snn.Sequential(layers)
    modes: list[tuple[bool, bool]] = []
    backward = dropout.backward

    def recorded(dout: np.ndarray) -> np.ndarray:
        modes.append((norm.training, dropout.training))
        return backward(dout)

    dropout.backward = recorded  # type: ignore[method-assign]
    mean = norm.running_mean.copy()
    fit(net, SGD(0.1), (x, t), epochs=2, batch_size=50, rng=rng)
    assert modes and set(modes) == {(True, True)}
    assert not np.array_equal(norm.running_mean, mean)
    assert net.training and norm.training and dropout.training


def test_fit_refuses_a_history_longer_than_its_epochs_or_out_of_step() -> None:
    rng = np.random.default_rng(24)
    x, t = blobs(100, rng)
    net = snn.models.mlp([20, 8, 10], rng=rng)
    history = fit(net, SGD(0.1), (x, t), epochs=2, batch_size=50, rng=rng)
    with pytest.raises(ValueError, match="has 2 epochs already, more than epochs=1"):
        fit(net, SGD(0.1), (x, t), epochs=1, batch_size=50, rng=rng, history=history)
    assert fit(net, SGD(0.1), (x, t), epochs=2, batch_size=50, rng=rng, history=history) is history
    bad = History(epoch=[1, 2], train_loss=[0.5])
    with pytest.raises(ValueError, match="fit: the history passed in: history lists have different"):
        fit(net, SGD(0.1), (x, t), epochs=3, batch_size=50, rng=rng, history=bad)


def test_the_builders_and_evaluate_name_arguments_of_the_wrong_kind() -> None:
    rng = np.random.default_rng(25)
    with pytest.raises(TypeError, match="mlp: activation must be a name such as 'relu'"):
        snn.models.mlp([4, 3, 2], activation=["relu"], rng=rng)
    with pytest.raises(TypeError, match="mlp: sizes must be a list of ints, got generator"):
        snn.models.mlp((n for n in [4, 3, 2]), rng=rng)
    with pytest.raises(TypeError, match=r"cnn: hidden must be an int, got 2\.5"):
        snn.models.cnn(hidden=2.5, rng=rng)  # type: ignore[arg-type]
    net = snn.models.mlp([4, 3, 2], rng=rng)
    x, t = rng.standard_normal((300, 4)), rng.integers(0, 2, 300)
    # A uint8 batch size of 100: the batch starts, counted in uint8, wrapped past 255 and
    # gave an empty batch ("the prediction is empty").
    assert evaluate(net, x, t, batch_size=np.uint8(100)) == evaluate(net, x, t, batch_size=100)
    assert evaluate(net, list(x), list(t)) == evaluate(net, x, t)


def test_the_learning_curve_of_a_loss_near_the_float_maximum_is_drawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A finite loss of 1.7e308 overflowed matplotlib's axis arithmetic ("arange: cannot
    # compute length"), after the run had trained and saved.
    figure = drawn_curve([{"train_loss": 0.7, "train_acc": 0.6, "test_loss": 0.8, "test_acc": 0.55},
                          {"train_loss": 1.7e308, "train_acc": 0.1, "test_loss": 1.6e308,
                           "test_acc": 0.1}], tmp_path, monkeypatch)  # fmt: skip
    loss_axis, _ = figure.axes
    assert loss_axis.get_title() == "cross-entropy loss (too large to draw from epoch 2: diverged)"
    figure.canvas.draw()  # the axis arithmetic that overflowed


def test_the_learning_curve_of_a_run_diverged_from_its_first_epoch_names_its_test_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    from scratchnn import plots

    nan = float("nan")
    drawn: list[Any] = []
    monkeypatch.setattr(plots, "save_figure_atomically", lambda figure, path: drawn.append(figure))
    history = History()
    history.append(epoch=1, seconds=1.0, train_loss=nan, train_acc=nan, test_loss=nan, test_acc=nan)
    plots.plot_learning_curve(history, tmp_path / "curve.png", test_set=True)
    _, acc_axis = drawn[0].axes
    assert acc_axis.get_title() == "final test accuracy: none (the scores hold NaN)"
