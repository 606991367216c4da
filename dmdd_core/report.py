"""The quickstart: a one-seed benchmark of a dataset's categories (the built-in one by default), then a short
table of DMDD beside the naive baseline and the validation split. [ours]"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .benchmark import run_benchmark
from .config import DMDDConfig
from .data import DataSource
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


def quickstart_table(evaluations: Sequence[Mapping[str, Any]],
                     validation: Sequence[Mapping[str, float] | None] | None = None) -> str:
    """Per-category image and pixel AUROC of DMDD and of the naive baseline (``evaluations``: the dicts of
    :meth:`~dmdd_core.infer.Evaluation.to_dict`), with their mean; with ``validation`` (one dict or None per
    category, e.g. a run's last validation entry) two more columns give the validation split's AUROCs."""
    split = evaluations[0]["split"] if evaluations else "test"
    head = [f"{split} {h}" for h in ("image AUROC", "pixel AUROC", "baseline image AUROC", "baseline pixel AUROC")]
    with_val = validation is not None and any(validation)
    head += ["val image AUROC", "val pixel AUROC"] if with_val else []
    values = []
    for i, ev in enumerate(evaluations):
        row = [ev["dmdd"][k] for k in KEYS] + [ev["naive_baseline"][k] for k in KEYS]
        if with_val and validation is not None:
            row += [(validation[i] or {}).get(k, float("nan")) for k in KEYS]
        values.append(row)
    rows = [[ev["category"], *(f"{v:.3f}" for v in row)] for ev, row in zip(evaluations, values)]
    if len(evaluations) > 1:
        rows.append(["**mean**", *(f"**{v:.3f}**" for v in np.nanmean(values, axis=0))])
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
