"""A training run on disk: its configuration, presets, output files, checkpoints and resume.

The output directory of a run holds:

* ``checkpoint.safetensors``: weights, optimiser state, generator state, epoch,
  configuration and history, rewritten atomically after every epoch (a run
  killed at any moment leaves the last complete one);
* ``model.safetensors``: the final weights and configuration;
* ``history.json`` (one list per metric) and ``history.csv``;
* ``learning_curve.png``: loss and accuracy per epoch, train against test.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from scratchnn import _fused
from scratchnn.backend import check_device, import_cupy, to_device
from scratchnn.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)
from scratchnn.files import temporary_name, write_text_atomically
from scratchnn.models import ACTIVATIONS, Sequential, cnn, mlp
from scratchnn.optim import make_optimizer
from scratchnn.train import History, evaluate, fit

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

DATASETS = ("fashion-mnist", "mnist")
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")
DTYPES = ("float32", "float64")
CHECKPOINT_FILE = "checkpoint.safetensors"
MODEL_FILE = "model.safetensors"
#: Every file a run writes into its directory, the learning curve last.
RUN_FILES = (MODEL_FILE, CHECKPOINT_FILE, "history.json", "history.csv", "learning_curve.png")


# Settings added after the first saved runs (the cnn model; the learning-rate decay): a
# file without them was an MLP without decay, the values their defaults give.
LATER_SETTINGS = frozenset({"model", "channels", "dropout", "lr_decay"})


@dataclass
class RunConfig:
    """Everything that defines a training run; saved in its checkpoints as JSON."""

    dataset: str = "fashion-mnist"
    # "mlp": Affine layers of sizes ``hidden``; "cnn": models.cnn with ``channels``,
    # one hidden Affine layer of ``hidden[0]`` units and ``dropout`` before each Affine layer.
    model: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    channels: list[int] = field(default_factory=lambda: [16, 32])
    dropout: float = 0.0
    activation: str = "relu"
    init: str = "he"
    optimizer: str = "adam"
    lr: float = 0.001
    lr_decay: float = 1.0
    weight_decay: float = 0.0
    epochs: int = 15
    iterations: int | None = None
    batch_size: int = 128
    dtype: str = "float32"
    seed: int = 0
    limit: int | None = None

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        # Types first (a config may come from a file): 2.5 epochs or "0.1" as a rate
        # would otherwise fail later, far from their cause.
        for name in ("epochs", "batch_size", "seed", "iterations", "limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("hidden", "channels"):
            sizes = getattr(self, name)
            if not isinstance(sizes, list) or any(
                isinstance(n, bool) or not isinstance(n, int) for n in sizes
            ):
                raise ValueError(f"{name} must be a list of integers, got {sizes!r}")
        for name in ("lr", "lr_decay", "weight_decay", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            try:
                float(value)
            except OverflowError:  # an integer of 400 digits, in a hand-edited file
                raise ValueError(f"{name} is a number beyond the float range") from None
        for name in ("dataset", "model", "activation", "init", "optimizer", "dtype"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        if not self.hidden or any(int(n) < 1 for n in self.hidden):
            raise ValueError(f"hidden layer sizes must be positive integers, got {self.hidden}")
        if self.model == "cnn" and len(self.hidden) != 1:
            raise ValueError(f"a cnn has one hidden Affine layer; got hidden sizes {self.hidden}")
        if not self.channels or any(int(n) < 1 for n in self.channels):
            raise ValueError(f"channels must be positive integers, got {self.channels}")
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        # Settings a model would ignore are errors, not silently recorded in the run.
        if self.model == "mlp" and self.dropout != 0:
            raise ValueError(
                f"dropout applies to the cnn model only, got {self.dropout} for an mlp"
            )
        if self.model == "cnn" and self.activation != "relu":
            raise ValueError(
                f"activation {self.activation!r} does not apply to the cnn model (its blocks use ReLU)"
            )
        if self.model == "cnn" and self.init != "he":
            raise ValueError(
                f"init {self.init!r} does not apply to the cnn model (its layers use He init)"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"the learning rate must be positive, got {self.lr}")
        if not (math.isfinite(self.lr_decay) and 0 < self.lr_decay <= 1):
            raise ValueError(f"the learning-rate decay must lie in (0, 1], got {self.lr_decay}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight decay must be zero or positive, got {self.weight_decay}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"the seed must be an integer from 0 to 2**63 - 1, got {self.seed}")
        mlp_init_check(self.init)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, complete: bool = False) -> RunConfig:
        """The configuration ``data`` describes; settings it leaves out take their
        defaults, unless ``complete`` (a file's configuration, which names every one:
        a setting missing there would change the network or the run without a word)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run settings {unknown}")
        # Files of earlier versions lack the settings added since; those take the values
        # the earlier versions used, which are the defaults. Any other missing setting is
        # an error (a tanh network without "activation" would be rebuilt as a ReLU one). A
        # file that names its model is of a version that wrote them all (lr_decay came
        # first, then model, channels and dropout together): it must hold them all.
        exempt = LATER_SETTINGS if "model" not in data else frozenset()
        missing = sorted(known - set(data) - exempt) if complete else []
        if missing:
            raise ValueError(f"run settings missing: {missing}")
        config = cls(**data)
        config.check()
        return config


