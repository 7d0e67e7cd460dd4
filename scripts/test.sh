#!/usr/bin/env bash
# Set everything up and run the whole test suite: pytest (with the doctests),
# ruff and mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "test,train"
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
