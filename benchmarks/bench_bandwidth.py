"""ReLU forward + backward at 1.6e7 float32 elements against the memory-bandwidth floor.

    .venv/bin/python benchmarks/bench_bandwidth.py

The floor is the time to move the fewest bytes a ReLU layer's forward and
backward must move, at the best speed ``np.copyto`` reaches between two
existing buffers on this machine (read one, write the other: 2 bytes moved
per byte copied). Four copies are timed, and the floor takes the fastest:
on one thread and split in two halves on two threads (it releases the GIL),
so that a layer on two threads is not measured against one thread's
bandwidth; and between 64 MB buffers (the size of the layer's arrays) and
256 MB ones, because glibc's ``memcpy`` switches to non-temporal stores only
above a size threshold (``x86_non_temporal_threshold``, about 100 MB here)
and streams about twice as fast beyond it. The last column measures against
the faster 64 MB copy, the floor these tables used before. With a bool mask those bytes are,
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
from _common import format_seconds, machine_report, paired_rounds, positive_int, print_table

import scratchnn as snn

N = 16_000_000
BIG = 64_000_000  # float32 elements: 256 MB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=7)
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

    big_x = np.resize(x, BIG)  # 256 MB, beyond the non-temporal threshold
    big_target = np.empty_like(big_x)
    pool = ThreadPoolExecutor(max_workers=1)

    def two_threads(dst: np.ndarray, src: np.ndarray) -> Callable[[], None]:
        half = src.size // 2

        def copy() -> None:
            other = pool.submit(np.copyto, dst[half:], src[half:])
            np.copyto(dst[:half], src[:half])
            other.result()

        return copy

    contenders: dict[str, Callable[[], object]] = {
        "copyto": lambda: np.copyto(target, x),
        "copyto 2": two_threads(target, x),
        "copyto big": lambda: np.copyto(big_target, big_x),
        "copyto big 2": two_threads(big_target, big_x),
        "fresh copy": x.copy,
        "relu": lambda: _fb(relu, x, dout),
        "relu packed": lambda: _fb(packed, x, dout),
        "torch": torch_step,
    }
    timing = paired_rounds(contenders, rounds=args.rounds, min_seconds=0.2)
    pool.shutdown()
    sizes = {"copyto": x.nbytes, "copyto 2": x.nbytes,
             "copyto big": big_x.nbytes, "copyto big 2": big_x.nbytes}  # fmt: skip

    def speed(name: str) -> float:  # bytes moved per second
        return 2 * sizes[name] / timing.median(name)

    best = max(sizes, key=speed)
    at_64_mb = max(("copyto", "copyto 2"), key=speed)
    for name, label in (("copyto", "one thread, 64 MB"), ("copyto 2", "two threads, 64 MB"),
                        ("copyto big", "one thread, 256 MB"),
                        ("copyto big 2", "two threads, 256 MB")):  # fmt: skip
        print(f"np.copyto on {label} buffers: {speed(name) / 1e9:.1f} GB/s (read + write)")
    print(f"floor from the fastest: {speed(best) / 1e9:.1f} GB/s\n")

    def of(copy: str, name: str, bytes_per_element: float) -> float:
        """floor / time(name), the floor at ``copy``'s speed: the bytes ``name`` must move
        over the bytes ``copy`` moves, times time(copy) / time(name) paired per round."""
        return timing.ratio(copy, name) * bytes_per_element * N / (2 * sizes[copy])

    def row(label: str, name: str, bytes_per_element: float) -> list[str]:
        floor = bytes_per_element * N / speed(best)
        return [label, format_seconds(timing.median(name)), format_seconds(floor),
                f"{of(best, name, bytes_per_element):.2f}",
                f"{of(at_64_mb, name, bytes_per_element):.2f}"]  # fmt: skip

    rows = [
        row("np.copyto into an existing buffer (64 MB)", "copyto", 8),
        row("the same copy in two halves on two threads", "copyto 2", 8),
        row("copy into a fresh array (x.copy())", "fresh copy", 8),
        row("scratchnn Relu forward + backward", "relu", 18),
        row("scratchnn Relu(packed=True) forward + backward", "relu packed", 16.25),
        row("PyTorch ReLU forward + autograd backward", "torch", 18),
    ]
    print_table(["what", "measured", "floor", "of floor", "of the 64 MB copy's floor"], rows)


def _fb(layer: snn.Relu, x: np.ndarray, dout: np.ndarray) -> object:
    layer.forward(x)
    return layer.backward(dout)


if __name__ == "__main__":
    main()