def mlp_init_check(init: str) -> None:
    """Raise ``ValueError`` unless ``init`` names an initialiser or is a positive std."""
    from scratchnn.init import make_initializer

    try:
        std = float(init)
    except ValueError:
        make_initializer(init)
        return
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"a fixed weight_init_std must be positive, got {init}")


PRESETS: dict[str, dict[str, Any]] = {
    # 784-256-128-10, ReLU, He init, Adam with the rate decayed by 0.85 each
    # epoch, 15 epochs: about 89.5% in about a minute on 2 cores.
    "default": {"lr_decay": 0.85},
    # The book's chapter-5 network (train_neuralnet.py): 784-50-10, ReLU,
    # weight_init_std 0.01, SGD lr 0.1, batch 100, 10,000 iterations.
    "book": {
        "hidden": [50],
        "activation": "relu",
        "init": "0.01",
        "optimizer": "sgd",
        "lr": 0.1,
        "batch_size": 100,
        "iterations": 10_000,
        "epochs": 17,
    },
    # The convolutional network of models.cnn: two blocks of 3x3 Conv2d, 2x2 max
    # pooling, BatchNorm and ReLU (32 and 64 channels), dropout 0.3, Affine
    # 3136-256, ReLU, dropout 0.3, Affine 256-10; Adam, rate decayed by 0.75 per epoch.
    "cnn": {
        "model": "cnn",
        "hidden": [256],
        "channels": [32, 64],
        "dropout": 0.3,
        "optimizer": "adam",
        "lr": 0.001,
        "lr_decay": 0.75,
        "batch_size": 128,
        "epochs": 8,
    },
    # A larger MLP: 784-256-256-10 with Adam.
    "large": {
        "hidden": [256, 256],
        "optimizer": "adam",
        "lr": 0.001,
        "lr_decay": 0.85,
        "batch_size": 128,
        "epochs": 20,
    },
}


def preset_config(name: str, **overrides: Any) -> RunConfig:
    """The configuration of a preset, with ``overrides`` (None values ignored) applied.

    Raises ``ValueError`` naming an unknown preset, an unknown setting or the
    first bad value, here rather than when the run starts.
    """
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    settings = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return RunConfig.from_dict(copy.deepcopy(settings))  # lists the caller's, not the preset's


