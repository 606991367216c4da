"""The benchmark runner: train and evaluate every category of a dataset with one or more seeds, then tables
beside the published numbers.

One *task* is one (category, seed). Each finished task leaves ``results/<category>__seed<k>.json`` under the
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

import csv
import io
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DMDDConfig
from .data import DataSource, as_source
from .train import RESUMABLE_DIFFERENCES, atomic_write_text, config_differences

RESULTS_DIR = "results"
RUNS_DIR = "runs"
FIGURES_DIR = "figures"
CHECKPOINT_RULE = "last step (no checkpoint chosen on any split)"
AUPRO_DEFINITION = (
    "reference AUPRO: dataset-level, 8-connected ground-truth regions, FPR over all anomaly-free pixels of the "
    "category (good images included), exact curve, linear interpolation at FPR 0.3, area / 0.3"
)

METRICS: tuple[tuple[str, str], ...] = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("pixel_ap", "pixel AP"),
    ("image_f1_max", "image F1-max"),
    ("pixel_f1_max", "pixel F1-max"),
)
"""The metrics of the main table, in its column order (keys of :attr:`Evaluation.metrics`)."""
PRO_VARIANTS: tuple[tuple[str, str], ...] = (
    ("aupro", "reference AUPRO"),
    ("aupro_per_image", "per-image variant"),
    ("aupro_linear_200", "200-threshold variant"),
)
BASELINE_METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro")
CURVE_POINTS = 300
"""Points kept per stored curve (ROC, PRO) in a task's result file."""


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
        Published("PatchCore", "paper", 99.6, 98.2, 93.5),
    ),
    "mpdd": (Published("DMDD", "as listed by a benchmark site", 98.10, 98.96, 97.66),),
}
"""Reported means from METHOD.md section 8. Each paper computed PRO its own way; those definitions are not
all the reference one, which is why the PRO variants table stands beside this one."""


# --- tasks and ranks ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    category: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.category}__seed{self.seed}"


@dataclass(frozen=True)
class Rank:
    """This process's place among ``torchrun`` workers (rank 0 of 1 when not launched by it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Rank:
        """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK; a clear error when they do not fit together."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} does not fit WORLD_SIZE={world}")
        return cls(rank, world, local)

    def shard(self, tasks: Sequence[Task]) -> list[Task]:
        """Every ``world_size``-th task, starting at this rank: each task goes to exactly one rank."""
        return list(tasks[self.rank :: self.world_size])

    def device(self, requested: str) -> str:
        """``auto`` on a multi-process CUDA run means this rank's own GPU, ``cuda:<local rank>``."""
        if requested == "auto" and self.world_size > 1 and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested


def make_tasks(categories: Sequence[str], seeds: Sequence[int]) -> list[Task]:
    """Category-major order: every seed of a category, then the next category."""
    if not categories:
        raise ValueError("no categories to benchmark")
    if not seeds:
        raise ValueError("no seeds given")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {list(seeds)}")
    return [Task(c, s) for c in categories for s in seeds]


