"""Atomic writes: a failure part-way leaves the old file whole and no debris."""

from __future__ import annotations

from pathlib import Path

import pytest

from scratchnn.files import atomic_path, write_text_atomically


def test_failure_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "history.json"
    write_text_atomically(target, "old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as temporary:
        temporary.write_text("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


def test_success_replaces_and_keeps_the_suffix(tmp_path: Path) -> None:
    target = tmp_path / "curve.png"
    with atomic_path(target) as temporary:
        assert temporary.suffix == ".png" and temporary.parent == tmp_path
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]