def check_writable_directory(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and prove it writable, else raise ``ValueError``."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"the output directory {directory} is a file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(
            f"cannot write to output directory {directory}: {error.strerror or error}"
        ) from None
    return directory


def build_network(
    config: RunConfig, rng: np.random.Generator, n_in: int = 784, n_out: int = 10
) -> Sequential:
    """The network a configuration describes, initialised from ``rng``.

    ``n_in`` is the MLP's input size; a CNN takes (N, 1, 28, 28) images.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"build_network takes a RunConfig, got {type(config).__name__}")
    config.check()
    if config.model == "cnn":
        return cnn(
            rng=rng,
            channels=config.channels,
            hidden=config.hidden[0],
            dropout=config.dropout,
            n_classes=n_out,
            dtype=np.dtype(config.dtype),
        )
    init: str | float = config.init
    try:
        init = float(config.init)
    except ValueError:
        pass
    return mlp(
        [n_in, *config.hidden, n_out],
        activation=config.activation,
        init=init,
        rng=rng,
        dtype=np.dtype(config.dtype),
    )


def load_data(
    config: RunConfig, data_path: str | None = None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The run's data set, normalised, in the run's dtype; ``limit`` cuts the training set.

    Images are flattened to (N, 784) for an MLP and kept as (N, 1, 28, 28) for a CNN.
    """
    from scratchnn.data import load_fashion_mnist, load_mnist

    loader = load_fashion_mnist if config.dataset == "fashion-mnist" else load_mnist
    (x_train, t_train), (x_test, t_test) = loader(
        data_path,
        normalize=True,
        flatten=config.model != "cnn",
        one_hot_label=False,
        dtype=np.dtype(config.dtype),  # normalised in the run's dtype, not float32 cast up
    )
    if config.limit is not None and config.limit > len(x_train):
        raise ValueError(
            f"limit {config.limit} is more than the {len(x_train)} training examples there are"
        )
    if config.limit is not None:
        # Copies, so that the rest of the 60,000 images is not kept alive by a view.
        x_train, t_train = x_train[: config.limit].copy(), t_train[: config.limit].copy()
    return (x_train, t_train), (x_test, t_test)


class RunBusyError(RuntimeError):
    """Another process is training into the same output directory."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train_run``; ``epochs_saved`` says how many epochs this call had
    checkpointed (0: ``out_dir`` holds what it held before, nothing of this call)."""

    def __init__(self, epochs_saved: int) -> None:
        super().__init__()
        self.epochs_saved = epochs_saved


def train_run(
    config: RunConfig | None,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    epochs: int | None = None,
    data_path: str | None = None,
    stream: TextIO | None = None,
    progress_stream: TextIO | None = None,
    device: str = "cpu",
) -> History:
    """Train as ``config`` says, writing checkpoints and results into ``out_dir``.

    ``device="cuda"`` trains on the GPU through CuPy: the network, the optimiser
    state and the data move there once, before the first epoch; checkpoints
    are written from host copies, so a run can resume on either device.

    With ``resume=True`` the run continues from ``out_dir/checkpoint.safetensors``
    with the configuration saved there (``config`` must be None; ``epochs`` may
    raise the number of epochs), and ends with the same weights, bit for bit,
    as a run that was never stopped. A new run does not replace one that
    ``out_dir`` already holds (any of its files: ``FileExistsError``) unless
    ``overwrite=True``, and even then the run it replaces stays whole until the
    new run's first checkpoint is written: a new run that fails or is
    interrupted before that leaves ``out_dir`` as it was (and a directory
    created for it is removed again). Every setting, the data and the output
    directory are checked before any work starts. One run at a time writes into
    a directory: a second gets ``RunBusyError`` (where the system has ``fcntl``
    file locks, as Linux and macOS do). Ctrl-C raises :class:`RunInterrupted`.
    """
    stream = stream if stream is not None else sys.stdout
    if (config is None) != resume:
        raise ValueError(
            "give a configuration for a new run, or resume=True to continue one, not both"
        )
    if check_device(device) == "cuda":
        import_cupy()  # before any work: a missing CuPy or GPU is one clear error
    out = Path(out_dir)
    # The folders this call creates (out and any missing parents), innermost first.
    created = [folder for folder in [out, *out.absolute().parents] if not folder.exists()]
    check_writable_directory(out)
    saved: list[int] = []  # the epochs this call has checkpointed
    lock: _RunLock | None = None
    try:
        lock = _RunLock(out)  # (in the try: a lock that fails leaves no folder of ours)
        if lock.unlocked:
            print(f"note: {out} cannot be locked here ({lock.unlocked}); make sure no other "
                  "run writes to it meanwhile", file=stream)  # fmt: skip
        if resume and not (out / CHECKPOINT_FILE).exists():
            raise FileNotFoundError(f"nothing to resume: {out / CHECKPOINT_FILE} does not exist")
        held = [name for name in RUN_FILES if (out / name).exists()]
        if not resume and not overwrite and held:
            raise FileExistsError(f"{out} already holds a training run ({', '.join(held)})")
        return _train(config, out, resume, epochs, data_path, stream, progress_stream, device,
                      saved)  # fmt: skip
    except KeyboardInterrupt as interrupt:
        raise RunInterrupted(len(saved)) from interrupt
    finally:
        if lock is not None:
            lock.release()
        if not saved:  # nothing of this call was kept: no folder of its either
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if still empty


def _train(
    config: RunConfig | None, out: Path, resume: bool, epochs: int | None,
    data_path: str | None, stream: TextIO, progress_stream: TextIO | None, device: str,
    saved: list[int],
) -> History:  # fmt: skip
    """train_run's work, in its locked directory; appends each epoch it saves to ``saved``."""
    config, network, optimizer, rng, history, train_data, test_data, fingerprint = _start(
        config, out, resume, epochs, data_path
    )
    if resume:
        print(f"resuming {out} after epoch {len(history or [])} of {config.epochs}", file=stream)
    if device == "cpu" and not _fused.available():
        # A pip install without a C compiler succeeds without a word: say it where it shows.
        print(
            f"note: compiled kernels {_fused.status()}: the layers run their NumPy passes, "
            "several times slower",
            file=stream,
        )
    network.to(device)
    optimizer.to(device)
    # The data set moves to the device once; each batch is then a slice on the device.
    train_data = (to_device(train_data[0], device), to_device(train_data[1], device))
    test_data = (to_device(test_data[0], device), to_device(test_data[1], device))

    def save_epoch(epoch: int, run_history: History) -> None:
        target = out / CHECKPOINT_FILE
        before = _file_identity(target)
        # This call's first checkpoint replaces the run's: the model and curve of what came
        # before step aside (hidden names) while it is written, so that no moment shows an
        # older model beside a newer checkpoint for evaluate to score, and come back if it
        # is not written (a full disk, Ctrl-C): the run it would have replaced stays whole.
        aside = [] if saved else _set_aside(out / name for name in (MODEL_FILE, RUN_FILES[-1]))
        try:
            save_checkpoint(  # whole under a temporary name, then renamed: atomic
                target,
                params=network.state(),
                optimizer_state=optimizer.state_dict(),
                rng=rng,
                epoch=epoch,
                config=config.to_dict(),
                metadata={"history": run_history.to_json(), DATA_KEY: fingerprint},
            )
        finally:
            # Saved once the new checkpoint has its name, even if what follows the rename
            # (the directory's fsync) fails or is interrupted; not before.
            written = _file_identity(target) != before
            if written:
                saved.append(epoch)
            for original, hidden in aside:
                with contextlib.suppress(OSError):
                    if written:
                        hidden.unlink()
                    else:
                        os.replace(hidden, original)
            if written:  # the histories follow the checkpoint, whatever stopped the save
                write_text_atomically(out / "history.json", run_history.to_json() + "\n")
                write_text_atomically(out / "history.csv", run_history.to_csv())
        i = -1
        print(
            f"epoch {epoch:>3}/{config.epochs}  train loss {run_history.train_loss[i]:.4f} "
            f"acc {100 * run_history.train_acc[i]:.2f}%  test loss {run_history.test_loss[i]:.4f} "
            f"acc {100 * run_history.test_acc[i]:.2f}%  {run_history.seconds[i]:.1f}s",
            file=stream,
            flush=True,
        )

    history = fit(
        network,
        optimizer,
        train_data,
        test_data,
        epochs=config.epochs,
        batch_size=config.batch_size,
        rng=rng,
        max_iterations=config.iterations,
        lr_decay=config.lr_decay,
        history=history,
        callbacks=[save_epoch],
        progress_stream=progress_stream,
        train_eval_seed=config.seed,
    )
    # Again: a resumed run with no epoch left to train saves none, and a run stopped after
    # its checkpoint's rename but before its histories' may have left older ones.
    write_text_atomically(out / "history.json", history.to_json() + "\n")
    write_text_atomically(out / "history.csv", history.to_csv())
    save_model(out / MODEL_FILE, network.state(), config.to_dict())
    written = list(RUN_FILES[:-1])
    try:
        from scratchnn.plots import plot_learning_curve

        sizes = "-".join(str(n) for n in [train_data[0].shape[1], *config.hidden, 10])
        if config.model == "cnn":
            sizes = f"CNN {','.join(map(str, config.channels))} channels, {config.hidden[0]} hidden"
        else:
            sizes = f"MLP {sizes}"
        plot_learning_curve(
            history,
            out / RUN_FILES[-1],
            title=f"{config.dataset} {sizes}, {config.activation}, {config.optimizer}",
            test_set=True,  # (a run diverged from its first epoch has NaN test metrics too)
        )
        written.append(RUN_FILES[-1])
    except RuntimeError as error:  # matplotlib missing: the run itself still succeeded
        print(f"note: no learning_curve.png ({error})", file=stream)
    if len(history):
        print(
            f"final test accuracy {100 * history.test_acc[-1]:.2f}% after {len(history)} epochs",
            file=stream,
        )
    print(f"wrote {', '.join(written)} in {out}", file=stream)
    return history


class _RunLock:
    """An exclusive lock on ``out/.scratchnn-run.lock`` while a run writes there, so that
    two runs cannot both find the directory free and then replace each other's files.
    The kernel drops the lock when its process ends, however it ends; the file is
    removed on release (a killed run leaves it, and the next run takes it)."""

    FILE = ".scratchnn-run.lock"

    def __init__(self, out: Path) -> None:
        self.path, self.fd = out / self.FILE, -1
        self.unlocked = ""  # why the directory could not be locked, where it could not
        if fcntl is None:  # no such locks here (Windows): one run at a time is the user's care
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunBusyError(
                    f"another scratchnn run is writing to {out} now; wait for it to end, "
                    "or choose another --out"
                ) from None
            except OSError as error:  # a file system without such locks (some network mounts)
                self.fd, self.unlocked = fd, error.strerror or str(error)
                return
            # A run that ended between our open and our lock removed the file we hold:
            # lock the one at the path, as a new run would.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = -1


def _start(
    config: RunConfig | None, out: Path, resume: bool, epochs: int | None, data_path: str | None
) -> tuple[RunConfig, Sequential, Any, np.random.Generator, History | None, Any, Any, str]:
    """A run's configuration, network, optimiser, generator, history so far, data and the
    data's fingerprint: everything that can fail before the first step."""
    history: History | None = None
    checkpoint_path = out / CHECKPOINT_FILE
    if resume:
        checkpoint = load_checkpoint(checkpoint_path)
        with _naming(checkpoint_path):
            config = RunConfig.from_dict(checkpoint.config, complete=True)
            stored_epochs = config.epochs
            history = History.from_json(checkpoint.metadata.get("history", "{}"))
            if len(history) != checkpoint.epoch:
                raise ValueError(
                    f"its history has {len(history)} epochs, its epoch count {checkpoint.epoch}"
                )
            _check_sizes_are_stored(config, checkpoint.params)
    assert config is not None
    if epochs is not None:
        config.epochs = epochs
    config.check()
    train_data, test_data = load_data(config, data_path)
    now = data_fingerprint(train_data, test_data)
    if resume:
        stored = checkpoint.metadata.get(DATA_KEY)
        # (A checkpoint written before the fingerprint was kept has none to compare.)
        if stored is not None and _parsed(stored) != _parsed(now):
            raise CheckpointError(
                f"{checkpoint_path}: the run trained on other data ({_describe_data(stored)}) "
                f"than {data_path or 'the data found'} gives now ({_describe_data(now)}): "
                "its batches would differ from the run's; resume with the data it started with"
            )
    rng = np.random.default_rng(config.seed)
    with _naming(checkpoint_path) if resume else contextlib.nullcontext():
        network = build_network(config, rng, n_in=train_data[0].shape[1])
    optimizer = make_optimizer(config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
    if resume:
        with _naming(checkpoint_path):
            network.load_state(checkpoint.params)
            optimizer.load_state_dict(checkpoint.optimizer_state)
            # Now, not at the first step of an epoch; every parameter has stepped by then.
            optimizer.check_state(network.params, complete=True)
            rng = checkpoint.rng()
        for layer in network.layers:
            if hasattr(layer, "rng"):  # dropout draws from the run's generator, restored with it
                layer.rng = rng
        assert history is not None
        if len(history) > config.epochs:
            raise ValueError(
                f"the run in {out} has trained {len(history)} epochs already, "
                f"more than the {config.epochs} asked for"
            )
        steps_per_epoch = -(-len(train_data[0]) // config.batch_size)
        taken = len(history) * steps_per_epoch  # as fit counts them
        # More epochs than planned, asked of a run its iteration cap has ended: say so, not
        # train nothing. (Resumed to its own epochs, such a run is complete, as one that ran
        # all its epochs.)
        if epochs is not None and epochs > stored_epochs and config.iterations is not None:
            if taken >= config.iterations:
                raise ValueError(
                    f"the run in {out} has taken all {config.iterations} of its iterations "
                    "(--iterations): more epochs would train nothing"
                )
    return config, network, optimizer, rng, history, train_data, test_data, now


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Turn what goes wrong with a checkpoint's contents into a ``CheckpointError`` naming it."""
    try:
        yield
    except (ValueError, TypeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {error}") from None
    except MemoryError:
        raise CheckpointError(
            f"{path}: its configuration asks for a network larger than memory"
        ) from None


def _check_sizes_are_stored(config: RunConfig, params: dict[str, np.ndarray]) -> None:
    """Every layer size the configuration names is a dimension of some stored weight, the
    file stores at least as many numbers as the network has parameters, and every weight
    in the configuration's dtype.

    Why: the network is built from the configuration before the weights are
    compared with it, and an edited size (hidden = [10**8]) would allocate first;
    a weight of no elements, shape (0, 10**8), has any size for a dimension.
    """
    stored = {size for array in params.values() for size in array.shape}
    sizes = [*config.channels, config.hidden[0]] if config.model == "cnn" else config.hidden
    missing = [size for size in sizes if size not in stored]
    if missing:
        raise ValueError(f"the configuration's sizes {missing} match no stored weight")
    needed, held = parameter_count(config), sum(array.size for array in params.values())
    if needed > held:
        raise ValueError(
            f"the configuration's network has {needed} parameters, but the file holds "
            f"{held} numbers"
        )
    # The network computes in the configuration's dtype; a weight stored in another would
    # be cast on loading without a word (int32 weights scored, float64 ones rounded), and
    # a resumed run would not go on as the one saved.
    other = sorted(name for name, array in params.items() if array.dtype != config.dtype)
    if other:
        shown = ", ".join(f"{name} ({params[name].dtype})" for name in other[:3])
        raise ValueError(f"the run computes in {config.dtype}, but the file stores {shown}")


def parameter_count(config: RunConfig, n_in: int = 784, n_out: int = 10) -> int:
    """The number of learnable parameters of :func:`build_network`'s network, worked out
    from the configuration alone (nothing allocated).

    >>> parameter_count(RunConfig(hidden=[50]))  # 784 * 50 + 50 + 50 * 10 + 10
    39760
    """
    if config.model != "cnn":
        sizes = [n_in, *config.hidden, n_out]
        return sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    count, previous, side = 0, 1, 28
    for channels in config.channels:  # Conv2d 3x3 with its bias, MaxPool2d(2), BatchNorm
        count += previous * channels * 9 + channels + 2 * channels
        previous, side = channels, side // 2
    hidden = config.hidden[0]
    return count + previous * side * side * hidden + hidden + hidden * n_out + n_out


# The checkpoint's metadata key for the data a run trains on (data_fingerprint).
DATA_KEY = "data"


def data_fingerprint(train_data: tuple[Any, Any], test_data: tuple[Any, Any]) -> str:
    """What identifies a run's data, for a resume to check, as JSON: the numbers of
    training and test examples and a CRC-32 of their images (as little-endian float32,
    whatever dtype the run computes in and whatever the machine's byte order: a changed
    dtype is the configuration's to refuse) and labels (little-endian int64), in order."""
    crc = 0
    for images, labels in (train_data, test_data):
        crc = zlib.crc32(np.ascontiguousarray(images, dtype="<f4").data, crc)
        crc = zlib.crc32(np.ascontiguousarray(labels, dtype="<i8").data, crc)
    return json.dumps({"train": len(train_data[0]), "test": len(test_data[0]),
                       "crc32": f"{crc:08x}"})  # fmt: skip


def _parsed(fingerprint: str) -> Any:
    """A fingerprint as the data it names (so that its spacing does not matter)."""
    try:
        return json.loads(fingerprint)
    except ValueError:
        return fingerprint


def _describe_data(fingerprint: str) -> str:
    """A fingerprint in words; one that cannot be read, as it is."""
    data = _parsed(fingerprint)
    try:
        return f"{data['train']} training and {data['test']} test examples, crc32 {data['crc32']}"
    except (TypeError, KeyError):
        return repr(fingerprint)


def _file_identity(path: Path) -> tuple[int, ...] | None:
    """What tells the file ``path`` names now from another (device, inode, size and
    modification time: some file systems report no inodes), or None where there is none.
    A rename onto the name changes it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _set_aside(paths: Iterator[Path]) -> list[tuple[Path, Path]]:
    """Rename each existing file of ``paths`` to a hidden temporary name beside it; return
    the (original, hidden) pairs. A hidden file left by a killed process is deleted by the
    next write to its original name (``files.temporary_name``)."""
    moved = []
    for path in paths:
        hidden = temporary_name(path)
        try:
            os.replace(path, hidden)
        except FileNotFoundError:
            continue
        moved.append((path, hidden))
    return moved


def load_network(path: str | os.PathLike[str]) -> tuple[Sequential, RunConfig]:
    """Rebuild the network saved in a model or checkpoint file, or in a run's directory
    (its final model, else its last checkpoint)."""
    if os.path.isdir(path):
        directory = Path(path)
        path = directory / MODEL_FILE
        if not path.exists():
            path = directory / CHECKPOINT_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{directory} holds no {MODEL_FILE} or {CHECKPOINT_FILE}: not a run's directory"
            )
    params, config_dict = load_model(path)
    with _naming(Path(path)):
        config = RunConfig.from_dict(config_dict, complete=True)
        first = params.get("W1")
        if config.model == "mlp" and first is not None and first.shape[0] != 784:
            # Evaluation would fail in the first layer, far from the cause.
            raise ValueError(
                f"its first layer takes {first.shape[0]} inputs, but {config.dataset}'s "
                "images have 784"
            )
        _check_sizes_are_stored(config, params)
        network = build_network(config, np.random.default_rng(0))
    try:
        network.load_state(params)
    except (ValueError, TypeError) as error:  # TypeError: a weight of a complex or bool dtype
        raise ValueError(
            f"{os.fspath(path)}: the weights do not fit the saved configuration: {error}"
        ) from None
    return network, config


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts of (true label, predicted label) pairs."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(
            f"confusion_matrix: labels {labels.shape} and predictions {predictions.shape} "
            "must be 1-d and of one length"
        )
    for what, values in (("labels", labels), ("predictions", predictions)):
        if values.dtype.kind not in "iu":
            raise ValueError(f"confusion_matrix: {what} must be integers, got {values.dtype}")
        if values.size and not (0 <= values.min() and values.max() < n_classes):
            # -1 would count in the last row, silently
            raise ValueError(
                f"confusion_matrix: {what} must lie in [0, {n_classes}), "
                f"got {values.min()} to {values.max()}"
            )
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def evaluate_file(
    path: str | os.PathLike[str], *, data_path: str | None = None, device: str = "cpu"
) -> tuple[float, np.ndarray, list[str]]:
    """Test accuracy, confusion matrix and class names of a saved model on its data set.

    ``device="cuda"`` evaluates on the GPU through CuPy: the network and the test
    images move there once; the confusion matrix is counted on the host. Weights
    that hold NaN or infinity (a run that diverged) give a ``RuntimeWarning``
    naming them: the accuracy is then that of a broken model.
    """
    from scratchnn.data import FASHION_MNIST_CLASSES

    if check_device(device) == "cuda":
        import_cupy()  # before any work: a missing CuPy or GPU is one clear error
    network, config = load_network(path)
    broken = [key for key, value in network.params.items() if not np.isfinite(value).all()]
    if broken:
        warnings.warn(
            f"{os.fspath(path)}: weights {', '.join(broken)} hold NaN or infinity "
            "(did the run diverge?); the accuracy is that of a broken model",
            RuntimeWarning,
            stacklevel=2,
        )
    _, (x_test, t_test) = load_data(config, data_path)
    network.to(device)
    x_on_device, t_on_device = to_device(x_test, device), to_device(t_test, device)
    network.eval()
    _, accuracy = evaluate(network, x_on_device, t_on_device)
    predictions = np.concatenate(
        [
            to_device(network.predict(x_on_device[i : i + 1000]).argmax(axis=1), "cpu")
            for i in range(0, len(x_test), 1000)
        ]
    )
    names = (
        list(FASHION_MNIST_CLASSES)
        if config.dataset == "fashion-mnist"
        else [str(i) for i in range(10)]
    )
    return accuracy, confusion_matrix(t_test.astype(np.int64), predictions, 10), names


def format_confusion(matrix: np.ndarray, names: list[str]) -> str:
    """The confusion matrix as a text table: rows are true classes, columns predictions."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or len(names) != matrix.shape[0]:
        raise ValueError(
            f"format_confusion: a square matrix and a name per class, got a matrix of shape "
            f"{matrix.shape} and {len(names)} names"
        )
    if not names:
        return "rows: true class, columns: predicted class"
    width = max(5, *(len(str(v)) for v in matrix.ravel()))
    label_width = max(len(n) for n in names)
    header = " " * (label_width + 2) + " ".join(f"{i:>{width}}" for i in range(len(names)))
    rows = [
        f"{name:>{label_width}} |" + " ".join(f"{v:>{width}}" for v in row) + f"   ({i})"
        for i, (name, row) in enumerate(zip(names, matrix))
    ]
    return "\n".join(["rows: true class, columns: predicted class", header, *rows])
