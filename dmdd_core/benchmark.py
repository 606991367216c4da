"""The benchmark runner: train and evaluate every category of a dataset with one or more seeds, then tables
beside the published numbers.

One *task* is one (category, seed), run by :func:`dmdd_core.runner.run_jobs`. Each finished task leaves ``results/<category>__seed<k>.json`` under the
output folder; a run started again skips those and resumes an interrupted training from its checkpoint, so a
benchmark can be stopped (Ctrl-C, SIGTERM) and started again at any time. When launched by ``torchrun`` the tasks
are shared out over the ranks (rank r takes every ``world_size``-th task, on ``cuda:<local rank>``); every rank
writes its own result files, and the rank that finishes last merges them, so no rank waits on another.

Output folder::

    runs/<category>/seed<k>/    checkpoint.pt, log.json           (training, resumable)
    results/<category>__seed<k>.json                              (one per finished task)
    figures/                    <category>_seed<k>_examples.png (best and worst test images), curves.png
    results.md, results.csv, results_per_seed.csv, results.json   (merged)

Numbers are in percent, like the papers'. Every table states the resolution the metrics were computed at, the
seeds, the checkpoint rule and the PRO definition (METHOD.md section 8).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import DMDDConfig
from .data import DataSource, as_source
from .protocol import BASELINES, HEADLINE_METRICS, MAIN_METRICS, PRO_VARIANTS, label
from .runner import (
    FIGURES_DIR,
    RESULTS_DIR,
    Job,
    Rank,
    Task,
    count,
    csv_text,
    load_result,
    make_tasks,
    markdown_table,
    mean_std,
    metadata_lines,
    run_jobs,
    run_metadata,
    stat_text,
    write_text_files,
)


# --- published numbers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    """A method's reported mean over a dataset's categories, in percent (None: not reported)."""

    method: str
    source: str
    image_auroc: float | None
    pixel_auroc: float | None
    aupro: float | None


PUBLISHED: dict[str, tuple[Published, ...]] = {
    "mvtec": (
        Published("DMDD", "paper (Liu et al., ACM MM 2024)", None, 98.85, 96.13),
        Published("DeSTSeg", "paper (Zhang et al., CVPR 2023)", 98.6, 97.9, None),
        Published("DeSTSeg", "independent re-run", 97.9, 97.95, 92.8),
        Published("RD4AD", "paper", 98.5, 97.8, 93.9),
        Published("RD++", "paper", 99.4, 98.3, 95.0),
        Published("EfficientAD-M", "paper", 99.1, None, 93.5),
        Published("PatchCore (ensemble)", "paper", 99.6, 98.2, 94.9),
    ),
    "mpdd": (Published("DMDD", "as listed by a benchmark site", 98.10, 98.96, 97.66),),
}
"""Reported means from METHOD.md section 8. Each paper computed PRO its own way; those definitions are not
all the reference one, which is why the PRO variants table stands beside this one."""


# --- the whole benchmark ----------------------------------------------------------------------------------------
def run_benchmark(
    cfg: DMDDConfig,
    data: str | Path | DataSource,
    out: str | Path,
    *,
    categories: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    resolution: str = "input",
    pro_variants: bool = True,
    resume: bool = True,
    skip_bad: bool = False,
    rank: Rank | None = None,
    progress: bool | None = None,
    show: bool = True,
) -> Path | None:
    """Run this rank's share of the benchmark, then merge when every task is done; return the Markdown table's
    path, or None when other ranks still have tasks to finish (the last one merges). The merged table is
    printed unless ``show`` is False."""
    out = Path(out)
    source = as_source(data)
    rank = rank or Rank.from_env()
    cfg = cfg.replace(device=rank.device(cfg.device))
    tasks = make_tasks(list(categories or source.categories()), list(seeds))
    jobs = [Job(t, cfg.replace(seed=t.seed), out, f"{t.category} seed {t.seed}") for t in rank.shard(tasks)]
    what = f"{count(len(tasks), 'task')} ({count(len(tasks) // len(seeds), 'category')} x {count(len(seeds), 'seed')})"
    run_jobs(jobs, source, resolution=resolution, pro_variants=pro_variants, resume=resume, skip_bad=skip_bad,
             rank=rank, progress=progress, what=what)
    missing = [t for t in tasks if load_result(out / RESULTS_DIR / f"{t.key}.json") is None]
    if missing:
        print(f"{rank.tag}done; {len(missing)} tasks still running elsewhere ({', '.join(t.key for t in missing[:5])}"
              f"{'...' if len(missing) > 5 else ''}); the last rank to finish merges", flush=True)
        return None
    return merge(out, tasks, show=show)


# --- merging and tables ---------------------------------------------------------------------------------------
def summarise(records: Sequence[dict[str, Any]], keys: Sequence[str], which: str = "dmdd") -> dict[str, Any]:
    """Per category: mean and std over seeds of each metric (percent). Overall: the mean over categories for
    each seed, then mean and std of those over seeds (the spread of the dataset-level figure)."""
    by_category: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_category.setdefault(record["category"], []).append(record)
    seeds = sorted({r["seed"] for r in records})
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    for category, group in by_category.items():
        rows[category] = {}
        for key in keys:
            values = [100 * r["evaluation"][which][key] for r in group if key in r["evaluation"][which]]
            if values:
                rows[category][key] = mean_std(values)
    overall: dict[str, tuple[float, float]] = {}
    for key in keys:
        per_seed = []
        for seed in seeds:
            values = [100 * r["evaluation"][which][key] for r in records if r["seed"] == seed and key in r["evaluation"][which]]
            if len(values) == len(by_category):
                per_seed.append(float(np.mean(values)))
        if per_seed:
            overall[key] = mean_std(per_seed)
    return {"categories": rows, "mean": overall, "seeds": seeds}


def _dataset_kind(records: Sequence[dict[str, Any]]) -> str:
    return str(records[0]["evaluation"].get("data", {}).get("kind", "")) if records else ""


def _metadata(records: Sequence[dict[str, Any]], complete: bool, total: int) -> list[str]:
    lines = metadata_lines(run_metadata(records))
    return lines if complete else [f"- **incomplete: {len(records)} of {total} tasks done**", *lines]


def _metric_rows(summary: dict[str, Any], keys: Sequence[str], n_seeds: int) -> list[list[str]]:
    """Per category, then the bold mean: each key's mean ± std over seeds (percent)."""
    rows = [[category, *(stat_text(row.get(k), n_seeds) for k in keys)] for category, row in summary["categories"].items()]
    return rows + [["**mean**", *(f"**{stat_text(summary['mean'].get(k), n_seeds)}**" for k in keys)]]


