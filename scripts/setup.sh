#!/usr/bin/env bash
# Set up scratchnn on a fresh Debian machine that has only python3:
# the Debian packages (Fashion-MNIST, Graphviz, venv support), a virtual
# environment in .venv and the package with the extras named in $1.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
command -v dot >/dev/null 2>&1 || missing+=(graphviz)
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || missing+=(python3-venv python3-pip)
# A C compiler and Python's headers build the optional compiled kernels
# (src/ckernels/); without them every layer runs its NumPy passes.
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
python3 -c 'import os, sysconfig; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' \
    >/dev/null 2>&1 || missing+=(python3-dev)
# The tests run the CUDA kernels' sources on the CPU (tests/fake_cuda.py): a C++ compiler.
case ",$extras," in
    *,test,*) command -v g++ >/dev/null 2>&1 || missing+=(g++) ;;
esac
if [ "${#missing[@]}" -gt 0 ]; then
    if [ -n "$sudo" ] && ! command -v sudo >/dev/null 2>&1; then
        echo "setup: Debian packages are missing (${missing[*]}), and this is not root and" \
            "has no sudo; as root: apt-get update && apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing Debian packages: ${missing[*]}"
    # A fresh cloud machine may be running its own updates: wait for apt's lock.
    lock=(-o DPkg::Lock::Timeout=600)
    $sudo apt-get "${lock[@]}" update -qq
    # env inside sudo: sudo's env_reset would drop the variable set before it.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -qq "${missing[@]}" \
        >/dev/null
fi

# A .venv whose python has no pip (an interrupted or failed creation), or that another
# Python made (its packages, torch's build among them, would be for that one), is made again.
version='import sys; print(sys.version_info[:2])'
if ! .venv/bin/python -m pip --version >/dev/null 2>&1 \
    || [ "$(.venv/bin/python -c "$version")" != "$(python3 -c "$version")" ]; then
    echo "setup: creating .venv"
    python3 -m venv --clear .venv
fi
spec="."
if [ -n "$extras" ]; then spec=".[$extras]"; fi
echo "setup: installing scratchnn${extras:+ with [$extras]} into .venv"
# The build's setuptools (>= 77: pyproject.toml's SPDX licence) in the venv too, so
# that the compiled kernels can be rebuilt in place:
# pip install --no-deps --no-build-isolation -e .
# An earlier build's compiled kernels must not stand in for a build that now fails.
rm -f src/scratchnn/_ckernels*.so
# Once the venv has that setuptools, the build uses it (no isolated build environment,
# whose setuptools pip would download again on every run: a re-run works offline).
isolation=()
if .venv/bin/python -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' \
    >/dev/null 2>&1; then
    isolation=(--no-build-isolation)
fi
status=0
.venv/bin/python -m pip install --quiet --disable-pip-version-check --log .venv/pip-install.log \
    "${isolation[@]}" -e "$spec" "setuptools>=77" \
    2>&1 | grep -v "is ignored: it is neither a file nor a directory" || status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
    echo "setup: pip failed (exit $status); see its messages above" >&2
    exit "$status"
fi
.venv/bin/python -c "import scratchnn" # fail here, clearly, if the install did not work
.venv/bin/python -c "from scratchnn import _fused; raise SystemExit(not _fused.available())" \
    || echo "setup: the compiled kernels were not built (the compiler's messages are in" \
        ".venv/pip-install.log); the layers run their NumPy passes"
