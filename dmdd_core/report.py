"""Quickstart: train and evaluate every category, then a table beside the naive baseline and figures."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .config import DMDDConfig
from .data import DataSource, as_source
from .fit import fit
from .infer import Evaluation, evaluate
from .model import build_teacher
from .plots import anomaly_examples, loss_curves, save_figure
from .train import atomic_write_text


def markdown_table(evaluations: list[Evaluation], validation: list[dict[str, float]] | None = None) -> str:
    """Per-category image and pixel AUROC of DMDD and of the naive baseline on each evaluation's split, with
    their mean; with ``validation`` (one dict per category, e.g. the last entry of a run's validation history)
    two more columns give the validation split's AUROCs."""
    split = evaluations[0].split if evaluations else "test"
    head = ["image AUROC", "pixel AUROC", "baseline image AUROC", "baseline pixel AUROC"]
    head = [f"{split} {h}" for h in head] + (["val image AUROC", "val pixel AUROC"] if validation else [])
    lines = ["| category | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    keys = ("image_auroc", "pixel_auroc")

    def row(ev: Evaluation, i: int) -> list[float]:
        values = [ev.metrics[k] for k in keys] + [ev.baseline[k] for k in keys]
        return values + ([validation[i].get(k, float("nan")) for k in keys] if validation else [])

    rows = [row(ev, i) for i, ev in enumerate(evaluations)]
    for ev, values in zip(evaluations, rows):
        lines.append(f"| {ev.category} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    if len(evaluations) > 1:
        lines.append("| **mean** | " + " | ".join(f"**{v:.3f}**" for v in np.nanmean(rows, axis=0)) + " |")
    return "\n".join(lines)


def example_figure(ev: Evaluation, per_kind: int = 2, pixel_threshold: float | None = None):
    """Best and worst examples of one evaluation, ``per_kind`` of each, as columns: the highest-scored defective
    images (best found), the lowest-scored defective ones (worst missed) and the highest-scored good ones (worst
    false alarms). With ``pixel_threshold`` (chosen on the validation split) a last row shows the predicted
    mask."""
    preds = ev.predictions
    if preds is None:
        raise ValueError("the evaluation holds no predictions")
    from .data import load_image

    defective = np.flatnonzero(preds.labels == 1)
    good = np.flatnonzero(preds.labels == 0)
    order_def = defective[np.argsort(-preds.scores[defective], kind="stable")]
    order_good = good[np.argsort(-preds.scores[good], kind="stable")]
    picks = [("best", i) for i in order_def[:per_kind]] + [("worst", i) for i in order_def[::-1][:per_kind]]
    picks += [("worst", i) for i in order_good[:per_kind]]
    size = preds.maps.shape[-1]
    images = [load_image(preds.paths[i], size).permute(1, 2, 0).numpy() for _, i in picks]
    titles = [f"{kind}: {preds.defect_types[i]}\nscore {preds.scores[i]:.2f}" for kind, i in picks]
    masks = [preds.masks[i] for _, i in picks]
    maps = [preds.maps[i] for _, i in picks]
    return anomaly_examples(images, masks, maps, titles, threshold=pixel_threshold, threshold_label="(val F1-max)")


def quickstart(
    cfg: DMDDConfig,
    root: Path | DataSource,
    categories: list[str],
    out: Path,
    *,
    skip_bad: bool = False,
    resume: bool = True,
) -> list[Evaluation]:
    """Train (or load, when finished before) and evaluate each category; write ``results.json``,
    ``results.md`` and figures under ``out``; print the table."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    evaluations, timings, validation = [], {}, []
    teacher = build_teacher(cfg)
    source = as_source(root)
    for category in categories:
        started = time.perf_counter()
        result = fit(cfg, source, category, out / category, teacher=teacher, skip_bad=skip_bad, resume=resume)
        ev = evaluate(result.model, source, category, skip_bad=skip_bad)
        history = result.validation.get("history", [])
        validation.append(history[-1] if history else {})
        timings[category] = round(time.perf_counter() - started, 1)
        print(ev.summary(), f"({timings[category]:.0f} s)", flush=True)
        evaluations.append(ev)
        threshold = result.validation.get("thresholds", {}).get("pixel")
        figures = (("losses", loss_curves(result.log, category)), ("examples", example_figure(ev, pixel_threshold=threshold)))
        for name, fig in figures:
            save_figure(fig, f"quickstart_{category}_{name}", out / "figures")
            plt.close(fig)
    table = markdown_table(evaluations, validation if any(validation) else None)
    skipped = sum(ev.input_report.num_skipped for ev in evaluations)
    meta = (
        f"DMDD, {cfg.preset_name} preset, teacher {teacher.name} ({teacher.source}); test split (the dataset's "
        f"labelled test images) and val split ({cfg.val_fraction:.0%} of the training images held out, synthetic "
        f"anomalies) at {cfg.image_size}x{cfg.image_size}; seed {cfg.seed}; checkpoint rule: last step; "
        f"bad files skipped: {skipped}; "
        f"device {next(result.model.parameters()).device}, precision {result.precision}; torch {torch.__version__}; {platform.platform()}"
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
