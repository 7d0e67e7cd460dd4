#!/usr/bin/env bash
# Set everything up and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "train"
# The main job trains afresh each time it runs (--overwrite replaces the run
# already in its output directory), unless asked to --resume that run.
case " $* " in
    *" --resume "*) exec .venv/bin/scratchnn train "$@" ;;
    *) exec .venv/bin/scratchnn train --overwrite "$@" ;;
esac
