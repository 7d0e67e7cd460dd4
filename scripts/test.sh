#!/usr/bin/env bash
# Set everything up and run the whole test suite: pytest (with the doctests),
# ruff and mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "test,train"
lint_paths=(src tests)
[ -d benchmarks ] && lint_paths+=(benchmarks)
# Through the venv's python: a moved checkout's .venv/bin scripts name the old path.
.venv/bin/python -m ruff check "${lint_paths[@]}"
.venv/bin/python -m mypy
# setup.sh installs a C compiler, so the compiled kernels must have been built: without
# them a third of the suite would skip (SCRATCHNN_REQUIRE_KERNELS=0 tests without them).
SCRATCHNN_REQUIRE_KERNELS=${SCRATCHNN_REQUIRE_KERNELS:-1} .venv/bin/python -m pytest "$@"
