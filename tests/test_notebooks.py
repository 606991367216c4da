"""The tutorial notebooks are stored clean and follow the same conventions; nbval executes them (see the
Makefile's test command), this file checks how they are written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PLOTTING = ("figure(", "anomaly_examples(", "loss_curves(", "example_figure(", "curve_panels(")


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def test_notebooks_are_numbered_from_00_without_gaps() -> None:
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(9))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs_or_execution_counts(path: Path) -> None:
    for i, cell in enumerate(cells(path)):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {i} has outputs: clear them before committing"
            assert cell["execution_count"] is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_top_has_title_goals_badge_and_a_colab_only_install(path: Path) -> None:
    first, install = cells(path)[:2]
    text = source(first)
    assert first["cell_type"] == "markdown" and text.startswith(f"# {path.name[:2]} ·")
    assert "You will be able to" in text and "DMDD_FAST=1" in text
    assert re.search(rf"colab\.research\.google\.com/github/[^)]+/notebooks/{re.escape(path.name)}\)", text)
    assert install["cell_type"] == "code" and 'if IN_COLAB:' in source(install) and "pip" in source(install)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_uses_the_package_plots_through_its_helper_and_ends_with_summary_and_exercises(path: Path) -> None:
    code = [source(c) for c in cells(path) if c["cell_type"] == "code"]
    assert any("from dmdd_core" in c for c in code)
    for c in code:
        if any(name in c for name in PLOTTING) and "plt.show()" in c:
            assert c.rstrip().endswith("plt.show()"), f"{path.name}: a plot cell must end in plt.show()"
    last = source(cells(path)[-1])
    assert "## Summary" in last and "## Exercises" in last
    exercises = re.findall(r"^\d+\. ", last.split("## Exercises", 1)[1], flags=re.M)
    assert 2 <= len(exercises) <= 4


def test_readme_lists_every_notebook_in_order_with_a_colab_link() -> None:
    readme = (ROOT / "README.md").read_text()
    positions = [readme.find(f"notebooks/{p.name}") for p in NOTEBOOKS]
    assert all(pos >= 0 for pos in positions), "a notebook is missing from the README"
    assert positions == sorted(positions)
    lines = readme.splitlines()
    for p in NOTEBOOKS:
        assert any(f"notebooks/{p.name}" in line and "colab.research.google.com/github/" in line for line in lines), p.name


def test_notebooks_readme_gives_each_notebook_its_fast_time_and_full_mode_hardware() -> None:
    text = (ROOT / "notebooks" / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| [`")]
    assert [re.search(r"\[`(\d\d_\w+)`\]", row).group(1) for row in rows] == [p.stem for p in NOTEBOOKS]
    header = next(line for line in text.splitlines() if line.startswith("| notebook |"))
    assert "2 CPU cores (measured)" in header and "T4: `lab` (estimate)" in header and "A100 / H100 (estimate)" in header
    for row in rows:
        name, teaches, fast, cpu, t4, large = [c.strip() for c in row.strip("|").split("|")]
        assert f"({name.split('`')[1]}.ipynb)" in name and len(teaches) > 40
        assert re.fullmatch(r"\d+ s", fast), row
        for when in (cpu, t4, large):  # a time, or "seconds" where nothing trains
            assert re.search(r"\d+ (s|min|h)", when) or "seconds" in when, row
    assert "FAST_TABLE" not in text


def _exercises(path: Path) -> list[str]:
    """The exercises of a tutorial notebook, each as written (numbered items of its last cell)."""
    section = source(cells(path)[-1]).split("## Exercises", 1)[1]
    items = re.split(r"^\d+\. ", section, flags=re.M)[1:]
    return [" ".join(item.split()) for item in items]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_a_hint_a_worked_solution_and_what_to_expect(path: Path) -> None:
    solved = ROOT / "notebooks" / "solutions" / f"{path.stem}_solutions.ipynb"
    assert solved.is_file(), f"{solved.relative_to(ROOT)} is missing"
    assert f"(solutions/{solved.name})" in source(cells(path)[-1]), "run python tools/links.py"
    book = cells(solved)
    assert source(book[0]).startswith(f"# {path.name[:2]} ·") and f"(../{path.name})" in source(book[0])
    assert "if IN_COLAB:" in source(book[1])
    for i, cell in enumerate(book):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{solved.name} cell {i}: clear it"
    headings = [i for i, c in enumerate(book) if re.match(r"## Exercise \d+\b", source(c))]
    exercises = _exercises(path)
    assert [int(source(book[i]).split()[2]) for i in headings] == list(range(1, len(exercises) + 1))
    for n, (start, end) in enumerate(zip(headings, [*headings[1:], len(book)]), start=1):
        part = book[start:end]
        assert exercises[n - 1] in " ".join(source(part[0]).split()), f"{solved.name}: exercise {n} not as set"
        texts = [source(c) for c in part]
        assert any(t.startswith("**Hint.**") for t in texts), f"{solved.name}: exercise {n} has no hint"
        assert any(c["cell_type"] == "code" and "assert " in source(c) for c in part), \
            f"{solved.name}: exercise {n} has no solution that checks what it claims"
        assert any("**What to expect.**" in t or "**Solution.**" in t for t in texts), \
            f"{solved.name}: exercise {n} does not say what to expect"
