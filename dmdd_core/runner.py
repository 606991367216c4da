"""The task runner under the quickstart, the benchmark and the ablation. [ours]

A *task* is one (category, seed) trained and evaluated with one config into one folder. :func:`run_jobs` runs a
list of them: it skips tasks finished before with the same settings, resumes an interrupted training from its
checkpoint, and prints each result with the time left. Each finished task leaves one result record::

    <folder>/runs/<category>/seed<k>/   checkpoint.pt, log.json, wall_time.json   (training, resumable)
    <folder>/results/<category>__seed<k>.json                                      (the record)
    <folder>/figures/<category>_seed<k>_examples.png                               (best and worst test images)

The table helpers (:func:`stat_text`, :func:`markdown_table`, :func:`csv_text`, :func:`write_text_files`) and the
metadata (:func:`versions`, :func:`describe_device`) are shared by every report.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DMDDConfig
from .data import DataSource
from .protocol import (
    AUPRO_DEFINITION,
    CHECKPOINT_RULE,
    FPR_LIMIT,
    HEADLINE_METRICS,
    RESOLUTIONS,
    THRESHOLD_RULE,
    label,
)
from .train import RESUMABLE_DIFFERENCES, atomic_write_text, config_differences

RESULTS_DIR = "results"
RUNS_DIR = "runs"
FIGURES_DIR = "figures"
CURVE_POINTS = 300
"""Points kept per stored curve (ROC, PRO) in a task's result file."""


# --- tasks and ranks ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    category: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.category}__seed{self.seed}"


@dataclass(frozen=True)
class Job:
    """A task with its config and the folder its runs, results and figures go to; ``label`` names it in the
    progress lines."""

    task: Task
    cfg: DMDDConfig
    folder: Path
    label: str = ""

    @property
    def result_path(self) -> Path:
        return self.folder / RESULTS_DIR / f"{self.task.key}.json"

    @property
    def run_dir(self) -> Path:
        return self.folder / RUNS_DIR / self.task.category / f"seed{self.task.seed}"


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

    def shard(self, tasks: Sequence[Any]) -> list[Any]:
        """Every ``world_size``-th task, starting at this rank: each task goes to exactly one rank."""
        return list(tasks[self.rank :: self.world_size])

    def device(self, requested: str) -> str:
        """``auto`` on a multi-process CUDA run means this rank's own GPU, ``cuda:<local rank>``."""
        if requested == "auto" and self.world_size > 1 and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    @property
    def tag(self) -> str:
        """The prefix of this rank's printed lines (none for a single process)."""
        return f"[rank {self.rank}/{self.world_size}] " if self.world_size > 1 else ""


def make_tasks(categories: Sequence[str], seeds: Sequence[int]) -> list[Task]:
    """Category-major order: every seed of a category, then the next category."""
    if not categories:
        raise ValueError("no categories to run")
    if not seeds:
        raise ValueError("no seeds given")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {list(seeds)}")
    return [Task(c, s) for c in categories for s in seeds]


def count(n: int, noun: str) -> str:
    """ "1 seed", "3 seeds", "2 categories"."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun[:-1]}ies" if noun.endswith("y") else f"{n} {noun}s"


# --- environment ------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Versions of Python and the packages the numbers depend on."""
    found = {"python": platform.python_version()}
    distributions = {"dmdd": "dmdd-core"}  # the package's distribution name
    for name in ("dmdd", "torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "scikit-image"):
        try:
            found[name] = metadata.version(distributions.get(name, name))
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


def is_done(result: dict[str, Any] | None, cfg: DMDDConfig, resolution: str, pro_variants: bool, path: Path) -> bool:
    """A finished task of the same configuration and evaluation settings. A result of another configuration is
    an error (mixing them would corrupt the table); one of other evaluation settings is evaluated again."""
    if result is None:
        return False
    difference = config_differences(result.get("config", {}), cfg, RESUMABLE_DIFFERENCES | {"seed"},
                                    (result.get("teacher") or {}).get("name"))
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


def curves(preds: Any, pixel: bool = True) -> dict[str, dict[str, list[float]]]:
    """Image ROC, pixel ROC and the reference PRO curve (to FPR 0.3) of one evaluation's predictions, at the
    model's input resolution, subsampled for storage; the image ROC only when ``pixel`` is False (a split with
    image labels only)."""
    from sklearn.metrics import roc_curve

    from .metrics import pro_curve

    fpr, tpr, _ = roc_curve(preds.labels, preds.scores)
    if not pixel:
        return {"image_roc": _subsample(fpr, tpr)}
    pixel_fpr, pixel_tpr, _ = roc_curve(preds.masks.ravel(), preds.maps.ravel(), drop_intermediate=True)
    pro_fpr, pro = pro_curve(preds.masks, preds.maps, FPR_LIMIT)
    inside = pro_fpr <= FPR_LIMIT
    return {
        "image_roc": _subsample(fpr, tpr),
        "pixel_roc": _subsample(pixel_fpr, pixel_tpr),
        "pro": _subsample(pro_fpr[inside], pro[inside]),
    }


def _timed_fit(job: Job, source: DataSource, **kwargs: Any) -> tuple[Any, float]:
    """Train (or resume, or load) a job; its wall time counted over every session: a session stopped by Ctrl-C
    or SIGTERM adds its time to ``wall_time.json`` before the checkpoint is left for the next one."""
    from .fit import fit

    timing_path = job.run_dir / "wall_time.json"
    spent = (load_result(timing_path) or {}).get("train_seconds", 0.0) if kwargs.get("resume", True) else 0.0
    started = time.perf_counter()

    def record() -> float:
        seconds = spent + time.perf_counter() - started
        job.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps({"train_seconds": seconds}), timing_path)
        return seconds

    try:
        result = fit(job.cfg, source, job.task.category, job.run_dir, **kwargs)
    except KeyboardInterrupt:
        record()
        raise
    return result, record()


