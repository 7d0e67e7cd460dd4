"""ReLU forward + backward at 1.6e7 float32 elements against the memory-bandwidth floor.

    .venv/bin/python benchmarks/bench_bandwidth.py

The floor is the time to move the fewest bytes a ReLU layer's forward and
backward must move, at the speed ``np.copyto`` reaches between two existing
buffers on this machine (read one, write the other: 2 bytes moved per byte
copied). ``np.copyto`` runs on one thread; the same copy split in two halves
on two threads (it releases the GIL) may move more bytes per second, and the
floor takes the faster of the two, so that a layer on two threads is not
measured against one thread's bandwidth. With a bool mask those bytes are,
per element: forward reads x (4) and writes the output (4) and the mask
(1); backward reads dout (4) and the mask (1) and writes dx (4): 18 bytes.
The packed mask takes 1/8 byte, so 16.25. "Of floor" is floor time /
measured time: 1.0 is the floor itself.

Fresh output arrays cost more than the copy's: the kernel zeroes each new
page before the first write touches it. scratchnn returns a new array from
every forward and backward (a caller may keep them), as PyTorch does, but
takes large ones from a pool of buffers that no array uses any more
(``scratchnn._buffers``); the line "copy into a fresh array" shows what one
fresh array costs here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from _common import format_seconds, machine_report, paired_rounds, print_table

import scratchnn as snn

N = 16_000_000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    print(machine_report())

    rng = np.random.default_rng(0)
    x = rng.standard_normal(N, dtype=np.float32)
    dout = rng.standard_normal(N, dtype=np.float32)
    target = np.empty_like(x)
    relu, packed = snn.Relu(), snn.Relu(packed=True)
    xt = torch.from_numpy(x).requires_grad_(True)
    gt = torch.from_numpy(dout)
    torch_relu = torch.nn.ReLU()

    def torch_step() -> None:
        xt.grad = None
        torch_relu(xt).backward(gt)

    halves = [(target[: N // 2], x[: N // 2]), (target[N // 2 :], x[N // 2 :])]
    pool = ThreadPoolExecutor(max_workers=1)

    def copyto_two_threads() -> None:
        other = pool.submit(np.copyto, *halves[1])
        np.copyto(*halves[0])
        other.result()

    contenders: dict[str, Callable[[], object]] = {
        "copyto": lambda: np.copyto(target, x),
        "copyto 2": copyto_two_threads,
        "fresh copy": x.copy,
        "relu": lambda: _fb(relu, x, dout),
        "relu packed": lambda: _fb(packed, x, dout),
        "torch": torch_step,
    }
    timing = paired_rounds(contenders, rounds=args.rounds, min_seconds=0.2)
    pool.shutdown()
    copy = min(("copyto", "copyto 2"), key=timing.median)
    bandwidth = 2 * x.nbytes / timing.median(copy)
    for name, label in (("copyto", "one thread"), ("copyto 2", "two threads")):
        speed = 2 * x.nbytes / timing.median(name) / 1e9
        print(f"np.copyto on {label}: {speed:.1f} GB/s (read + write, 64 MB buffers)")
    print(f"floor from the faster: {bandwidth / 1e9:.1f} GB/s\n")

    def row(label: str, name: str, bytes_per_element: float) -> list[str]:
        floor = bytes_per_element * N / bandwidth
        # ratio(copy, name) scaled: floor / time(name), paired per round
        of_floor = timing.ratio(copy, name) * floor / timing.median(copy)
        return [label, format_seconds(timing.median(name)), format_seconds(floor), f"{of_floor:.2f}"]

    rows = [
        row("np.copyto into an existing buffer", "copyto", 8),
        row("the same copy in two halves on two threads", "copyto 2", 8),
        row("copy into a fresh array (x.copy())", "fresh copy", 8),
        row("scratchnn Relu forward + backward", "relu", 18),
        row("scratchnn Relu(packed=True) forward + backward", "relu packed", 16.25),
        row("PyTorch ReLU forward + autograd backward", "torch", 18),
    ]
    print_table(["what", "measured", "floor", "of floor"], rows)


def _fb(layer: snn.Relu, x: np.ndarray, dout: np.ndarray) -> object:
    layer.forward(x)
    return layer.backward(dout)


if __name__ == "__main__":
    main()
