"""``python -m scratchnn``: the same as the ``scratchnn`` command."""

from scratchnn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