def run_task(job: Job, source: DataSource, *, teacher: Any = None, resolution: str = "input",
             pro_variants: bool = True, resume: bool = True, skip_bad: bool = False, rank: Rank = Rank(),
             progress: bool | None = None) -> dict[str, Any]:
    """Train (or resume, or load when finished) and evaluate one job; write and return its result record."""
    import matplotlib.pyplot as plt

    from .infer import evaluate
    from .plots import example_figure, save_figure
    from .train import select_device

    task = job.task
    result, train_seconds = _timed_fit(job, source, teacher=teacher, resume=resume, skip_bad=skip_bad,
                                       progress=progress)
    started = time.perf_counter()
    ev = evaluate(result.model, source, task.category, skip_bad=skip_bad, resolution=resolution,
                  pro_variants=pro_variants, progress=progress)
    eval_seconds = time.perf_counter() - started
    thresholds = result.validation.get("thresholds") or {}
    stem = f"{task.category}_seed{task.seed}"
    fig = example_figure(ev, pixel_threshold=thresholds.get("pixel"))
    save_figure(fig, f"{stem}_examples", job.folder / FIGURES_DIR)
    plt.close(fig)
    history = result.validation.get("history", [])
    record = {
        "category": task.category, "seed": task.seed, "config": job.cfg.to_dict(), "preset": job.cfg.preset_name,
        "teacher": {"name": result.model.teacher.name, "source": result.model.teacher.source},
        "evaluation": ev.to_dict(), "pro_variants": pro_variants,
        "validation": history[-1] if history else None, "thresholds": thresholds,
        "curves": curves(ev.predictions, ev.pixel_labels),
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "resumed_from_step": result.resumed_from, "rank": rank.rank, "world_size": rank.world_size,
        "device": describe_device(select_device(job.cfg.device)), "precision": result.precision,
        "versions": versions(), "figure": f"{stem}_examples.png",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(json.dumps(record, indent=1), job.result_path)
    return record


# --- many tasks -------------------------------------------------------------------------------------------------
def resolve_teacher(jobs: Sequence[Job]) -> tuple[list[Job], Any]:
    """The jobs with ``teacher="auto"`` resolved to the teacher it gives on this machine (resnet18 where its
    weights can be had, else the offline teacher), and that teacher (None when no job asked for "auto"), so
    every result and checkpoint names the teacher it was made with and a resumed run is compared with it."""
    from .model import build_teacher

    auto = [job for job in jobs if job.cfg.teacher == "auto"]
    if not auto:
        return list(jobs), None
    teacher = build_teacher(auto[0].cfg)
    return [replace(job, cfg=job.cfg.replace(teacher=teacher.name)) if job.cfg.teacher == "auto" else job
            for job in jobs], teacher


def run_jobs(jobs: Sequence[Job], source: DataSource, *, resolution: str = "input", pro_variants: bool = True,
             resume: bool = True, skip_bad: bool = False, rank: Rank = Rank(), progress: bool | None = None,
             what: str = "") -> list[dict[str, Any]]:
    """Run every job not finished before (with the same settings), one teacher shared by all; print one line
    per finished task with the time left; return the records of the jobs run now. ``what`` describes the whole
    set (of every rank) in the first line, e.g. "6 tasks (3 categories x 2 seeds)"."""
    from .model import build_teacher

    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {', '.join(map(repr, RESOLUTIONS))}, got {resolution!r}")
    jobs, teacher = resolve_teacher(jobs)
    todo = []
    for job in jobs:
        if resume and is_done(load_result(job.result_path), job.cfg, resolution, pro_variants, job.result_path):
            print(f"{rank.tag}{job.label}: done before, skipped ({job.result_path})", flush=True)
        else:
            todo.append(job)
    print(f"{rank.tag}{what or 'tasks'}; this process: {len(jobs)}, {len(jobs) - len(todo)} done before", flush=True)
    if todo and (teacher is None or teacher.name != todo[0].cfg.teacher):
        teacher = build_teacher(todo[0].cfg)
    records, spent = [], []
    for i, job in enumerate(todo, 1):
        started = time.perf_counter()
        records.append(run_task(job, source, teacher=teacher, resolution=resolution, pro_variants=pro_variants,
                                resume=resume, skip_bad=skip_bad, rank=rank, progress=progress))
        spent.append(time.perf_counter() - started)
        ev = records[-1]["evaluation"]
        left = np.mean(spent) * (len(todo) - i) / 60
        figures = ", ".join(f"{label(k)} {100 * ev['dmdd'][k]:.2f}" + (f" (PaDiM {100 * ev['padim'][k]:.2f})"
                                                                       if k in ev.get("padim", {}) else "")
                            for k in HEADLINE_METRICS if k in ev["dmdd"])
        print(f"{rank.tag}[{i}/{len(todo)}] {job.label}: {figures} ({spent[-1]:.0f} s; about {left:.0f} min left)",
              flush=True)
    return records


# --- reports ----------------------------------------------------------------------------------------------------
def run_metadata(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """What every report states about the runs behind its numbers, one entry per line: the data, the setting,
    where the metrics were computed, the seeds, the checkpoint and threshold rules, the PRO definition, the
    hardware, the time and the versions. ``records``: task records of one setting (:func:`run_task`)."""
    first, seeds = records[0], sorted({r["seed"] for r in records})
    ev, cfg = first["evaluation"], first["config"]
    data, categories = ev.get("data", {}), sorted({r["category"] for r in records})
    ranks = max(r.get("world_size", 1) for r in records)
    wall = sum(r["train_seconds"] + r["eval_seconds"] for r in records)
    return {
        "dataset": f"{data.get('kind', '?')} at `{data.get('root', '?')}`, {count(len(categories), 'category')} "
                   f"({', '.join(categories)}), test split",
        "preset": f"{first['preset']}; teacher {first['teacher']['name']} ({first['teacher']['source']}); input "
                  f"{cfg['image_size']}x{cfg['image_size']}; {cfg['stage1_steps']} + {cfg['stage2_steps']} steps, "
                  f"batch {cfg['batch_size']}",
        "metrics computed at": ev.get("metric_resolution", "?"),
        "seeds": ", ".join(map(str, seeds)) + (" (mean ± sample std over seeds)" if len(seeds) > 1 else ""),
        "checkpoint rule": CHECKPOINT_RULE,
        "validation split": f"{cfg['val_fraction']:.0%} of the training images held out, with synthetic anomalies; "
                            f"thresholds: {THRESHOLD_RULE}",
        "PRO": AUPRO_DEFINITION,
        "device": "; ".join(sorted({r["device"] for r in records})) + f"; ranks: {ranks}",
        "precision": "; ".join(sorted({r.get("precision", "unrecorded") for r in records})),
        "wall time": f"{wall / 60:.1f} min in all (train + evaluate, summed over tasks and ranks)",
        "versions": ", ".join(f"{k} {v}" for k, v in first["versions"].items()),
    }


def metadata_lines(meta: dict[str, str]) -> list[str]:
    """A report's metadata as Markdown list lines, "- key: value"."""
    return [f"- {key}: {value}" for key, value in meta.items()]


# --- tables -----------------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def stat_text(stat: tuple[float, float] | float | None, seeds: int = 1, digits: int = 2) -> str:
    """A (mean, std) pair as "m ± s" (just "m" for one seed), a single value as "m", None as "–"."""
    if stat is None:
        return "–"
    mean, std = stat if isinstance(stat, tuple) else (stat, 0.0)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> list[str]:
    """A Markdown table's lines; ``align`` gives each column's separator ("---", ":-:")."""
    separators = align or ["---"] * len(head)
    return ["| " + " | ".join(head) + " |", "|" + "|".join(separators) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def csv_text(fields: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_text_files(out: Path, files: dict[str, str]) -> None:
    """Write each name -> text under ``out``, atomically."""
    for name, text in files.items():
        atomic_write_text(text if text.endswith("\n") else text + "\n", out / name)
