"""The figures the README and the notebooks show: each is made by a recipe of tools/figures.py (``make figures``),
each recipe's figure is committed, and no two committed pictures are copies of one another."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHOWN = re.compile(r"\]\((?:\.\./)?((?:figures|results)/[\w./-]+\.png)\)")  # a markdown image or link to a PNG


def _tool():
    spec = importlib.util.spec_from_file_location("figures_tool", ROOT / "tools" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _shown() -> set[str]:
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "notebooks").rglob("*.ipynb"),
             ROOT / "notebooks" / "README.md"]
    return {m.group(1) for path in texts for m in SHOWN.finditer(path.read_text())}


def _committed_pngs() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "*.png"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in listed.splitlines() if (ROOT / line).is_file()]


def test_every_figure_shown_or_kept_in_figures_has_a_recipe_and_exists() -> None:
    recipes = {r.path for r in _tool().RECIPES}
    shown = _shown()
    assert "figures/method_map.png" in shown and "results/builtin_fast/figures/curves.png" in shown
    kept = {p for p in _committed_pngs() if p.startswith("figures/")}
    assert not (shown | kept) - recipes, "add a recipe to tools/figures.py"
    assert all((ROOT / path).is_file() for path in recipes)


def test_no_two_committed_pictures_are_copies() -> None:
    by_hash: dict[str, list[str]] = {}
    for path in _committed_pngs():
        by_hash.setdefault(hashlib.sha256((ROOT / path).read_bytes()).hexdigest(), []).append(path)
    assert [paths for paths in by_hash.values() if len(paths) > 1] == []


def test_the_quick_recipes_redraw_their_figures(tmp_path: Path) -> None:
    tool = _tool()
    quick = tool.select(None, every=False)
    assert {r.name for r in quick} == {"method_map", "07_ablation_builtin_v1_fast"}
    for recipe in quick:
        recipe.make(tmp_path)
        fresh = np.asarray(Image.open(tmp_path / recipe.path))
        assert fresh.shape == np.asarray(Image.open(ROOT / recipe.path)).shape, recipe.path
    # the benchmark's two figures come from one run, made once
    assert [r.name for r in tool.select(["curves", "brick_seed0_examples"], every=False)] == ["curves"]
    assert len(tool.select(None, every=True)) == len(tool.RECIPES) - 1
