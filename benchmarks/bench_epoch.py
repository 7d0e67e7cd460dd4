"""One training epoch on Fashion-MNIST: scratchnn against PyTorch, same batches, same weights.

    .venv/bin/python benchmarks/bench_epoch.py                # both networks
    .venv/bin/python benchmarks/bench_epoch.py --net small --rounds 3

Two networks, float32, ReLU, softmax cross-entropy:

* small: 784-50-10, SGD (lr 0.1), batch 100 (the book's chapter-5 network);
* large: 784-256-256-10, Adam (lr 1e-3), batch 128.

Both frameworks start from the same weights (scratchnn's He initialisation,
copied into ``torch.nn.Linear``) and see the same mini-batches in the same
order. The epochs alternate, scratchnn then PyTorch, and the ratio is the
median of the per-round ratios of the training loop's time (forward,
backward and optimiser step over every batch; evaluation not included).
The first round's ratio is printed too: from the second epoch on, a dead
ReLU unit's Adam moments turn subnormal in PyTorch (scratchnn flushes them),
and its Adam step slows down.
After the rounds both networks have trained the same epochs on the same
batches; their test accuracies are printed side by side. Peak memory is the
growth of the peak resident set while one epoch trains, in a fresh process
per framework (the data set, loaded before, is not counted; Linux only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import limit_threads, machine_report, positive_int, print_table

from scratchnn import mlp
from scratchnn.data import load_fashion_mnist
from scratchnn.optim import SGD, Adam

NETS = {
    "small": {"sizes": [784, 50, 10], "optimizer": "sgd", "lr": 0.1, "batch": 100},
    "large": {"sizes": [784, 256, 256, 10], "optimizer": "adam", "lr": 1e-3, "batch": 128},
}


def build(name: str) -> tuple[Callable[[np.ndarray], None], Callable[[np.ndarray], None], Any, Any]:
    """An epoch function for each framework, and the two networks (for their accuracy)."""
    spec = NETS[name]
    (x_train, t_train), _ = load_fashion_mnist()
    net = mlp(spec["sizes"], rng=np.random.default_rng(0))
    opt = Adam(lr=spec["lr"]) if spec["optimizer"] == "adam" else SGD(lr=spec["lr"])

    linears = [
        torch.nn.Linear(layer.W.shape[0], layer.W.shape[1]) for layer in net.layers[::2]
    ]
    with torch.no_grad():
        for linear, layer in zip(linears, net.layers[::2]):
            linear.weight.copy_(torch.from_numpy(layer.W.T.copy()))
            linear.bias.copy_(torch.from_numpy(layer.b))
    stack: list[torch.nn.Module] = []
    for linear in linears:
        stack += [linear, torch.nn.ReLU()]
    model = torch.nn.Sequential(*stack[:-1])
    params = model.parameters()
    torch_opt = (
        torch.optim.Adam(params, lr=spec["lr"])
        if spec["optimizer"] == "adam"
        else torch.optim.SGD(params, lr=spec["lr"])
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    batch = spec["batch"]

    def scratchnn_epoch(order: np.ndarray) -> None:
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            opt.update(net.params, net.gradient(x_train[index], t_train[index]))

    def torch_epoch(order: np.ndarray) -> None:
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            xb = torch.from_numpy(x_train[index])
            tb = torch.from_numpy(t_train[index].astype(np.int64))
            torch_opt.zero_grad()
            loss_fn(model(xb), tb).backward()
            torch_opt.step()

    return scratchnn_epoch, torch_epoch, net, model


def accuracies(net: Any, model: Any) -> tuple[float, float]:
    _, (x_test, t_test) = load_fashion_mnist()
    ours = net.accuracy(x_test, t_test)
    with torch.no_grad():
        theirs = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == t_test).mean())
    return ours, theirs


def peak_memory_growth(name: str, framework: str, threads: int | None) -> int:
    """Bytes the peak resident set grows while one epoch trains, in a fresh process."""
    thread_args = ["--threads", str(threads)] if threads else []
    result = subprocess.run(
        [sys.executable, __file__, "--memory", name, framework, *thread_args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(json.loads(result.stdout)["growth"])


WARM_UP_BATCHES = 10


def _memory_child(name: str, framework: str) -> None:
    scratchnn_epoch, torch_epoch, _, _ = build(name)
    order = np.random.default_rng(1).permutation(60000)
    epoch = scratchnn_epoch if framework == "scratchnn" else torch_epoch
    # Ten batches first: the peak counts file-backed pages too, and the library code a
    # framework pages in on its first step (about 9 MiB of libtorch) is not training
    # memory; nor are the first steps' allocations of either framework (buffers, heap).
    epoch(order[: WARM_UP_BATCHES * NETS[name]["batch"]])
    before = _status_kib("VmRSS")
    # Writing 5 to clear_refs resets the peak (VmHWM) to the current resident set (Linux).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    epoch(order)
    print(json.dumps({"growth": (_status_kib("VmHWM") - before) * 1024}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--threads", type=positive_int, help="threads of PyTorch, OpenBLAS and scratchnn (default: theirs)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        # On a loaded machine a thread pool waits for a busy core: 1 thread is steadier.
        limit_threads(args.threads)
    if args.memory:
        _memory_child(*args.memory)
        return

    print(machine_report())
    rows = []
    for name in args.net:
        scratchnn_epoch, torch_epoch, net, model = build(name)
        rng = np.random.default_rng(1)
        times: dict[str, list[float]] = {"scratchnn": [], "torch": []}
        for r in range(args.rounds):
            order = rng.permutation(60000)
            pair = [("scratchnn", scratchnn_epoch), ("torch", torch_epoch)]
            for label, epoch in pair if r % 2 == 0 else pair[::-1]:
                started = time.perf_counter()
                epoch(order)
                times[label].append(time.perf_counter() - started)
        in_order = [a / b for a, b in zip(times["scratchnn"], times["torch"])]
        ours, theirs = accuracies(net, model)
        memory = {fw: peak_memory_growth(name, fw, args.threads) for fw in ("scratchnn", "torch")}
        spec = NETS[name]
        rows.append(
            [
                f"{'-'.join(map(str, spec['sizes']))} {spec['optimizer']} b{spec['batch']}",
                f"{statistics.median(times['scratchnn']):.2f} s",
                f"{statistics.median(times['torch']):.2f} s",
                f"{statistics.median(in_order):.2f}",
                f"{in_order[0]:.2f}",
                f"{100 * ours:.2f} / {100 * theirs:.2f}",
                f"{memory['scratchnn'] / 2**20:.1f} / {memory['torch'] / 2**20:.1f} MiB",
            ]
        )
        print(f"  {name}: done", file=sys.stderr, flush=True)
    print(f"\n{args.rounds} epochs each, alternating; ratios below 1 favour scratchnn\n")
    header = [
        "network", "scratchnn epoch", "torch epoch", "scratchnn/torch", "1st epoch only",
        "test acc. scratchnn / torch (%)", "peak memory growth scratchnn / torch",
    ]  # fmt: skip
    print_table(header, rows)


if __name__ == "__main__":
    main()