def markdown_report(records: Sequence[dict[str, Any]], total: int | None = None) -> str:
    """The Markdown report of finished task records: per category table, beside the published numbers, PRO
    variants, baseline, wall time per category, and the metadata."""
    total = total if total is not None else len(records)
    main = summarise(records, MAIN_METRICS)
    n_seeds = len(main["seeds"])
    kind = _dataset_kind(records)
    out = [f"# Benchmark: {kind or 'dataset'}, {records[0]['preset']} preset", "",
           *_metadata(records, len(records) == total, total), "", "## Per category (percent)", ""]
    seconds: dict[str, list[float]] = {}
    for r in records:
        seconds.setdefault(r["category"], []).append(r["train_seconds"] + r["eval_seconds"])
    rows = _metric_rows(main, MAIN_METRICS, n_seeds)
    for row in rows:
        row.append(f"{np.mean(seconds[row[0]]):.0f}" if row[0] in seconds else "")
    out += markdown_table(["category", *map(label, MAIN_METRICS), "train + eval s"], rows) + [""]

    out += ["## Beside the published numbers (mean over categories, percent)", ""]
    m = main["mean"]
    seeds_text = f"{n_seeds} seed{'s' if n_seeds > 1 else ''}"
    rows = [["**DMDD (this run)**", f"this package, {records[0]['preset']} preset, {seeds_text}",
             *(stat_text(m.get(k), n_seeds) for k in HEADLINE_METRICS)]]
    rows += [[p.method, p.source, *map(stat_text, (p.image_auroc, p.pixel_auroc, p.aupro))] for p in PUBLISHED.get(kind, ())]
    if len(rows) == 1:
        rows.append(["–", f"no published numbers for this dataset ({kind or 'unknown'})", "–", "–", "–"])
    out += markdown_table(["method", "source", "image AUROC", "pixel AUROC", "PRO"], rows)
    out += ["", "Published PRO figures were computed by each paper's own code; not all use the reference definition "
            "(METHOD.md section 8), so the next table shows what the variants give on this run's maps.", ""]

    variants = [k for k in PRO_VARIANTS if all(k in r["evaluation"]["dmdd"] for r in records)]
    if len(variants) > 1:
        out += ["## The PRO variants on the same maps (percent)", ""]
        heads = ["reference AUPRO" if k == "aupro" else label(k) for k in variants]
        out += markdown_table(["category", *heads], _metric_rows(summarise(records, variants), variants, n_seeds))
        out += [""]

    out += baseline_lines(records, n_seeds)
    return "\n".join(out + [""])


