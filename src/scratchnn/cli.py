"""The command line, thin: it parses arguments and calls the library.

Each subcommand has one ``_add_<name>_parser(subparsers)`` function that
declares its options and sets ``run``, the function that carries it out and
returns the exit status. Adding a subcommand is one such function and one
line in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn

from scratchnn import __version__
from scratchnn.demo import run_demo


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    print(run_demo(x=args.x, dout=args.dout, dtype=args.dtype))
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


def build_parser() -> argparse.ArgumentParser:
    """The ``scratchnn`` parser with every subcommand."""
    parser = _Parser(
        prog="scratchnn",
        description="scratchnn: a NumPy neural-network library in the style of "
        "Deep Learning from Scratch.",
    )
    parser.add_argument("--version", action="version", version=f"scratchnn {__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    _add_demo_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``scratchnn`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    status: int = args.run(args)
    return status
