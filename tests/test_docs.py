"""The pages of docs/ that quote what the code prints: the quotes are what it prints now.

Oracle: the program itself, run here. docs/sigmoid-graph.md and its Japanese
translation quote ``scratchnn demo``'s step table and a script's output (the
script compares with 100-digit mpmath values); a change to the code that
moves a digit must change the pages too.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from scratchnn.demo import run_demo

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["sigmoid-graph.md", "sigmoid-graph.ja.md"]


def _demo_quote(page: str) -> list[str]:
    """The indented lines after ``$ scratchnn demo`` and its ``...``, unindented."""
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    start = lines.index("    $ scratchnn demo") + 2
    assert lines[start - 1] == "    ..."
    quoted = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        quoted.append(line[4:])
    return [line.rstrip() for line in quoted]


@pytest.mark.parametrize("page", PAGES)
def test_the_step_table_quoted_is_what_demo_prints(page: str) -> None:
    printed = [line.rstrip() for line in run_demo().splitlines()]
    quoted = _demo_quote(page)
    while quoted and not quoted[-1]:
        quoted.pop()
    assert len(quoted) >= 20  # the whole table, not a line of it
    first = printed.index(quoted[0])
    assert printed[first : first + len(quoted)] == quoted


@pytest.mark.parametrize("page", PAGES)
def test_the_script_quoted_prints_what_the_page_says(page: str) -> None:
    pytest.importorskip("mpmath", reason="mpmath (the script's reference) is not installed")
    text = (DOCS / page).read_text(encoding="utf-8")
    match = re.search(r"```\n\$ \.venv/bin/python - <<'EOF'\n(.*?)\nEOF\n(.*?)```", text, re.S)
    assert match, f"{page}: the script block was not found"
    script, quoted = match.groups()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.splitlines() == quoted.splitlines()


def _finding_titles() -> set[str]:
    """Every kind of line check_layer reports, from reports of real layers."""
    import numpy as np

    import scratchnn as snn

    class ForgetsReturn:
        def forward(self, x: np.ndarray) -> None:
            self.x = x

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3))
    reports = [
        snn.check_layer(snn.Affine(rng.standard_normal((3, 2)), np.zeros(2)), x),
        snn.check_layer(snn.SoftmaxWithLoss(), x, target=np.array([0, 1, 2, 0])),
        snn.check_layer(ForgetsReturn(), x),
    ]
    return {finding.check for report in reports for finding in report.findings}


def test_the_japanese_page_explains_every_line_check_layer_reports() -> None:
    table = (DOCS / "check-layer.ja.md").read_text(encoding="utf-8")
    titles = _finding_titles()
    assert len(titles) == 10
    missing = [title for title in titles if f"| `{title}` |" not in table]
    assert not missing, f"check-layer.ja.md's table lacks {missing}"


def test_both_pages_from_the_book_list_the_same_differences() -> None:
    # Each row of the silent differences starts with the same code span in both languages.
    def rows(page: str) -> list[str]:
        text = (DOCS / page).read_text(encoding="utf-8")
        table = text.split("\n## ")[1]
        return [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]

    english, japanese = rows("from-the-book.md"), rows("from-the-book.ja.md")
    assert len(english) == len(japanese) == 13
    spans = [re.findall(r"`[^`]+`", cell) for cell in english]
    assert spans == [re.findall(r"`[^`]+`", cell) for cell in japanese]
