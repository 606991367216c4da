"""The quickstart: a one-seed benchmark of a dataset's categories (the built-in one by default), then a short
table of DMDD beside PaDiM, the naive baseline and the validation split. [ours]"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .benchmark import run_benchmark
from .config import DMDDConfig
from .data import DataSource
from .protocol import label
from .runner import (
    FIGURES_DIR,
    Job,
    Rank,
    Task,
    load_result,
    markdown_table,
    metadata_lines,
    run_metadata,
    write_text_files,
)

KEYS = ("image_auroc", "pixel_auroc")
WHO = (("dmdd", "DMDD"), ("padim", "PaDiM"), ("naive_baseline", "mean image"))
"""The columns of each metric: DMDD, then the baselines of :data:`~dmdd_core.protocol.BASELINES`."""


def quickstart_table(evaluations: Sequence[Mapping[str, Any]],
                     validation: Sequence[Mapping[str, float] | None] | None = None) -> str:
    """Per-category image and pixel AUROC of DMDD, PaDiM and the mean-image baseline (``evaluations``: the
    dicts of :meth:`~dmdd_core.infer.Evaluation.to_dict`) and PaDiM's fit time, with their mean; with
    ``validation`` (one dict or None per category, e.g. a run's last validation entry) two more columns give
    the validation split's AUROCs. An absent metric (image labels only) reads "–"."""
    split = evaluations[0]["split"] if evaluations else "test"
    head = [f"{split} {label(k)}: {name}" for k in KEYS for _, name in WHO] + ["PaDiM fit s"]
    with_val = validation is not None and any(validation)
    head += ["val image AUROC", "val pixel AUROC"] if with_val else []
    nan = float("nan")
    values = []
    for i, ev in enumerate(evaluations):
        row = [ev.get(who, {}).get(k, nan) for k in KEYS for who, _ in WHO]
        row.append(ev.get("padim_fit_seconds") or nan)
        if with_val and validation is not None:
            row += [(validation[i] or {}).get(k, nan) for k in KEYS]
        values.append(row)

    def cells(row: Sequence[float], bold: bool = False) -> list[str]:
        texts = ["–" if np.isnan(v) else (f"{v:.1f}" if j == len(KEYS) * len(WHO) else f"{v:.3f}")
                 for j, v in enumerate(row)]
        return [f"**{t}**" if bold and t != "–" else t for t in texts]

    rows = [[ev["category"], *cells(row)] for ev, row in zip(evaluations, values)]
    if len(evaluations) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a column that is absent everywhere stays "–"
            rows.append(["**mean**", *cells(np.nanmean(values, axis=0), bold=True)])
    return "\n".join(markdown_table(["category", *head], rows))


def _loss_figures(jobs: Sequence[Job]) -> None:
    """``figures/<category>_seed<k>_losses.png``: each run's training losses, from its log."""
    import json

    import matplotlib.pyplot as plt

    from .plots import loss_curves, save_figure
    from .train import LOG_NAME

    for job in jobs:
        log = json.loads((job.run_dir / LOG_NAME).read_text())["log"]
        fig = loss_curves(log, job.task.category)
        save_figure(fig, f"{job.task.category}_seed{job.task.seed}_losses", job.folder / FIGURES_DIR)
        plt.close(fig)


def quickstart(cfg: DMDDConfig, root: Path | DataSource, categories: Sequence[str], out: Path, *,
               skip_bad: bool = False, resume: bool = True, progress: bool | None = None) -> list[dict[str, Any]]:
    """Train (or load, when finished before) and evaluate each category with ``cfg.seed``: the benchmark's
    result files, tables and figures under ``out``, each run's loss curves, and ``quickstart.md`` with the short
    table, printed.
    Returns the task records."""
    run_benchmark(cfg, root, out, categories=categories, seeds=(cfg.seed,), pro_variants=False, resume=resume,
                  skip_bad=skip_bad, rank=Rank(), progress=progress, show=False)
    jobs = [Job(Task(c, cfg.seed), cfg, out) for c in categories]
    found = [r for r in map(load_result, (job.result_path for job in jobs)) if r is not None]
    table = quickstart_table([r["evaluation"] for r in found], [r["validation"] for r in found])
    skipped = sum(r["evaluation"].get("input", {}).get("num_skipped", 0) for r in found)
    meta = "\n".join(metadata_lines({**run_metadata(found), "bad files skipped": str(skipped)}))
    _loss_figures(jobs)
    print("\n" + table + "\n\n" + meta)
    write_text_files(out, {"quickstart.md": f"# Quickstart results\n\n{table}\n\n{meta}\n"})
    print(f"\nresults and figures in {out}/ (quickstart.md; the full tables in results.md)")
    return found
