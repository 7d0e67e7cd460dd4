#!/usr/bin/env bash
# Set everything up and run the whole test suite: pytest (with the doctests),
# ruff and mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "test,train"
lint_paths=(src tests)
[ -d benchmarks ] && lint_paths+=(benchmarks)
.venv/bin/ruff check "${lint_paths[@]}"
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
