"""Forward plus backward of every activation layer: scratchnn, PyTorch and the seed's code.

    .venv/bin/python benchmarks/bench_activations.py            # every layer, every size
    .venv/bin/python benchmarks/bench_activations.py --layers Relu Sigmoid --sizes 1e5 1e6

float32 throughout. PyTorch runs the module's forward and autograd's backward
with its default threads; the seed's code (benchmarks/seed_layers.py) runs
for Relu and Sigmoid. Where scratchnn's compiled kernels are built, the
plain NumPy path (the kernels switched off) runs too, as "numpy". Each cell is a median over paired rounds; the ratios
are medians of per-round ratios (below 1: scratchnn is faster).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

# Run as a script, this folder is on sys.path: _common and seed_layers import as modules.
import seed_layers
import torch
from _common import format_seconds, machine_report, paired_rounds, positive_int, print_table

import scratchnn as snn
from scratchnn import _fused

# name -> (scratchnn factory, PyTorch module factory, seed factory or None)
LAYERS: dict[str, tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any] | None]] = {
    "Relu": (snn.Relu, torch.nn.ReLU, seed_layers.Relu),
    "Relu(packed)": (lambda: snn.Relu(packed=True), torch.nn.ReLU, None),
    "Sigmoid": (snn.Sigmoid, torch.nn.Sigmoid, seed_layers.Sigmoid),
    "Tanh": (snn.Tanh, torch.nn.Tanh, None),
    "LeakyRelu": (snn.LeakyRelu, torch.nn.LeakyReLU, None),
    "Elu": (snn.Elu, torch.nn.ELU, None),
    "Gelu": (snn.Gelu, torch.nn.GELU, None),
    "Gelu(tanh)": (lambda: snn.Gelu("tanh"), lambda: torch.nn.GELU("tanh"), None),
    "Softplus": (snn.Softplus, torch.nn.Softplus, None),
    "Silu": (snn.Silu, torch.nn.SiLU, None),
    "Softmax": (snn.Softmax, lambda: torch.nn.Softmax(dim=-1), None),
    "Identity": (snn.Identity, torch.nn.Identity, None),
}


def numpy_step(layer: Any, x: np.ndarray, dout: np.ndarray) -> Callable[[], object]:
    def step() -> object:
        layer.forward(x)
        return layer.backward(dout)

    return step


def numpy_only_step(layer: Any, x: np.ndarray, dout: np.ndarray) -> Callable[[], object]:
    """The layer with the compiled kernels switched off: its plain NumPy passes."""

    def step() -> object:
        _fused.ENABLED = False
        try:
            layer.forward(x)
            return layer.backward(dout)
        finally:
            _fused.ENABLED = True

    return step


def torch_step(module: Any, x: np.ndarray, dout: np.ndarray) -> Callable[[], object]:
    xt = torch.from_numpy(x).requires_grad_(True)
    gt = torch.from_numpy(dout)

    def step() -> object:
        xt.grad = None  # a fresh gradient, as a training step has, not an accumulation
        module(xt).backward(gt)
        return xt.grad

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e3, 1e5, 1e6, 1.6e7])
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument(
        "--torch-threads", type=positive_int, help="PyTorch's threads (default: its own choice)"
    )
    args = parser.parse_args(argv)
    if args.torch_threads:
        # On a loaded machine PyTorch's thread pool waits for a busy core: 1 thread is steadier.
        torch.set_num_threads(args.torch_threads)

    print(machine_report())
    kernels = _fused.ENABLED
    print(f"compiled kernels: {'on' if kernels else 'off (not built, or SCRATCHNN_KERNELS=0)'}")
    print("float32; times are forward + backward per call; ratios below 1 favour scratchnn\n")
    rows = []
    rng = np.random.default_rng(0)
    for name in args.layers:
        make, make_torch, make_seed = LAYERS[name]
        for size in args.sizes:
            n = int(size)
            # Softmax runs along rows of 1000, as a batch of logits would.
            shape = (max(n // 1000, 1), min(n, 1000)) if name == "Softmax" else (n,)
            x = (3 * rng.standard_normal(shape)).astype(np.float32)
            dout = rng.standard_normal(shape).astype(np.float32)
            contenders = {
                "scratchnn": numpy_step(make(), x, dout),
                "torch": torch_step(make_torch(), x, dout),
            }
            if kernels:
                contenders["numpy"] = numpy_only_step(make(), x, dout)
            if make_seed is not None:
                contenders["seed"] = numpy_step(make_seed(), x, dout.copy())
            rounds = args.rounds if n < 10**7 else max(3, args.rounds // 2)
            timing = paired_rounds(contenders, rounds=rounds)
            has_seed = make_seed is not None
            rows.append(
                [
                    name,
                    f"{n:.2g}".replace("e+0", "e"),
                    format_seconds(timing.median("scratchnn")),
                    format_seconds(timing.median("torch")),
                    format_seconds(timing.median("seed")) if has_seed else "",
                    f"{timing.ratio('scratchnn', 'torch'):.2f}",
                    f"{timing.ratio('numpy', 'torch'):.2f}" if kernels else "",
                    f"{timing.ratio('seed', 'scratchnn'):.1f}" if has_seed else "",
                ]
            )
            print(f"  {name} {n}: done", file=sys.stderr, flush=True)
    header = ["layer", "elements", "scratchnn", "torch", "seed", "scratchnn/torch", "numpy/torch",
              "seed/scratchnn"]  # fmt: skip
    print_table(header, rows)


if __name__ == "__main__":
    main()
