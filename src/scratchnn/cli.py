"""The command line, thin: it parses arguments and calls the library.

Each subcommand has one ``_add_<name>_parser(subparsers)`` function that
declares its options and sets ``run``, the function that carries it out and
returns the exit status. Adding a subcommand is one such function and one
line in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import warnings
from typing import Any, NoReturn

from scratchnn import __version__
from scratchnn.demo import run_demo


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, with exit status 2, and
    that reads ``--x -1e-3`` and ``--x -inf`` as numbers given to ``--x``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes only -2 and -2.5 for negative numbers: -1e-3 looked like an
        # option to it ("expected one argument"). (-inf then fails as not finite.)
        digits = r"\d(?:_?\d)*"  # as float() reads them: 1_000 is 1000
        self._negative_number_matcher = re.compile(
            rf"^-({digits}(?:\.(?:{digits})?)?|\.{digits})(?:e[-+]?{digits})?$"
            r"|^-(inf|infinity|nan)$",
            re.IGNORECASE,
        )

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    mantissa = text.strip().lower().split("e")[0]
    if value == 0 and any(digit in mantissa for digit in "123456789"):
        # 1e-400 is 0 to float(): the command would run on 0, not on what was asked.
        raise argparse.ArgumentTypeError(f"{text!r} rounds to 0 in float64")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    try:
        text = run_demo(x=args.x, dout=args.dout, dtype=args.dtype)
    except ValueError as error:  # a value finite in float64 that float32 cannot hold
        return _fail("demo", str(error))
    _write_utf8((text + "\n").encode("utf-8"))  # (its table holds "×")
    return 0


def _add_demo_parser(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the seed notebook's examples and the sigmoid's backward pass step by step",
        description=(
            "Print the seed notebook's cells (Relu, Sigmoid) run through scratchnn, then "
            "the sigmoid as four nodes (×-1, exp, +1, /) with its backward steps as a table."
        ),
    )
    demo.add_argument(
        "--x", type=_finite_float, default=1.0,
        help="the input of the step table (default 1.0; try -800 to see the chain break)",
    )  # fmt: skip
    demo.add_argument(
        "--dout", type=_finite_float, default=1.0,
        help="the upstream gradient dL/dy (default 1.0)",
    )  # fmt: skip
    demo.add_argument(
        "--dtype", choices=["float64", "float32"], default="float64",
        help="the float dtype of the step table (default float64)",
    )  # fmt: skip
    demo.set_defaults(run=_run_demo)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (the benchmarks' scripts use it too)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**63 - 1, got {value}")
    return value


def _layer_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 256,128, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes like 256,128, got {text!r}")
    return sizes


# The options that define a network and its training; on --resume they come from the checkpoint.
_RUN_OPTIONS = ("model", "hidden", "channels", "dropout", "activation", "init", "optimizer", "lr", "lr_decay",
                "weight_decay", "iterations", "batch_size", "dtype", "seed", "limit", "dataset")  # fmt: skip


def _fail(command: str, message: str) -> int:
    print(f"scratchnn {command}: error: {message}", file=sys.stderr)
    return 2


def _run_train(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in _RUN_OPTIONS if getattr(args, name) is not None}
    # --model cnn alone means the cnn preset; the other presets are MLPs.
    preset = args.preset or ("cnn" if args.model == "cnn" else "default")
    out = args.out if args.out is not None else f"runs/{preset}"
    if args.resume and args.overwrite:
        return _fail(
            "train", "--resume continues the run in --out, --overwrite replaces it: not both"
        )
    if not out:
        return _fail("train", "--out is empty: name the run's directory")
    if args.preset is not None and args.model is not None:
        preset_model = "cnn" if args.preset == "cnn" else "mlp"
        if args.model != preset_model:
            return _fail(
                "train", f"--model {args.model} does not fit --preset {args.preset} (a {preset_model})"
            )
    try:
        with warnings.catch_warnings():
            # A diverging run's overflow warnings: one line each, not Python's two-line form
            # pointing into the library's source (as evaluate prints them).
            warnings.showwarning = _note_for("train")
            return _train(args, given, preset, out)
    except MemoryError:
        return _fail(
            "train", "the run does not fit in memory (its network, batch or data): choose smaller "
            "sizes (--hidden, --channels, --batch-size) or --limit",
        )


def _note_for(command: str) -> Any:
    def show(message: Warning | str, *args: object, **kwargs: object) -> None:
        print(f"scratchnn {command}: note: {message}", file=sys.stderr)

    return show


def _train(args: argparse.Namespace, given: dict[str, Any], preset: str, out: str) -> int:
    from scratchnn.backend import DeviceUnavailableError
    from scratchnn.checkpoint import CheckpointError
    from scratchnn.runs import CHECKPOINT_FILE, RunBusyError, preset_config, train_run

    try:
        if args.resume:
            if given or args.preset is not None:
                names = ", ".join("--" + n.replace("_", "-") for n in given) or "--preset"
                return _fail(
                    "train",
                    f"{names} cannot change a resumed run: its settings come from the checkpoint",
                )
            train_run(
                None, out, resume=True, epochs=args.epochs, data_path=args.data, device=args.device
            )
        else:
            config = preset_config(preset, epochs=args.epochs, **given)
            if config.model == "mlp" and "channels" in given:
                return _fail("train", "--channels applies to the cnn model only")
            train_run(
                config, out, overwrite=args.overwrite, data_path=args.data, device=args.device
            )
    except FileExistsError as error:
        return _fail(
            "train",
            f"{error}: continue it with --resume, replace it with --overwrite, "
            "or choose another --out",
        )
    except (ValueError, FileNotFoundError, CheckpointError, DeviceUnavailableError,
            RunBusyError) as error:  # fmt: skip
        return _fail("train", str(error))
    except BrokenPipeError:  # `train | head`: main() ends quietly, as for every command
        raise
    except OSError as error:  # a full disk, a folder where a file goes: what the system said
        where = f"{error.filename}: " if error.filename else ""
        return _fail("train", f"{where}{error.strerror or error}")
    except KeyboardInterrupt as interrupt:
        # How many epochs this run saved: none means the directory holds what it held
        # before (a replaced run whole), so --resume would continue that one, not this.
        saved = getattr(interrupt, "epochs_saved", 0)
        if (saved or args.resume) and os.path.exists(os.path.join(out, CHECKPOINT_FILE)):
            # What the checkpoint does not hold: an --epochs not yet saved in it (stopped
            # before a resumed run's first epoch ended), the data folder, the device.
            again = ["--resume", "--out", out]
            for option, value in (("--epochs", args.epochs), ("--data", args.data)):
                if value is not None:
                    again += [option, str(value)]
            if args.device != "cpu":
                again += ["--device", args.device]
            hint = f"continue with: scratchnn train {shlex.join(again)}"
        else:  # stopped in its first epoch: there is nothing of it to resume
            hint = "no epoch was completed, so there is nothing to resume; run it again"
            if args.overwrite and os.path.exists(os.path.join(out, CHECKPOINT_FILE)):
                hint += f" (the run already in {out} is as it was)"
        print(f"\ninterrupted; {hint}", file=sys.stderr)
        return 130
    return 0


class _PrintVersion(argparse.Action):
    """``--version``, printed as one line (argparse's own version action rewraps it)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> NoReturn:
        from scratchnn import _fused

        print(f"scratchnn {__version__} (compiled kernels: {_fused.status()})")
        parser.exit()


def _add_train_parser(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a network (MLP or CNN) on Fashion-MNIST or MNIST (the main job)",
        # An abbreviated --resu would slip past scripts/run.sh, which looks for --resume.
        allow_abbrev=False,
        description=(
            "Train a network (an MLP, or a CNN with --model cnn) on Fashion-MNIST (or MNIST "
            "with --dataset mnist) with a progress bar, a "
            "checkpoint after every epoch, and the model, history and learning curve "
            "written to --out. Without options: the default preset, 784-256-128-10, "
            "ReLU, He init, Adam lr 0.001 decayed by 0.85 per epoch, batch 128, 15 epochs."
        ),
    )
    train.add_argument(
        "--preset",
        choices=["default", "book", "large", "cnn"],
        help="default: 784-256-128-10 Adam; book: the book's 784-50-10 SGD "
        "network, 10,000 iterations; large: 784-256-256-10 Adam; cnn: two conv blocks "
        "(32, 64 channels) with batch norm, dropout 0.3, Adam, 8 epochs",
    )
    train.add_argument(
        "--model", choices=["mlp", "cnn"],
        help="mlp or cnn (alone, --model cnn selects the cnn preset)",
    )  # fmt: skip
    train.add_argument(
        "--channels", type=_layer_sizes, help="cnn: channels of the conv blocks, e.g. 16,32"
    )
    train.add_argument(
        "--dropout", type=_finite_float, help="cnn: dropout before each Affine layer"
    )
    train.add_argument("--hidden", type=_layer_sizes, help="hidden layer sizes, e.g. 256,128")
    train.add_argument(
        "--activation",
        help="relu, sigmoid, tanh, leaky-relu, elu, gelu, gelu-tanh, "
        "softplus, silu, softmax or identity",
    )
    train.add_argument(
        "--init", help="he, xavier, glorot_normal, glorot_uniform, or a fixed std such as 0.01"
    )
    train.add_argument("--optimizer", help="sgd, momentum, nesterov, adagrad, rmsprop or adam")
    train.add_argument("--lr", type=_finite_float, help="learning rate")
    train.add_argument(
        "--lr-decay",
        type=_finite_float,
        help="multiply the learning rate by this after every epoch (default preset: 0.85)",
    )
    train.add_argument("--weight-decay", type=_finite_float, help="L2 weight decay (default 0)")
    train.add_argument("--epochs", type=positive_int, help="number of epochs")
    train.add_argument(
        "--iterations", type=positive_int, help="stop after this many optimiser steps"
    )
    train.add_argument("--batch-size", type=positive_int, help="mini-batch size")
    train.add_argument(
        "--dtype", choices=["float32", "float64"], help="float32 (default) or float64"
    )
    train.add_argument("--seed", type=_seed, help="seed of the initial weights and the shuffling")
    train.add_argument("--limit", type=positive_int, help="train on the first N examples only")
    train.add_argument(
        "--dataset", choices=["fashion-mnist", "mnist"], help="default fashion-mnist"
    )
    train.add_argument(
        "--data",
        help="directory with the IDX files (default: $SCRATCHNN_DATA, "
        "the download cache, and for Fashion-MNIST /usr/share/datasets/fashion-mnist)",
    )
    train.add_argument("--out", help="output directory (default runs/PRESET)")
    train.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu (NumPy, the default) or cuda (an NVIDIA GPU through CuPy: "
        "pip install scratchnn[gpu])",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run even where --out already holds one (replacing its files)",
    )
    train.set_defaults(run=_run_train)


def _run_evaluate(args: argparse.Namespace) -> int:
    from scratchnn.backend import DeviceUnavailableError
    from scratchnn.checkpoint import CheckpointError
    from scratchnn.runs import evaluate_file, format_confusion

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            accuracy, matrix, names = evaluate_file(
                args.checkpoint, data_path=args.data, device=args.device
            )
    except (ValueError, OSError, CheckpointError, DeviceUnavailableError) as error:
        return _fail("evaluate", str(error))
    for warning in caught:  # one line each, not Python's two-line warning format
        print(f"scratchnn evaluate: note: {warning.message}", file=sys.stderr)
    if math.isnan(accuracy):  # a broken model: no answers to count
        print("test accuracy: none, the scores hold NaN (the matrix below counts a NaN row as class 0)")
    else:
        print(f"test accuracy {100 * accuracy:.2f}% ({int(matrix.trace())} of {int(matrix.sum())})")
    print(format_confusion(matrix, names))
    return 0


def _add_evaluate_parser(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="test accuracy and confusion matrix of a saved model or checkpoint",
    )
    evaluate.add_argument(
        "checkpoint",
        help="a model.safetensors or checkpoint.safetensors file, or a run's directory "
        "(its model.safetensors, else its checkpoint)",
    )
    evaluate.add_argument("--data", help="directory with the IDX files")
    evaluate.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cpu (NumPy, the default) or cuda (an NVIDIA GPU through CuPy)",
    )
    evaluate.set_defaults(run=_run_evaluate)