def baseline_lines(records: Sequence[dict[str, Any]], n_seeds: int) -> list[str]:
    """The baselines' table (:data:`~dmdd_core.protocol.BASELINES`): per baseline its dataset means over the same
    tasks beside DMDD's, and its fit time per category."""
    heads = ["method", *map(label, HEADLINE_METRICS), "fit or train s per category"]
    train = np.mean([r["train_seconds"] for r in records])
    rows = [["DMDD (this run)", *(stat_text(summarise(records, HEADLINE_METRICS)["mean"].get(k), n_seeds)
                                  for k in HEADLINE_METRICS), f"{train:.0f}"]]
    for key, name in BASELINES.items():
        if not all(r["evaluation"].get(key) for r in records):
            continue
        fits = [r["evaluation"].get(f"{key}_fit_seconds") for r in records]
        fit = f"{np.mean(fits):.1f}" if all(f is not None for f in fits) else "–"
        mean = summarise(records, HEADLINE_METRICS, which=key)["mean"]
        rows.append([name, *(stat_text(mean.get(k), n_seeds) for k in HEADLINE_METRICS), fit])
    absent = "" if all(k in r["evaluation"]["dmdd"] for r in records for k in HEADLINE_METRICS) else (
        " '–': absent, the test split has image labels only.")
    return ["## Beside the baselines on the same test split (mean over categories, percent)", "",
            "PaDiM fits a Gaussian per position to the same teacher's features, with no training: a learned model "
            "below it has not yet learned more than the teacher already knows. The mean-image baseline is naive: "
            "when it scores well, the test set is too easy to show anything." + absent, "",
            *markdown_table(heads, rows), "",
            "Per category:", "",
            *markdown_table(["category", *(f"{who} {label(k)}" for who in ("DMDD", "PaDiM") for k in HEADLINE_METRICS)],
                            _side_by_side(records, n_seeds))]


def _side_by_side(records: Sequence[dict[str, Any]], n_seeds: int) -> list[list[str]]:
    """Per category: DMDD's headline metrics, then PaDiM's (mean ± std over seeds, percent)."""
    ours = _metric_rows(summarise(records, HEADLINE_METRICS), HEADLINE_METRICS, n_seeds)
    if not all(r["evaluation"].get("padim") for r in records):
        return [row + ["–"] * len(HEADLINE_METRICS) for row in ours]
    theirs = _metric_rows(summarise(records, HEADLINE_METRICS, which="padim"), HEADLINE_METRICS, n_seeds)
    return [a + b[1:] for a, b in zip(ours, theirs)]


