"""Conv2d at the cnn preset's shapes, and its whole training step: scratchnn against PyTorch CPU.

    .venv/bin/python benchmarks/bench_conv.py
    .venv/bin/python benchmarks/bench_conv.py --batch 128 --rounds 15
    .venv/bin/python benchmarks/bench_conv.py --threads 1     # needs threadpoolctl

float32, batch 128, 3×3 kernels with padding 1, the two convolutions of
``scratchnn.models.cnn`` in the cnn preset (32 and 64 channels on Fashion-MNIST):

* conv1: (N, 1, 28, 28) → (N, 32, 28, 28), the first layer: its input is
  data, so neither framework computes dx (scratchnn's ``Sequential`` calls
  ``backward(dout, input_grad=False)``; PyTorch's input does not require grad);
* conv2: (N, 32, 14, 14) → (N, 64, 14, 14), with dx, dW and db;
* the cnn preset's network (``scratchnn train --model cnn``: both blocks,
  dropout, the two Affine layers) and one Adam step, in training mode in
  both frameworks (dropout on, BatchNorm on the batch's statistics), the
  same weights, its loss checked to agree with dropout off.

Both frameworks run in this one process, with the same number of threads
(PyTorch's ``set_num_threads`` set to OpenBLAS's, or PyTorch, OpenBLAS and
scratchnn's own kernels all set by ``--threads``), on the same arrays and
weights (checked to agree before timing). Each contender runs once per
round in a rotating order; the ratio is the median of per-round ratios
(below 1: scratchnn is faster).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from _common import (
    format_seconds,
    limit_threads,
    machine_report,
    paired_rounds,
    positive_int,
    print_table,
)

import scratchnn as snn

# name -> (C_in, C_out, H = W, input gradient needed)
SHAPES: dict[str, tuple[int, int, int, bool]] = {
    "conv1 1→32, 28×28 (no dx)": (1, 32, 28, False),
    "conv2 32→64, 14×14": (32, 64, 14, True),
}


def blas_threads() -> int:
    try:
        import threadpoolctl

        for pool in threadpoolctl.threadpool_info():
            if pool.get("internal_api") == "openblas":
                return int(pool["num_threads"])
    except ImportError:
        pass
    return torch.get_num_threads()


def contenders(
    c_in: int, c_out: int, size: int, input_grad: bool, batch: int
) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, c_in, size, size)).astype(np.float32)
    dout = rng.standard_normal((batch, c_out, size, size)).astype(np.float32)
    ours = snn.Conv2d(c_in, c_out, 3, padding=1, rng=rng)
    theirs = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(ours.W))
        theirs.bias.copy_(torch.from_numpy(ours.b))
    xt = torch.from_numpy(x).requires_grad_(input_grad)
    dt = torch.from_numpy(dout)

    def scratchnn_step() -> None:
        ours.forward(x)
        ours.backward(dout, input_grad=input_grad)

    def torch_step() -> None:
        theirs.weight.grad = theirs.bias.grad = xt.grad = None
        theirs(xt).backward(dt)

    scratchnn_step()
    torch_step()
    assert ours.dW is not None and theirs.weight.grad is not None
    scale = float(np.abs(ours.dW).max())
    np.testing.assert_allclose(ours.dW, theirs.weight.grad.numpy(), atol=1e-4 * scale)
    return {"scratchnn": scratchnn_step, "torch": torch_step}


def torch_copy(net: snn.Sequential) -> torch.nn.Sequential:
    """The same network in PyTorch, with the same weights (Affine's W is Linear's weight^T)."""
    modules: list[torch.nn.Module] = []
    for layer in net.layers:
        if isinstance(layer, snn.Conv2d):
            module: torch.nn.Module = torch.nn.Conv2d(
                layer.W.shape[1], layer.W.shape[0], layer.kernel_size, layer.stride, layer.padding
            )
            weights = {"weight": layer.W, "bias": layer.b}
        elif isinstance(layer, snn.Affine):
            module = torch.nn.Linear(*layer.W.shape)
            weights = {"weight": layer.W.T, "bias": layer.b}
        elif isinstance(layer, snn.BatchNorm):
            module = torch.nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum)
            weights = {"weight": layer.gamma, "bias": layer.beta}
        elif isinstance(layer, snn.MaxPool2d):
            module, weights = torch.nn.MaxPool2d(layer.kernel_size, layer.stride), {}
        elif isinstance(layer, snn.Relu):
            module, weights = torch.nn.ReLU(), {}
        elif isinstance(layer, snn.Flatten):
            module, weights = torch.nn.Flatten(), {}
        elif isinstance(layer, snn.Dropout):
            module, weights = torch.nn.Dropout(layer.p), {}
        else:
            raise TypeError(f"no PyTorch counterpart for {layer!r}")
        with torch.no_grad():
            for name, array in weights.items():
                getattr(module, name).copy_(torch.from_numpy(np.ascontiguousarray(array)))
        modules.append(module)
    return torch.nn.Sequential(*modules)


def step_contenders(batch: int) -> dict[str, Callable[[], object]]:
    """One training step of the cnn preset's network (Adam 1e-3, dropout on) in each."""
    from scratchnn.optim import make_optimizer
    from scratchnn.runs import build_network, preset_config

    rng = np.random.default_rng(0)
    net = build_network(preset_config("cnn"), rng)
    model = torch_copy(net)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    t = rng.integers(0, 10, batch)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    # The same function before any step: the losses agree with dropout off.
    net.eval(), model.eval()
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(model(xt), tt))
    np.testing.assert_allclose(float(net.loss(x, t)), want, rtol=1e-4)
    net.train(), model.train()
    optimizer = make_optimizer("adam", lr=1e-3)
    torch_optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def scratchnn_step() -> None:
        optimizer.update(net.params, net.gradient(x, t))

    def torch_step() -> None:
        torch_optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(xt), tt).backward()
        torch_optimizer.step()

    return {"scratchnn": scratchnn_step, "torch": torch_step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=128)
    parser.add_argument("--rounds", type=positive_int, default=11)
    parser.add_argument("--threads", type=positive_int, help="threads for both (default: OpenBLAS's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        limit_threads(args.threads)  # OpenBLAS, PyTorch and scratchnn's own threads
    else:
        torch.set_num_threads(blas_threads())
    run(args.batch, args.rounds)


def run(batch: int, rounds: int) -> None:
    print(machine_report())
    rows = []
    for name, (c_in, c_out, size, input_grad) in SHAPES.items():
        timing = paired_rounds(
            contenders(c_in, c_out, size, input_grad, batch), rounds=rounds, min_seconds=0.2
        )
        rows.append(
            [
                name,
                format_seconds(timing.median("scratchnn")),
                format_seconds(timing.median("torch")),
                f"{timing.ratio('scratchnn', 'torch'):.2f}",
            ]
        )
    timing = paired_rounds(step_contenders(batch), rounds=rounds, min_seconds=0.2)
    rows.append(
        [
            "cnn preset's training step (Adam)",
            format_seconds(timing.median("scratchnn")),
            format_seconds(timing.median("torch")),
            f"{timing.ratio('scratchnn', 'torch'):.2f}",
        ]
    )
    print(f"\nbatch {batch}, float32, forward + backward, median of {rounds} rounds\n")
    print_table(
        ["Conv2d 3×3, padding 1; the network", "scratchnn", "torch", "scratchnn/torch"], rows
    )


if __name__ == "__main__":
    main()
