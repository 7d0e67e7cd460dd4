#!/bin/bash
# The one GPU check: correctness and timings (benchmarks/gpu.py), then the GPU tests, then
# two diagnostic tables (benchmarks/gpu_kernels.py, benchmarks/gpu_calls.py) and scratchnn's
# own host time an eager step on the lent host (benchmarks/bench_gpu_host.py).
# Run from the repository root on a machine with an NVIDIA GPU, CuPy and PyTorch with CUDA,
# with Fashion-MNIST's four .gz files in .gpu-data/fashion-mnist (a copy of
# /usr/share/datasets/fashion-mnist, carried along). Logs go to $OUT (or /tmp).
set -o pipefail
out=${OUT:-/tmp}
export PYTHONPATH=src PYTHONUNBUFFERED=1
# The tests find the data here, and fail (not skip) where the GPU is missing: on the lent
# machine a skip would read as a pass.
export SCRATCHNN_DATA=$PWD/.gpu-data SCRATCHNN_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# CuPy's own kernels need CUDA's headers (CuPy 13.6 stopped bundling them): say so first.
python3 -c "import cupy; print('cupy', cupy.__version__, 'exp:', cupy.exp(cupy.ones(2)).get())" \
    || echo "CuPy's own kernels do not compile here (CUDA headers? pip install cupy-cuda13x[ctk])"
python3 benchmarks/gpu.py --require-gpu --data .gpu-data/fashion-mnist 2>&1 \
    | tee "$out/gpu-benchmark.log"
benchmark=$?
# Only the real-GPU variants ("cuda" in their ids, not the fake device's, which ran where
# the code was written). A warning from CuPy or NumPy is shown, not made a failure: the
# suite's filterwarnings=error is for this project's own code, tested on the CPU. Every
# test runs (no -x: one failure must not hide the rest), the whole log is kept in $out
# as it is written (a run cut short keeps what it had), and the end is shown.
# The lent machine has no pytest: a copy of the pure-Python packages may travel in
# .gpu-data/pylib (copied from the venv's site-packages), used only where pytest is missing.
if ! python3 -c "import pytest" 2>/dev/null && [ -d .gpu-data/pylib ]; then
    export PYTHONPATH=$PYTHONPATH:$PWD/.gpu-data/pylib
fi
python3 -c "import pytest" || echo "no pytest here: the GPU tests cannot run (carry it in .gpu-data/pylib)"
python3 -m pytest -q -p no:cacheprovider -rf tests/test_gpu*.py -k "cuda and not fake" \
    -W default::DeprecationWarning -W default::FutureWarning -W default::UserWarning 2>&1 \
    | tee "$out/gpu-tests.log" | tail -60
tests=$?
# Then what a miss needs explained (about a minute and a half together): each kernel alone
# in several launch shapes, and the host's cost of each call of the eager MLP step and of
# the candidates to replace them. Shown, not judged.
python3 benchmarks/gpu_kernels.py --repeats 15 2>&1 | tee "$out/gpu-kernels.log" | tail -24
python3 benchmarks/gpu_calls.py 2>&1 | tee "$out/gpu-calls.log" | tail -25
# scratchnn's own Python an eager step on this host (a null device in CuPy's place, ~10 s):
# the part of the step's host time that is the library's, not CuPy's.
python3 benchmarks/bench_gpu_host.py --rounds 5 2>&1 | tee "$out/gpu-host.log" | tail -8
# Last, what a reader needs first, so that it is in the tail the lent machine sends back
# (the whole logs are in $out): whether fit's step was replayed from a CUDA graph (or why
# not), gpu.py's correctness line and final table, the products' rows of the host's calls
# (CuPy's matmul against the direct sgemm), our own Python an eager step.
echo "== summary =="
grep -E "^correctness:|  FAIL|steps as fit takes them|the MLP step as fit takes it" \
    "$out/gpu-benchmark.log" | head -12
sed -n '/^card: /,$p' "$out/gpu-benchmark.log"
grep -E "^product x @ W|instead: product|calls of a step" "$out/gpu-calls.log"
grep -E "SGD|Adam" "$out/gpu-host.log" | tail -2
echo "benchmarks/gpu.py exit $benchmark, tests/test_gpu*.py exit $tests"
exit $((benchmark || tests))