def _csv_files(records: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(per category mean/std and overall mean, one row per task) as CSV text."""
    keys = [*MAIN_METRICS, *PRO_VARIANTS[1:]]
    main = summarise(records, keys)
    fields = ["category", "seeds"] + [f for k in keys for f in (k, f"{k}_std")]
    rows = []
    for name, values in [*main["categories"].items(), ("mean", main["mean"])]:
        row: dict[str, Any] = {"category": name, "seeds": " ".join(map(str, main["seeds"]))}
        for k, (mean, std) in values.items():
            row[k], row[f"{k}_std"] = round(mean, 3), round(std, 3)
        rows.append(row)
    baseline_fields = [f"{prefix}_{k}" for prefix in ("padim", "baseline") for k in HEADLINE_METRICS]
    per_seed_fields = ["category", "seed", *keys, *baseline_fields, "padim_fit_seconds",
                       "num_images", "num_defective", "train_seconds", "eval_seconds", "rank", "device"]
    per_seed = []
    for r in records:
        ev = r["evaluation"]
        row = {"category": r["category"], "seed": r["seed"], "num_images": ev["num_images"],
               "num_defective": ev["num_defective"], "train_seconds": r["train_seconds"],
               "eval_seconds": r["eval_seconds"], "rank": r["rank"], "device": r["device"]}
        row.update({k: round(100 * ev["dmdd"][k], 3) for k in keys if k in ev["dmdd"]})
        for prefix, key in (("padim", "padim"), ("baseline", "naive_baseline")):
            row.update({f"{prefix}_{k}": round(100 * v, 3) for k, v in ev.get(key, {}).items() if k in HEADLINE_METRICS})
        row["padim_fit_seconds"] = ev.get("padim_fit_seconds")
        per_seed.append(row)
    return csv_text(fields, rows), csv_text(per_seed_fields, per_seed)


def curve_figure(records: Sequence[dict[str, Any]]):
    """Image ROC, pixel ROC and PRO curves of every category (the first seed of each), one panel each."""
    from .plots import curve_panels

    first: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        first.setdefault(r["category"], r)

    def panel(curve: str, metric: str) -> dict[str, tuple[list[float], list[float]]]:
        return {f"{c} ({100 * r['evaluation']['dmdd'][metric]:.1f})": (r["curves"][curve]["x"], r["curves"][curve]["y"])
                for c, r in first.items() if curve in r["curves"]}

    return curve_panels(
        [
            ("image ROC (AUROC)", "false-positive rate", "true-positive rate", panel("image_roc", "image_auroc")),
            ("pixel ROC (AUROC)", "false-positive rate", "true-positive rate", panel("pixel_roc", "pixel_auroc")),
            ("PRO curve to FPR 0.3 (AUPRO)", "false-positive rate", "per-region overlap", panel("pro", "aupro")),
        ],
        diagonal=(True, True, False),
        xlim=(None, None, 0.3),
    )


def merge(out: str | Path, tasks: Sequence[Task] | None = None, show: bool = True) -> Path:
    """Gather the result files under ``out`` (of ``tasks``, or all there are) into results.md, results.csv,
    results_per_seed.csv, results.json and the curve figure; return the Markdown file's path (the table is
    printed unless ``show`` is False)."""
    import matplotlib.pyplot as plt

    from .plots import save_figure

    out = Path(out)
    if tasks is None:
        paths = sorted((out / RESULTS_DIR).glob("*__seed*.json"))
        records = [r for r in map(load_result, paths) if r is not None]
        total = len(records)
    else:
        found = [load_result(out / RESULTS_DIR / f"{t.key}.json") for t in tasks]
        records = [r for r in found if r is not None]
        total = len(tasks)
    if not records:
        raise FileNotFoundError(f"no finished tasks under {out / RESULTS_DIR}; run the benchmark first")
    records.sort(key=lambda r: (r["category"], r["seed"]))
    report = markdown_report(records, total)
    summary_csv, per_seed_csv = _csv_files(records)
    keys = [*MAIN_METRICS, *PRO_VARIANTS[1:]]
    slim = [{k: v for k, v in r.items() if k != "curves"} for r in records]
    write_text_files(out, {
        "results.md": report, "results.csv": summary_csv, "results_per_seed.csv": per_seed_csv,
        "results.json": json.dumps({"complete": len(records) == total, "tasks_total": total,
                                    "summary": summarise(records, keys), "records": slim}, indent=1),
    })
    fig = curve_figure(records)
    save_figure(fig, "curves", out / FIGURES_DIR)
    plt.close(fig)
    if show:
        print(report, flush=True)
    print(f"results in {out}/ (results.md, results.csv, results_per_seed.csv, results.json, {FIGURES_DIR}/)", file=sys.stderr)
    return out / "results.md"


def _published_dmdd(records: Sequence[dict[str, Any]]) -> Published | None:
    """The paper's DMDD means for the records' dataset, or None when none were published."""
    return next((p for p in PUBLISHED.get(_dataset_kind(records), ()) if p.method == "DMDD"), None)


def gap_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """A Markdown table of this run's means beside the paper's DMDD means, the gap, and how much of the PRO gap
    the per-image PRO definition alone accounts for on the same maps (empty when the dataset has no published
    DMDD numbers)."""
    paper = _published_dmdd(records)
    if paper is None:
        return []
    keys = ["image_auroc", "pixel_auroc", "aupro", "aupro_per_image"]
    mean = summarise(records, keys)["mean"]
    n_seeds = len({r["seed"] for r in records})
    lines = [f"| metric | this run | DMDD, {paper.source} | gap (this run − paper) |", "|---|---|---|---|"]
    for key, name in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (reference)")):
        ours, theirs = mean.get(key), getattr(paper, key)
        gap = f"{ours[0] - theirs:+.2f}" if ours is not None and theirs is not None else "–"
        lines.append(f"| {name} | {stat_text(ours, n_seeds)} | {stat_text(theirs)} | {gap} |")
    if "aupro_per_image" in mean and "aupro" in mean and paper.aupro is not None:
        shift = mean["aupro_per_image"][0] - mean["aupro"][0]
        lines.append(f"| AUPRO, per-image variant | {stat_text(mean['aupro_per_image'], n_seeds)} | {stat_text(paper.aupro)} | "
                     f"{mean['aupro_per_image'][0] - paper.aupro:+.2f} (the definition alone moves it {shift:+.2f}) |")
    return lines


def category_figure(records: Sequence[dict[str, Any]], keys: Sequence[str] = HEADLINE_METRICS):
    """One panel per metric: each category's seeds (dots) and mean ± std (diamond), the dataset mean as a solid
    line and the paper's DMDD mean, when there is one, as a dashed line."""
    from .plots import figure

    summary = summarise(records, list(keys))
    categories = list(summary["categories"])
    paper = _published_dmdd(records)
    fig, axes = figure(1, len(keys), size=(4.0 * len(keys), 0.32 * len(categories) + 1.6), sharey=True)
    ys = np.arange(len(categories))[::-1]
    for ax, key in zip(axes[0], keys):
        for y, category in zip(ys, categories):
            if key not in summary["categories"][category]:
                continue  # absent: image labels only
            values = [100 * r["evaluation"]["dmdd"][key] for r in records if r["category"] == category]
            mean, std = summary["categories"][category][key]
            ax.scatter(values, [y] * len(values), s=12, color="tab:blue", alpha=0.5, zorder=2)
            ax.errorbar(mean, y, xerr=std, fmt="D", color="tab:blue", ms=5, capsize=3, zorder=3)
        if key in summary["mean"]:
            ax.axvline(summary["mean"][key][0], color="tab:blue", lw=1.2, label="this run's mean")
        published = getattr(paper, key, None) if paper else None
        if published is not None:
            ax.axvline(published, color="tab:red", ls="--", lw=1.2, label=f"DMDD paper ({published:.2f})")
        low = min((100 * r["evaluation"]["dmdd"][key] for r in records if key in r["evaluation"]["dmdd"]), default=95)
        ax.set_xlim(max(0.0, low - 5), 100.5)
        ax.set_title(label(key))
        ax.set_xlabel("percent (seeds: dots; mean ± std: diamond)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    axes[0, 0].set_yticks(ys, categories)
    fig.tight_layout()
    return fig
