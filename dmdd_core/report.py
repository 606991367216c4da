"""Quickstart: train and evaluate every category, then a table beside the naive baseline and figures."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .config import DMDDConfig
from .infer import Evaluation, evaluate
from .model import build_teacher
from .plots import anomaly_examples, loss_curves, save_figure
from .train import atomic_write_text, train


def markdown_table(evaluations: list[Evaluation]) -> str:
    """Per-category image and pixel AUROC of DMDD and of the naive baseline, with their mean."""
    lines = [
        "| category | image AUROC | pixel AUROC | baseline image AUROC | baseline pixel AUROC |",
        "|---|---|---|---|---|",
    ]
    keys = ("image_auroc", "pixel_auroc")
    for ev in evaluations:
        cells = [f"{ev.metrics[k]:.3f}" for k in keys] + [f"{ev.baseline[k]:.3f}" for k in keys]
        lines.append(f"| {ev.category} | " + " | ".join(cells) + " |")
    if len(evaluations) > 1:
        mean = [np.mean([ev.metrics[k] for ev in evaluations]) for k in keys]
        mean += [np.mean([ev.baseline[k] for ev in evaluations]) for k in keys]
        lines.append("| **mean** | " + " | ".join(f"**{v:.3f}**" for v in mean) + " |")
    return "\n".join(lines)


def example_figure(ev: Evaluation, per_kind: int = 2):
    """The highest-scored defective and good test images, and the lowest-scored defective ones."""
    preds = ev.predictions
    if preds is None:
        raise ValueError("the evaluation holds no predictions")
    from .data import load_image

    defective = np.flatnonzero(preds.labels == 1)
    good = np.flatnonzero(preds.labels == 0)
    order_def = defective[np.argsort(-preds.scores[defective])]
    order_good = good[np.argsort(-preds.scores[good])]
    picks = list(order_def[:per_kind]) + list(order_def[-per_kind:]) + list(order_good[:per_kind])
    size = preds.maps.shape[-1]
    images = [load_image(preds.paths[i], size).permute(1, 2, 0).numpy() for i in picks]
    titles = [f"{preds.defect_types[i]} score {preds.scores[i]:.2f}" for i in picks]
    return anomaly_examples(images, [preds.masks[i] for i in picks], [preds.maps[i] for i in picks], titles)


def quickstart(cfg: DMDDConfig, root: Path, categories: list[str], out: Path) -> list[Evaluation]:
    """Train (or load, when finished before) and evaluate each category; write ``results.json``,
    ``results.md`` and figures under ``out``; print the table."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    evaluations, timings = [], {}
    teacher = build_teacher(cfg)
    for category in categories:
        started = time.perf_counter()
        result = train(cfg, root, category, out / category, teacher=teacher)
        ev = evaluate(result.model, root, category)
        timings[category] = round(time.perf_counter() - started, 1)
        print(ev.summary(), f"({timings[category]:.0f} s)", flush=True)
        evaluations.append(ev)
        for name, fig in (("losses", loss_curves(result.log, category)), ("examples", example_figure(ev))):
            save_figure(fig, f"quickstart_{category}_{name}", out / "figures")
            plt.close(fig)
    table = markdown_table(evaluations)
    meta = (
        f"DMDD, {cfg.preset_name} preset, teacher {teacher.name} ({teacher.source}); test split at "
        f"{cfg.image_size}x{cfg.image_size}; seed {cfg.seed}; checkpoint rule: last step; "
        f"device {next(result.model.parameters()).device}; torch {torch.__version__}; {platform.platform()}"
    )
    print("\n" + table + "\n\n" + meta)
    atomic_write_text(f"# Quickstart results\n\n{table}\n\n{meta}\n", out / "results.md")
    atomic_write_text(
        json.dumps(
            {"meta": meta, "config": cfg.to_dict(), "seconds": timings, "results": [ev.to_dict() for ev in evaluations]},
            indent=2,
        ),
        out / "results.json",
    )
    print(f"\nresults and figures in {out}/")
    return evaluations
