"""The one figure helper: every figure of the package, the notebooks and the benchmarks goes through here, so
they all look the same and are saved the same way (PNG in ``figures/``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

FIGURES_DIR = Path(os.environ.get("DMDD_FIGURES", "figures"))
STYLE: dict[str, Any] = {"figure.dpi": 100, "savefig.dpi": 120, "axes.titlesize": 10, "axes.labelsize": 9, "font.size": 9}


def figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] | None = None, **kwargs: Any):
    """``plt.subplots`` with the package style; axes always come back as a 2-D array."""
    plt.rcParams.update(STYLE)  # type: ignore[arg-type]
    size = size or (2.6 * ncols, 2.6 * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False, **kwargs)
    return fig, axes


def save_figure(fig: plt.Figure, name: str, folder: str | Path | None = None) -> Path:
    """Save ``fig`` as ``<folder>/<name>.png`` (default ``figures/``, or $DMDD_FIGURES) and return the path."""
    out = Path(folder) if folder is not None else FIGURES_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, bbox_inches="tight")
    return path


def show_image(ax: plt.Axes, image: np.ndarray, title: str = "", **kwargs: Any) -> None:
    """Draw an image ((H,W,3) in [0,1], (3,H,W) tensor-like, or (H,W)) without ticks."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        kwargs.setdefault("cmap", "gray")
    ax.imshow(np.clip(arr, 0, 1) if arr.ndim == 3 else arr, **kwargs)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def anomaly_examples(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None,
    maps: Sequence[np.ndarray],
    titles: Sequence[str],
    extra: dict[str, Sequence[np.ndarray]] | None = None,
    threshold: float | None = None,
    threshold_label: str = "",
) -> plt.Figure:
    """One column per example; rows: image, ground truth (left out when ``masks`` is None: a dataset with image
    labels only), anomaly map (fixed 0..1 scale), then any extra maps, and with ``threshold`` the predicted mask
    ``map >= threshold`` (named by ``threshold_label``, e.g. where the threshold was chosen)."""
    extra = extra or {}
    rows: list[tuple[str, Sequence[np.ndarray], dict[str, Any]]] = [("image", images, {})]
    if masks is not None:
        rows.append(("ground truth", masks, {"vmin": 0, "vmax": 1}))
    rows.append(("anomaly map", maps, {"cmap": "jet", "vmin": 0, "vmax": 1}))
    rows += [(name, values, {"cmap": "jet"}) for name, values in extra.items()]
    if threshold is not None:
        name = f"map >= {threshold:.2f}" + (f"\n{threshold_label}" if threshold_label else "")
        rows.append((name, [np.asarray(m) >= threshold for m in maps], {"vmin": 0, "vmax": 1}))
    fig, axes = figure(len(rows), len(images), size=(1.9 * len(images), 1.9 * len(rows)))
    for r, (name, values, kwargs) in enumerate(rows):
        for c, value in enumerate(values):
            show_image(axes[r, c], value, titles[c] if r == 0 else "", **kwargs)
        axes[r, 0].set_ylabel(name)
    fig.tight_layout()
    return fig


def curve_panels(
    panels: Sequence[tuple[str, str, str, dict[str, Any]]],
    *,
    diagonal: Sequence[bool] = (),
    xlim: Sequence[float | None] = (),
) -> plt.Figure:
    """Curves side by side, one panel per ``(title, x label, y label, {legend: (x values, y values)})``: ROC curves (with the
    chance ``diagonal``), PRO curves (``xlim`` 0.3)... Legends carry whatever the caller puts in the keys, e.g.
    the area."""
    fig, axes = figure(1, len(panels), size=(4.2 * len(panels), 3.8))
    for i, (title, xlabel, ylabel, curves) in enumerate(panels):
        ax = axes[0, i]
        for label, (x, y) in curves.items():
            ax.plot(x, y, lw=1.2, label=label)
        if i < len(diagonal) and diagonal[i]:
            ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        limit = xlim[i] if i < len(xlim) else None
        ax.set_xlim(0, limit if limit is not None else 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if curves:
            ax.legend(frameon=False, fontsize=7, loc="lower right")
        else:
            ax.text(0.5, 0.5, "absent: image labels only", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def loss_curves(log: Sequence[dict[str, float]], title: str = "") -> plt.Figure:
    """Training losses per step, one panel per stage (log entries of :func:`dmdd_core.fit.fit`)."""
    fig, axes = figure(1, 2, size=(8, 2.8))
    for ax, stage, keys in ((axes[0, 0], 1, ("loss", "ngm", "aim")), (axes[0, 1], 2, ("loss", "focal", "l1"))):
        entries = [e for e in log if e["stage"] == stage]
        for key in keys:
            if entries and key in entries[0]:
                ax.plot([e["step"] for e in entries], [e[key] for e in entries], label=key, lw=1)
        ax.set_title(f"{title} stage {stage}: {'distillation' if stage == 1 else 'segmentation'}".strip())
        ax.set_xlabel("step")
        if entries:
            ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def example_figure(ev: Any, per_kind: int = 2, pixel_threshold: float | None = None) -> plt.Figure:
    """Best and worst examples of one :class:`~dmdd_core.infer.Evaluation`, ``per_kind`` of each, as columns:
    the highest-scored defective images (best found), the lowest-scored defective ones (worst missed) and the
    highest-scored good ones (worst false alarms). With ``pixel_threshold`` (chosen on the validation split) a
    last row shows the predicted mask. A split with image labels only has no ground-truth row."""
    from .data import load_image

    preds = ev.predictions
    if preds is None:
        raise ValueError("the evaluation holds no predictions")
    defective = np.flatnonzero(preds.labels == 1)
    good = np.flatnonzero(preds.labels == 0)
    order_def = defective[np.argsort(-preds.scores[defective], kind="stable")]
    order_good = good[np.argsort(-preds.scores[good], kind="stable")]
    picks = [("best", i) for i in order_def[:per_kind]] + [("worst", i) for i in order_def[::-1][:per_kind]]
    picks += [("worst", i) for i in order_good[:per_kind]]
    size = preds.maps.shape[-1]
    images = [load_image(preds.paths[i], size).permute(1, 2, 0).numpy() for _, i in picks]
    titles = [f"{kind}: {preds.defect_types[i]}\nscore {preds.scores[i]:.2f}" for kind, i in picks]
    masks = [preds.masks[i] for _, i in picks] if getattr(ev, "pixel_labels", True) else None
    maps = [preds.maps[i] for _, i in picks]
    return anomaly_examples(images, masks, maps, titles, threshold=pixel_threshold, threshold_label="(val F1-max)")