# --- environment ------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Versions of Python and the packages the numbers depend on."""
    found = {"python": platform.python_version()}
    for name in ("dmdd", "torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "scikit-image"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"CPU, {torch.get_num_threads()} threads ({platform.machine()}, {platform.system()})"


# --- one task -------------------------------------------------------------------------------------------------
def load_result(path: Path) -> dict[str, Any] | None:
    """A task's result file, or None when it is missing or unreadable (an unreadable one is done again)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_done(result: dict[str, Any] | None, cfg: DMDDConfig, resolution: str, pro_variants: bool, path: Path) -> bool:
    """A finished task of the same configuration and evaluation settings. A result of another configuration is
    an error (mixing them would corrupt the table); one of other evaluation settings is evaluated again."""
    if result is None:
        return False
    difference = config_differences(result.get("config", {}), cfg, RESUMABLE_DIFFERENCES | {"seed"})
    if difference:
        raise ValueError(
            f"{path} was made with another configuration ({'; '.join(difference)}); "
            "use another --out, or --no-resume to train everything again"
        )
    evaluation = result.get("evaluation", {})
    return evaluation.get("metric_resolution_setting") == resolution and bool(result.get("pro_variants")) == pro_variants


def _subsample(x: np.ndarray, y: np.ndarray, points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """At most ``points`` points of a curve, the first and last kept."""
    if len(x) > points:
        index = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
        x, y = x[index], y[index]
    return {"x": [round(float(v), 6) for v in x], "y": [round(float(v), 6) for v in y]}


def curves(preds: Any) -> dict[str, dict[str, list[float]]]:
    """Image ROC, pixel ROC and the reference PRO curve (to FPR 0.3) of one evaluation's predictions, at the
    model's input resolution, subsampled for storage."""
    from sklearn.metrics import roc_curve

    from .metrics import FPR_LIMIT, pro_curve

    fpr, tpr, _ = roc_curve(preds.labels, preds.scores)
    pixel_fpr, pixel_tpr, _ = roc_curve(preds.masks.ravel(), preds.maps.ravel(), drop_intermediate=True)
    pro_fpr, pro = pro_curve(preds.masks, preds.maps, FPR_LIMIT)
    inside = pro_fpr <= FPR_LIMIT
    return {
        "image_roc": _subsample(fpr, tpr),
        "pixel_roc": _subsample(pixel_fpr, pixel_tpr),
        "pro": _subsample(pro_fpr[inside], pro[inside]),
    }


def run_task(
    task: Task,
    cfg: DMDDConfig,
    source: DataSource,
    out: Path,
    *,
    teacher: Any = None,
    resolution: str = "input",
    pro_variants: bool = True,
    resume: bool = True,
    skip_bad: bool = False,
    rank: Rank = Rank(),
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train (or resume, or load when finished) and evaluate one task; write and return its result.

    Wall time is counted over every session of the task: a session stopped by Ctrl-C or SIGTERM adds its time
    to ``runs/<category>/seed<k>/wall_time.json`` before the checkpoint is left for the next one.
    """
    import matplotlib.pyplot as plt

    from .fit import fit
    from .infer import evaluate
    from .plots import save_figure
    from .report import example_figure
    from .train import select_device

    run_dir = out / RUNS_DIR / task.category / f"seed{task.seed}"
    timing_path = run_dir / "wall_time.json"
    spent = (load_result(timing_path) or {}).get("train_seconds", 0.0) if resume else 0.0
    task_cfg = cfg.replace(seed=task.seed)
    started = time.perf_counter()
    try:
        result = fit(task_cfg, source, task.category, run_dir, teacher=teacher, resume=resume, skip_bad=skip_bad, progress=progress)
    except KeyboardInterrupt:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps({"train_seconds": spent + time.perf_counter() - started}), timing_path)
        raise
    train_seconds = spent + time.perf_counter() - started
    atomic_write_text(json.dumps({"train_seconds": train_seconds}), timing_path)
    started = time.perf_counter()
    ev = evaluate(result.model, source, task.category, skip_bad=skip_bad, resolution=resolution, pro_variants=pro_variants, progress=progress)
    eval_seconds = time.perf_counter() - started
    thresholds = result.validation.get("thresholds") or {}
    fig = example_figure(ev, pixel_threshold=thresholds.get("pixel"))
    figure = save_figure(fig, f"{task.key.replace('__', '_')}_examples", out / FIGURES_DIR)
    plt.close(fig)
    device = select_device(task_cfg.device)
    history = result.validation.get("history", [])
    record = {
        "category": task.category,
        "seed": task.seed,
        "config": task_cfg.to_dict(),
        "preset": cfg.preset_name,
        "teacher": {"name": result.model.teacher.name, "source": result.model.teacher.source},
        "evaluation": ev.to_dict(),
        "pro_variants": pro_variants,
        "validation": history[-1] if history else None,
        "thresholds": thresholds,
        "curves": curves(ev.predictions),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "resumed_from_step": result.resumed_from,
        "rank": rank.rank,
        "world_size": rank.world_size,
        "device": describe_device(device),
        "precision": result.precision,
        "versions": versions(),
        "figure": figure.name,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(json.dumps(record, indent=1), out / RESULTS_DIR / f"{task.key}.json")
    return record


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
    from .model import build_teacher

    if resolution not in ("input", "original"):
        raise ValueError(f"resolution must be 'input' or 'original', got {resolution!r}")
    out = Path(out)
    source = as_source(data)
    rank = rank or Rank.from_env()
    cfg = cfg.replace(device=rank.device(cfg.device))
    tasks = make_tasks(list(categories or source.categories()), list(seeds))
    mine = rank.shard(tasks)
    tag = f"[rank {rank.rank}/{rank.world_size}] " if rank.world_size > 1 else ""
    todo = []
    for task in mine:
        path = out / RESULTS_DIR / f"{task.key}.json"
        if resume and _is_done(load_result(path), cfg, resolution, pro_variants, path):
            print(f"{tag}{task.category} seed {task.seed}: done before, skipped ({path})", flush=True)
        else:
            todo.append(task)
    print(f"{tag}{len(tasks)} tasks ({len(tasks) // len(seeds)} categories x {len(seeds)} seeds); this process: "
          f"{len(mine)}, {len(mine) - len(todo)} already done", flush=True)
    teacher = build_teacher(cfg) if todo else None
    spent: list[float] = []
    for i, task in enumerate(todo, 1):
        started = time.perf_counter()
        record = run_task(task, cfg, source, out, teacher=teacher, resolution=resolution, pro_variants=pro_variants,
                          resume=resume, skip_bad=skip_bad, rank=rank, progress=progress)
        spent.append(time.perf_counter() - started)
        m = record["evaluation"]["dmdd"]
        eta = np.mean(spent) * (len(todo) - i)
        print(f"{tag}[{i}/{len(todo)}] {task.category} seed {task.seed}: image AUROC {100 * m['image_auroc']:.2f}, "
              f"pixel AUROC {100 * m['pixel_auroc']:.2f}, AUPRO {100 * m['aupro']:.2f} "
              f"({spent[-1]:.0f} s; about {eta / 60:.0f} min left for this process)", flush=True)
    missing = [t for t in tasks if load_result(out / RESULTS_DIR / f"{t.key}.json") is None]
    if missing:
        print(f"{tag}done; {len(missing)} tasks still running elsewhere ({', '.join(t.key for t in missing[:5])}"
              f"{'...' if len(missing) > 5 else ''}); the last rank to finish merges", flush=True)
        return None
    return merge(out, tasks, show=show)


# --- merging and tables ---------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _fmt(stat: tuple[float, float] | float | None, seeds: int = 1) -> str:
    """A (mean, std) pair as "m ± s" (just "m" for one seed), a single value as "m", None as "–"."""
    if stat is None:
        return "–"
    mean, std = stat if isinstance(stat, tuple) else (stat, 0.0)
    return f"{mean:.2f} ± {std:.2f}" if seeds > 1 else f"{mean:.2f}"


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
                rows[category][key] = _mean_std(values)
    overall: dict[str, tuple[float, float]] = {}
    for key in keys:
        per_seed = []
        for seed in seeds:
            values = [100 * r["evaluation"][which][key] for r in records if r["seed"] == seed and key in r["evaluation"][which]]
            if len(values) == len(by_category):
                per_seed.append(float(np.mean(values)))
        if per_seed:
            overall[key] = _mean_std(per_seed)
    return {"categories": rows, "mean": overall, "seeds": seeds}


def _dataset_kind(records: Sequence[dict[str, Any]]) -> str:
    return str(records[0]["evaluation"].get("data", {}).get("kind", "")) if records else ""


def metadata_lines(records: Sequence[dict[str, Any]], complete: bool, total: int) -> list[str]:
    first = records[0]
    ev = first["evaluation"]
    seeds = sorted({r["seed"] for r in records})
    devices = sorted({r["device"] for r in records})
    wall = sum(r["train_seconds"] + r["eval_seconds"] for r in records)
    lines = [
        f"- dataset: {ev.get('data', {}).get('kind', '?')} at `{ev.get('data', {}).get('root', '?')}`, "
        f"{len({r['category'] for r in records})} categories, test split",
        f"- preset: {first['preset']}; teacher {first['teacher']['name']} ({first['teacher']['source']}); "
        f"input {first['config']['image_size']}x{first['config']['image_size']}",
        f"- metrics computed at: {ev.get('metric_resolution', '?')}",
        f"- seeds: {', '.join(map(str, seeds))}" + (" (mean ± sample std over seeds)" if len(seeds) > 1 else ""),
        f"- checkpoint rule: {CHECKPOINT_RULE}; validation split: {first['config']['val_fraction']:.0%} of the "
        f"training images held out (thresholds of the figures' predicted masks)",
        f"- PRO: {AUPRO_DEFINITION}",
        f"- device: {'; '.join(devices)}; ranks: {max(r['world_size'] for r in records)}; precision: "
        f"{'; '.join(sorted({r.get('precision', 'unrecorded') for r in records}))}",
        f"- wall time: {wall / 60:.1f} min in all (train + evaluate, summed over tasks and ranks)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()),
    ]
    if not complete:
        lines.insert(0, f"- **incomplete: {len(records)} of {total} tasks done**")
    return lines


def markdown_report(records: Sequence[dict[str, Any]], total: int | None = None) -> str:
    """The Markdown report of finished task records: per category table, beside the published numbers, PRO
    variants, baseline, wall time per category, and the metadata."""
    total = total if total is not None else len(records)
    keys = [k for k, _ in METRICS]
    main = summarise(records, keys)
    n_seeds = len(main["seeds"])
    kind = _dataset_kind(records)
    out = [f"# Benchmark: {kind or 'dataset'}, {records[0]['preset']} preset", "", *metadata_lines(records, len(records) == total, total), ""]

    out += ["## Per category (percent)", "", "| category | " + " | ".join(t for _, t in METRICS) + " | train + eval s |",
            "|---" * (len(METRICS) + 2) + "|"]
    seconds: dict[str, list[float]] = {}
    for r in records:
        seconds.setdefault(r["category"], []).append(r["train_seconds"] + r["eval_seconds"])
    for category, row in main["categories"].items():
        cells = [_fmt(row[k], n_seeds) if k in row else "–" for k in keys]
        out.append(f"| {category} | " + " | ".join(cells) + f" | {np.mean(seconds[category]):.0f} |")
    cells = [f"**{_fmt(main['mean'][k], n_seeds)}**" if k in main["mean"] else "–" for k in keys]
    out += ["| **mean** | " + " | ".join(cells) + " | |", ""]

    out += ["## Beside the published numbers (mean over categories, percent)", ""]
    published = PUBLISHED.get(kind, ())
    out += ["| method | source | image AUROC | pixel AUROC | PRO |", "|---|---|---|---|---|"]
    m = main["mean"]
    seeds_text = f"{n_seeds} seed{'s' if n_seeds > 1 else ''}"
    out.append(f"| **DMDD (this run)** | this package, {records[0]['preset']} preset, {seeds_text} | "
               + " | ".join(_fmt(m[k], n_seeds) if k in m else "–" for k in ("image_auroc", "pixel_auroc", "aupro")) + " |")
    for p in published:
        out.append(f"| {p.method} | {p.source} | " + " | ".join(_fmt(v) for v in (p.image_auroc, p.pixel_auroc, p.aupro)) + " |")
    if not published:
        out.append(f"| – | no published numbers for this dataset ({kind or 'unknown'}) | – | – | – |")
    out += ["", "Published PRO figures were computed by each paper's own code; not all use the reference definition "
            "(METHOD.md section 8), so the next table shows what the variants give on this run's maps.", ""]

    variants = [(k, t) for k, t in PRO_VARIANTS if all(k in r["evaluation"]["dmdd"] for r in records)]
    if len(variants) > 1:
        pro = summarise(records, [k for k, _ in variants])
        out += ["## The PRO variants on the same maps (percent)", "",
                "| category | " + " | ".join(t for _, t in variants) + " |", "|---" * (len(variants) + 1) + "|"]
        for category, row in pro["categories"].items():
            out.append(f"| {category} | " + " | ".join(_fmt(row[k], n_seeds) for k, _ in variants) + " |")
        out += ["| **mean** | " + " | ".join(f"**{_fmt(pro['mean'][k], n_seeds)}**" for k, _ in variants) + " |", ""]

    base = summarise(records, BASELINE_METRICS, which="naive_baseline")
    out += ["## Naive baseline on the same test split (percent)", "",
            "Each pixel's distance to the mean training image: what a method must beat to have learned anything.", "",
            "| category | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|"]
    for category, row in base["categories"].items():
        out.append(f"| {category} | " + " | ".join(_fmt(row[k], n_seeds) for k in BASELINE_METRICS) + " |")
    out += ["| **mean** | " + " | ".join(f"**{_fmt(base['mean'][k], n_seeds)}**" for k in BASELINE_METRICS) + " |", ""]
    return "\n".join(out)


def _csv_text(fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _csv_files(records: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(per category mean/std and overall mean, one row per task) as CSV text."""
    keys = [k for k, _ in METRICS] + [k for k, _ in PRO_VARIANTS[1:]]
    main = summarise(records, keys)
    fields = ["category", "seeds"] + [f for k in keys for f in (k, f"{k}_std")]
    rows = []
    for name, values in [*main["categories"].items(), ("mean", main["mean"])]:
        row: dict[str, Any] = {"category": name, "seeds": " ".join(map(str, main["seeds"]))}
        for k, (mean, std) in values.items():
            row[k], row[f"{k}_std"] = round(mean, 3), round(std, 3)
        rows.append(row)
    per_seed_fields = ["category", "seed", *keys, *(f"baseline_{k}" for k in BASELINE_METRICS),
                       "num_images", "num_defective", "train_seconds", "eval_seconds", "rank", "device"]
    per_seed = []
    for r in records:
        ev = r["evaluation"]
        row = {"category": r["category"], "seed": r["seed"], "num_images": ev["num_images"],
               "num_defective": ev["num_defective"], "train_seconds": r["train_seconds"],
               "eval_seconds": r["eval_seconds"], "rank": r["rank"], "device": r["device"]}
        row.update({k: round(100 * ev["dmdd"][k], 3) for k in keys if k in ev["dmdd"]})
        row.update({f"baseline_{k}": round(100 * ev["naive_baseline"][k], 3) for k in BASELINE_METRICS})
        per_seed.append(row)
    return _csv_text(fields, rows), _csv_text(per_seed_fields, per_seed)


def curve_figure(records: Sequence[dict[str, Any]]):
    """Image ROC, pixel ROC and PRO curves of every category (the first seed of each), one panel each."""
    from .plots import curve_panels

    first: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        first.setdefault(r["category"], r)

    def panel(curve: str, metric: str) -> dict[str, tuple[list[float], list[float]]]:
        return {f"{c} ({100 * r['evaluation']['dmdd'][metric]:.1f})": (r["curves"][curve]["x"], r["curves"][curve]["y"])
                for c, r in first.items()}

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
    keys = [k for k, _ in METRICS] + [k for k, _ in PRO_VARIANTS[1:]]
    slim = [{k: v for k, v in r.items() if k != "curves"} for r in records]
    atomic_write_text(report + "\n", out / "results.md")
    atomic_write_text(summary_csv, out / "results.csv")
    atomic_write_text(per_seed_csv, out / "results_per_seed.csv")
    atomic_write_text(json.dumps({"complete": len(records) == total, "tasks_total": total,
                                  "summary": summarise(records, keys), "records": slim}, indent=1), out / "results.json")
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
    for key, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (reference)")):
        ours, theirs = mean.get(key), getattr(paper, key)
        gap = f"{ours[0] - theirs:+.2f}" if ours is not None and theirs is not None else "–"
        lines.append(f"| {label} | {_fmt(ours, n_seeds) if ours else '–'} | {_fmt(theirs)} | {gap} |")
    if "aupro_per_image" in mean and "aupro" in mean and paper.aupro is not None:
        shift = mean["aupro_per_image"][0] - mean["aupro"][0]
        lines.append(f"| AUPRO, per-image variant | {_fmt(mean['aupro_per_image'], n_seeds)} | {_fmt(paper.aupro)} | "
                     f"{mean['aupro_per_image'][0] - paper.aupro:+.2f} (the definition alone moves it {shift:+.2f}) |")
    return lines


def category_figure(records: Sequence[dict[str, Any]], keys: Sequence[str] = ("image_auroc", "pixel_auroc", "aupro")):
    """One panel per metric: each category's seeds (dots) and mean ± std (diamond), the dataset mean as a solid
    line and the paper's DMDD mean, when there is one, as a dashed line."""
    from .plots import figure

    labels = dict(METRICS)
    summary = summarise(records, list(keys))
    categories = list(summary["categories"])
    paper = _published_dmdd(records)
    fig, axes = figure(1, len(keys), size=(4.0 * len(keys), 0.32 * len(categories) + 1.6), sharey=True)
    ys = np.arange(len(categories))[::-1]
    for ax, key in zip(axes[0], keys):
        for y, category in zip(ys, categories):
            values = [100 * r["evaluation"]["dmdd"][key] for r in records if r["category"] == category]
            mean, std = summary["categories"][category][key]
            ax.scatter(values, [y] * len(values), s=12, color="tab:blue", alpha=0.5, zorder=2)
            ax.errorbar(mean, y, xerr=std, fmt="D", color="tab:blue", ms=5, capsize=3, zorder=3)
        if key in summary["mean"]:
            ax.axvline(summary["mean"][key][0], color="tab:blue", lw=1.2, label="this run's mean")
        published = getattr(paper, key, None) if paper else None
        if published is not None:
            ax.axvline(published, color="tab:red", ls="--", lw=1.2, label=f"DMDD paper ({published:.2f})")
        low = min(100 * r["evaluation"]["dmdd"][key] for r in records)
        ax.set_xlim(max(0.0, low - 5), 100.5)
        ax.set_title(labels[key])
        ax.set_xlabel("percent (seeds: dots; mean ± std: diamond)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    axes[0, 0].set_yticks(ys, categories)
    fig.tight_layout()
    return fig
