"""The package's shape: who imports whom, no private names across modules, a training loop a learner can read,
and every "METHOD.md section N" reference pointing at a heading that exists."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dmdd_core"
RUNNERS = {"dmdd_core.runner", "dmdd_core.report", "dmdd_core.benchmark", "dmdd_core.ablation", "dmdd_core.cli",
           "dmdd_core.__main__"}
"""The run layer's top: it may import everything below; nothing below may import it."""
LOOP_LIMIT = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``current``)."""
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import in the file, at any depth (function bodies too)."""
    found: list[tuple[str, str | None]] = []
    known = modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None) if sub in known else (target, alias.name))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _ in imports_of(name, path) if m in known and m != name} for name, path in known.items()}


def reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_import_walker_sees_relative_and_function_level_imports() -> None:
    edges = graph()
    assert "dmdd_core.model" in edges["dmdd_core.train"]  # from .model import ... at the top
    assert "dmdd_core.fit" in edges["dmdd_core.runner"]  # from .fit import fit, inside a function
    assert "dmdd_core.data.loading" in edges["dmdd_core.infer"]  # from .data.loading import ...


def test_training_does_not_depend_on_evaluation() -> None:
    below_train = reachable("dmdd_core.train", graph())
    assert not below_train & {"dmdd_core.infer", "dmdd_core.metrics", "dmdd_core.fit"}, sorted(below_train)


def test_nothing_below_the_runners_imports_them() -> None:
    edges = graph()
    wrong = {f"{a} -> {b}" for a, targets in edges.items() if a not in RUNNERS for b in targets if b in RUNNERS}
    assert not wrong, sorted(wrong)


def test_no_module_imports_another_modules_private_name() -> None:
    known = modules()
    wrong = [f"{name} imports {target}.{imported}" for name, path in known.items()
             for target, imported in imports_of(name, path)
             if imported and imported.startswith("_") and not imported.startswith("__") and target in known]
    assert not wrong, wrong


def function_lengths(path: Path) -> dict[str, int]:
    """Every function's length in lines (decorators and docstring included), by qualified name."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[prefix + child.name] = (child.end_lineno or child.lineno) - child.lineno + 1
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
    return lengths


def test_the_training_loop_is_short_enough_to_read() -> None:
    lengths = function_lengths(PACKAGE / "train.py")
    assert lengths["train_loop"] <= LOOP_LIMIT, lengths["train_loop"]
    assert lengths["train_step"] <= LOOP_LIMIT and lengths["RunState.checkpoint"] <= LOOP_LIMIT


def headings(markdown: str) -> set[str]:
    """The section numbers of a Markdown file's "## N. Title" headings."""
    return set(re.findall(r"^#+\s+(\d+)\.", markdown, flags=re.MULTILINE))


SECTION_REFERENCE = re.compile(r"METHOD\.md\s+(?:section|§)\s*(\d+)")


def references() -> list[tuple[str, str]]:
    """(file, section number) of every "METHOD.md section N" or "METHOD.md §N" in code, notebooks and docs."""
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
             *(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md",
             ROOT / "notebooks" / "README.md"]
    found = []
    for path in files:
        text = path.read_text()
        if path.suffix == ".ipynb":
            text = "\n".join("".join(cell["source"]) for cell in json.loads(text)["cells"])
        text = text.replace(" [N]", "")  # this file's own pattern text
        found += [(str(path.relative_to(ROOT)), n) for n in SECTION_REFERENCE.findall(text)]
    return found


def test_method_card_section_references_resolve() -> None:
    sections = headings((ROOT / "docs" / "METHOD.md").read_text())
    found = references()
    assert len(found) >= 10  # the references exist, so the check below checks something
    missing = [f"{path}: section {n}" for path, n in found if n not in sections]
    assert not missing, f"METHOD.md has sections {sorted(sections, key=int)}; these point elsewhere: {missing}"


@pytest.mark.parametrize("text, expected", [("## 1. Data\n### 8. Metrics\n# Title\n## Presets", {"1", "8"})])
def test_headings_reads_numbered_sections(text: str, expected: set[str]) -> None:
    assert headings(text) == expected
