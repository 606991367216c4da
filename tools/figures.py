"""Regenerate the figures the README and the notebooks show: each has one recipe here, the command that makes it.

    python tools/figures.py --list            # every figure, what makes it, how long it takes
    python tools/figures.py                   # the quick ones (seconds: drawn from committed files)
    python tools/figures.py --all             # every one, retraining what needs a trained model (CPU: hours)
    python tools/figures.py --only 04_centre_vs_edge

(``make figures`` runs the quick ones, ``make figures ALL=1`` every one.) A figure drawn from committed result files
(a table's JSON) is redrawn in seconds; one that shows a trained model's maps is made again by the run that made
it: the notebook in its full mode, or the benchmark command, whose outputs land where the README links them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"


@dataclass(frozen=True)
class Recipe:
    """How one committed figure is made: ``path`` (relative to the repository), ``source`` (what it is drawn
    from), ``minutes`` on two CPU cores, and ``make`` (draws it into the given repository root)."""

    path: str
    source: str
    minutes: float
    make: Callable[[Path], None]

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def quick(self) -> bool:
        return self.minutes < 1


def _method_map(root: Path) -> None:
    from dmdd_core.plots import method_map, save_figure

    save_figure(method_map(), "method_map", root / "figures")


def _ablation_v1(root: Path) -> None:
    import matplotlib.pyplot as plt

    from dmdd_core.ablation import ablation_figure, load_ablation
    from dmdd_core.plots import save_figure

    fig = ablation_figure(load_ablation(ROOT / "results" / "ablation_builtin_fast")["rows"])
    save_figure(fig, "07_ablation_builtin_v1_fast", root / "figures")
    plt.close(fig)


def _run(command: Sequence[str], **env: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(list(command), cwd=ROOT, check=True, env={**os.environ, **env})


def _notebook(name: str) -> Callable[[Path], None]:
    """Execute a notebook in its full mode (DMDD_FAST unset): it saves its figure into figures/."""

    def make(root: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "DMDD_FAST"}
        command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--output-dir",
                   str(root / "build" / "executed"), "--ExecutePreprocessor.timeout=-1", f"notebooks/{name}.ipynb"]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True, env=env)

    return make


def _data_loading(root: Path) -> None:
    _run([sys.executable, "benchmarks/data_loading.py", "--figure", str(root / "figures" / "data_loading_benchmark.png")])


def _benchmark(root: Path) -> None:
    _run([sys.executable, "-m", "dmdd_core", "benchmark", "--data", "builtin", "--preset", "fast", "--seeds", "0", "1",
          "2", "--out", str(root / "results" / "builtin_fast")])


RECIPES: tuple[Recipe, ...] = (
    Recipe("figures/method_map.png", "dmdd_core.plots.method_map", 0.1, _method_map),
    Recipe("figures/07_ablation_builtin_v1_fast.png", "results/ablation_builtin_fast/ablation.json "
           "(dmdd_core.ablation.ablation_figure)", 0.1, _ablation_v1),
    Recipe("figures/data_loading_benchmark.png", "benchmarks/data_loading.py --figure", 3, _data_loading),
    Recipe("figures/04_centre_vs_edge.png", "notebook 04 in its full mode (trains the tutorial model if needed)", 8,
           _notebook("04_dual_modeling_distillation")),
    Recipe("results/builtin_fast/figures/curves.png", "dmdd benchmark --preset fast --seeds 0 1 2 (every category)",
           45, _benchmark),
    Recipe("results/builtin_fast/figures/brick_seed0_examples.png", "the same benchmark run (made once)", 45,
           _benchmark),
)
"""Every committed figure the README or a notebook shows, with what makes it."""


def select(names: Sequence[str] | None, every: bool) -> list[Recipe]:
    """The recipes to run: the named ones, else every one (``every``) or the quick ones. A figure made by the same
    command as another is made once."""
    if names:
        unknown = sorted(set(names) - {r.name for r in RECIPES} - {r.path for r in RECIPES})
        if unknown:
            raise SystemExit(f"no recipe for {', '.join(unknown)}; --list shows them")
        chosen = [r for r in RECIPES if r.name in names or r.path in names]
    else:
        chosen = [r for r in RECIPES if every or r.quick]
    seen: set[Callable[[Path], None]] = set()
    unique = []
    for recipe in chosen:
        if recipe.make not in seen:
            seen.add(recipe.make)
            unique.append(recipe)
    return unique


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print every figure and what makes it")
    parser.add_argument("--all", action="store_true", help="also the figures that need training (hours on a CPU)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these figures (file stem or path)")
    args = parser.parse_args(argv)
    if args.list:
        for r in RECIPES:
            print(f"{r.path:58s} {r.minutes:5.1f} min  {r.source}")
        return 0
    for recipe in select(args.only, args.all):
        print(f"{recipe.path}: {recipe.source} (about {recipe.minutes:g} min)", flush=True)
        recipe.make(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