def _run_data_download(args: argparse.Namespace) -> int:
    from scratchnn.data import download_dataset

    if args.dir == "":  # Path("") is the working directory, which nobody means
        return _fail("data download", "--dir is empty: name the folder to download into")
    reported: set[str] = set()

    def report(file_name: str, done: int, total: int | None) -> None:
        if total is not None and done >= total and file_name not in reported:
            reported.add(file_name)
            print(f"  {file_name}: {done:,} bytes", flush=True)

    try:
        path = download_dataset(args.name, args.dir, base_url=args.base_url, progress=report)
    except (ValueError, OSError) as error:
        return _fail("data download", str(error))
    except KeyboardInterrupt:
        # The file being fetched stays as its .part file, which the next run resumes.
        again = ["data", "download", args.name]
        for option, value in (("--dir", args.dir), ("--base-url", args.base_url)):
            if value is not None:
                again += [option, value]
        print(
            "\ninterrupted; the files so far are kept, a partial one as .part: "
            f"run scratchnn {shlex.join(again)} again to resume",
            file=sys.stderr,
        )
        return 130
    print(f"{args.name} is in {path}")
    return 0


def _add_data_parser(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    data = subparsers.add_parser("data", help="data sets: download")
    actions = data.add_subparsers(title="actions", dest="action", metavar="ACTION", required=True)
    download = actions.add_parser(
        "download",
        help="download a data set into the cache, checking each file's SHA-256",
    )
    download.add_argument("name", choices=["fashion-mnist", "mnist"])
    download.add_argument(
        "--dir",
        help="target directory (default $SCRATCHNN_DATA/NAME, else "
        "$XDG_CACHE_HOME/scratchnn/NAME, whose default is ~/.cache/scratchnn/NAME)",
    )
    download.add_argument(
        "--base-url", help="a mirror: the folder URL the file names are appended to"
    )
    download.set_defaults(run=_run_data_download)


# The options each drawing takes beyond --out and --format; any other given option is an error.
_GRAPH_OPTIONS = {
    "sigmoid": ("x", "dout", "step", "form"),
    "relu": ("x", "dout"),
    "mul": ("dout",),
    "add": ("dout",),
    "network": ("sizes", "batch", "seed"),
}


def _run_graph(args: argparse.Namespace) -> int:
    from scratchnn.graph.draw import DRAWINGS, FORMATS, render

    allowed = _GRAPH_OPTIONS[args.name]
    given = {
        name: getattr(args, name)
        for name in ("x", "dout", "step", "form", "sizes", "batch", "seed")
        if getattr(args, name) is not None
    }
    wrong = [name for name in given if name not in allowed]
    if wrong:
        options = ", ".join("--" + name for name in wrong)
        return _fail("graph", f"{options} does not apply to the {args.name} graph")
    fmt = args.format
    if args.out == "":
        return _fail("graph", "--out is empty: give the name of the file to write")
    if args.out is not None:
        suffix_format = FORMATS.get(os.path.splitext(args.out)[1].lower())
        if fmt is None and suffix_format is None:
            return _fail("graph", f"cannot tell the format of {args.out!r}: give --format")
        if fmt is not None and suffix_format is not None and fmt != suffix_format:
            return _fail("graph", f"--format {fmt} does not match the suffix of {args.out!r}")
        fmt = fmt or suffix_format
    fmt = fmt or "dot"
    if fmt == "png" and args.out is None:
        return _fail("graph", "PNG output needs --out")

    if args.step is not None and not 0 <= args.step <= 4:
        return _fail("graph", f"--step must lie in 0..4 (the seed's four steps), got {args.step}")
    try:
        drawing = DRAWINGS[args.name](**given)
    except ValueError as error:
        return _fail("graph", str(error))
    except MemoryError:
        return _fail(
            "graph", "the network does not fit in memory: choose smaller --sizes or --batch"
        )
    try:
        if args.out is not None:
            drawing.save(args.out, fmt)
            print(f"wrote {args.out}")
        elif fmt == "mermaid":
            _write_utf8(drawing.to_mermaid().encode("utf-8"))
        elif fmt == "svg":
            _write_utf8(render(drawing.to_dot(), "svg"))
        else:
            _write_utf8(drawing.to_dot().encode("utf-8"))
    except RuntimeError as error:  # no Graphviz (the DOT file is written), or dot failed
        print(f"scratchnn graph: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        return _fail("graph", str(error))
    return 0


def _write_utf8(data: bytes) -> None:
    """Write UTF-8 bytes to stdout whatever the console's encoding: the drawings hold "×"
    and "→", and DOT, Mermaid and SVG readers expect UTF-8 (an SVG says so in its header)."""
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream (a test's StringIO): text as it is
        sys.stdout.write(data.decode("utf-8"))
    else:
        buffer.write(data)
        buffer.flush()


def _add_graph_parser(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    graph = subparsers.add_parser(
        "graph",
        help="draw a computational graph with its forward values and backward gradients",
        description=(
            "Run a graph of scratchnn nodes or layers forward and backward and draw it: "
            "each node its operation, each edge its forward value (black, above) and its "
            "gradient (red, below). Writes DOT text (no program needed), Mermaid, or SVG "
            "and PNG through Graphviz's dot. Without --out the DOT text goes to stdout."
        ),
    )
    graph.add_argument(
        "name", choices=list(_GRAPH_OPTIONS),
        help="sigmoid (the seed's graph), relu (the switch), mul and add (the book's apple "
        "shopping), network (a small Sequential)",
    )  # fmt: skip
    graph.add_argument("--x", type=_finite_float, help="the input (sigmoid, relu; default 0.5, 1)")
    graph.add_argument("--dout", type=_finite_float, help="the upstream gradient dL/dy (default 1)")
    graph.add_argument(
        "--step", type=int,
        help="sigmoid: draw only the first K of the seed's four backward steps (0 to 4)",
    )  # fmt: skip
    graph.add_argument(
        "--form", choices=["detailed", "grouped"],
        help="sigmoid: the four nodes ×-1, exp, +1, / (default) or one sigmoid node",
    )  # fmt: skip
    graph.add_argument("--sizes", type=_layer_sizes, help="network: layer sizes (default 3,4,2)")
    graph.add_argument("--batch", type=positive_int, help="network: examples in x (default 1)")
    graph.add_argument(
        "--seed", type=_seed, help="network: random seed of weights and x (default 0)"
    )
    graph.add_argument(
        "--format", choices=["dot", "mermaid", "svg", "png"],
        help="output format (default: from the suffix of --out, else dot)",
    )  # fmt: skip
    graph.add_argument("--out", help="the file to write (.dot, .gv, .mmd, .svg or .png)")
    graph.set_defaults(run=_run_graph)


def _run_plot_activations(args: argparse.Namespace) -> int:
    from scratchnn.activation_plot import plot_activations

    try:
        path = plot_activations(args.out)
    except (OSError, RuntimeError, ValueError) as error:
        return _fail("plot activations", str(error))
    print(f"wrote {path}")
    return 0


def _add_plot_parser(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    plot = subparsers.add_parser("plot", help="plots: activations")
    actions = plot.add_subparsers(title="plots", dest="plot", metavar="PLOT", required=True)
    activations = actions.add_parser(
        "activations",
        help="every activation layer and its derivative (from its own backward) in one PNG",
    )
    activations.add_argument(
        "--out",
        default="activations.png",
        help="the image to write, its format from the suffix (default activations.png)",
    )
    activations.set_defaults(run=_run_plot_activations)


def build_parser() -> argparse.ArgumentParser:
    """The ``scratchnn`` parser with every subcommand."""
    parser = _Parser(
        prog="scratchnn",
        description="scratchnn: a NumPy neural-network library in the style of "
        "Deep Learning from Scratch.",
    )
    parser.add_argument(
        "--version", action=_PrintVersion, nargs=0, help="show the version and whether the "
        "compiled kernels are in use, and exit"
    )
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    _add_demo_parser(subparsers)
    _add_train_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_data_parser(subparsers)
    _add_graph_parser(subparsers)
    _add_plot_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``scratchnn`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # A path that is not valid in the terminal's encoding (bytes a UTF-8 locale cannot
    # show) is printed with escapes, as stderr does: a strict stdout would have turned a
    # finished run into an error at its last line.
    stdout = sys.stdout
    errors = getattr(stdout, "errors", None)
    if errors is not None and hasattr(stdout, "reconfigure"):
        stdout.reconfigure(errors="backslashreplace")
    try:
        status: int = args.run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`scratchnn evaluate ... | head -1`): stop quietly, as
        # cat does. Python's own flush at exit would fail again, so stdout now
        # points at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it
    finally:
        if errors is not None and hasattr(stdout, "reconfigure"):  # called in a notebook: as it was
            stdout.reconfigure(errors=errors)
    return status
