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
    extra_scale: tuple[float, float] | None = None,
    colorbars: bool = False,
    contours: bool = False,
) -> plt.Figure:
    """One column per example; rows: image, ground truth (left out when ``masks`` is None: a dataset with image
    labels only), anomaly map (fixed 0..1 scale), then any extra maps (each panel on its own scale, or all on
    ``extra_scale``), and with ``threshold`` the predicted mask ``map >= threshold`` (named by ``threshold_label``,
    e.g. where the threshold was chosen). ``colorbars``: a colour bar beside each row of maps; ``contours``: the
    ground truth's outline drawn over every map."""
    extra = extra or {}
    rows: list[tuple[str, Sequence[np.ndarray], dict[str, Any]]] = [("image", images, {})]
    if masks is not None:
        rows.append(("ground truth", masks, {"vmin": 0, "vmax": 1}))
    rows.append(("anomaly map", maps, {"cmap": "jet", "vmin": 0, "vmax": 1}))
    shared = {"vmin": extra_scale[0], "vmax": extra_scale[1]} if extra_scale else {}
    rows += [(name, values, {"cmap": "jet", **shared}) for name, values in extra.items()]
    if threshold is not None:
        name = f"map >= {threshold:.2f}" + (f"\n{threshold_label}" if threshold_label else "")
        rows.append((name, [np.asarray(m) >= threshold for m in maps], {"vmin": 0, "vmax": 1}))
    fig, axes = figure(len(rows), len(images), size=(1.9 * len(images) + (0.5 if colorbars else 0), 1.9 * len(rows)))
    for r, (name, values, kwargs) in enumerate(rows):
        is_map = kwargs.get("cmap") == "jet"
        for c, value in enumerate(values):
            show_image(axes[r, c], value, titles[c] if r == 0 else "", **kwargs)
            if contours and is_map and masks is not None and np.asarray(masks[c]).max() > 0:
                axes[r, c].contour(np.asarray(masks[c]) > 0.5, levels=[0.5], colors="white", linewidths=0.8)
        axes[r, 0].set_ylabel(name)
        if colorbars and is_map and (kwargs.get("vmax") is not None or len(values) == 1):
            fig.colorbar(axes[r, 0].images[-1], ax=list(axes[r, :]), fraction=0.02, pad=0.01)
    if not colorbars:
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
    last row shows the predicted mask. A split with image labels only has no ground-truth row. The maps share the
    scale [0, 1], shown by a colour bar."""
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
    return anomaly_examples(images, masks, maps, titles, threshold=pixel_threshold, threshold_label="(val F1-max)",
                            colorbars=True)


# --- the map of the method ----------------------------------------------------------------------------------------
METHOD_MAP_BOXES: dict[str, tuple[float, float, str, str]] = {
    # name: (x, y, text, kind); kinds colour the boxes: data, frozen, stage 1, stage 2, output
    "normal": (1.45, 4.8, "normal training\nimage I", "data"),
    "synth": (1.45, 2.9, "synthesis: Perlin mask M,\ntexture (or patch, stroke,\nbrightness) pasted in", "data"),
    "aug": (1.45, 1.0, "anomalous image\nI_aug, its mask M", "data"),
    "teacher": (5.0, 2.9, "teacher T\nImageNet CNN, frozen\nlevels 1-3", "frozen"),
    "student": (5.0, 1.0, "student S\nencoder-decoder", "stage 1"),
    "heads": (8.55, 1.0, "decouple heads, per level\nS -> F_n | F_a", "stage 1"),
    "ngm": (8.55, 4.8, "NGM: F_n(I_aug) mimics T(I)\n1 - cos, every pixel", "stage 1"),
    "aim": (8.55, 2.9, "AIM: inside M, cos(F_a, T(I_aug))\npushed to <= m; outside,\nF_a mimics T(I_aug)",
            "stage 1"),
    "seginput": (12.1, 2.9, "segmentation input\n-(T(I_aug) . F_n), -(T(I_aug) . F_a)\nnormalised, 3 levels, stride 4",
                 "stage 2"),
    "msn": (12.1, 1.0, "multi-perception\nsegmentation network\nfocal + L1 against M", "stage 2"),
    "output": (15.65, 1.0, "anomaly map;\nscore: mean of\nthe top-k pixels", "output"),
}
METHOD_MAP_ARROWS: tuple[tuple[str, str, str, float], ...] = (
    # start, end, label, curvature
    ("normal", "synth", "", 0.0), ("synth", "aug", "", 0.0), ("normal", "teacher", "I", 0.0),
    ("aug", "teacher", "I_aug", 0.0), ("aug", "student", "I_aug", 0.0), ("student", "heads", "", 0.0),
    ("heads", "aim", "F_a", 0.0), ("heads", "ngm", "F_n", 0.3), ("teacher", "ngm", "T(I)", 0.0),
    ("teacher", "aim", "T(I_aug)", 0.0), ("heads", "seginput", "F_n, F_a", 0.0), ("seginput", "msn", "", 0.0),
    ("msn", "output", "", 0.0),
)
BOX_SIZE = (2.65, 1.1)
METHOD_MAP_COLOURS = {"data": "#eeeeee", "frozen": "#d9d9d9", "stage 1": "#cfe2f3", "stage 2": "#fce5cd",
                      "output": "#d9ead3"}


def method_map() -> plt.Figure:
    """The whole pipeline in one figure: which images the teacher and student see, what NGM and AIM compare, what
    the segmentation network reads and what comes out (METHOD.md sections 1 to 7). Blue: trained in stage 1 (the
    student); orange: stage 2 (the segmentation network, student frozen); grey: data and the frozen teacher. At
    test time the path is image -> teacher and student -> segmentation network -> map and score."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, axes = figure(1, 1, size=(17.5, 6.2))
    ax = axes[0, 0]
    width, height = BOX_SIZE
    for x, y, text, kind in METHOD_MAP_BOXES.values():
        ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.04",
                                    facecolor=METHOD_MAP_COLOURS[kind], edgecolor="#555555", linewidth=1))
        ax.text(x, y, text, ha="center", va="center", fontsize=8)

    def edge(x: float, y: float, dx: float, dy: float) -> tuple[float, float]:
        """Where the ray from a box's centre along (dx, dy) leaves the box (with a small gap)."""
        half_w, half_h = width / 2 + 0.1, height / 2 + 0.1
        t = min(half_w / abs(dx) if dx else np.inf, half_h / abs(dy) if dy else np.inf)
        return x + t * dx, y + t * dy

    for start, end, label, rad in METHOD_MAP_ARROWS:
        (x0, y0, *_), (x1, y1, *_) = METHOD_MAP_BOXES[start], METHOD_MAP_BOXES[end]
        a, b = edge(x0, y0, x1 - x0, y1 - y0), edge(x1, y1, x0 - x1, y0 - y1)
        if rad:  # a curved arrow leaves and enters on the right side
            a, b = (x0 + width / 2 + 0.1, y0), (x1 + width / 2 + 0.1, y1)
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, color="#444444", linewidth=1,
                                     connectionstyle=f"arc3,rad={rad}"))
        if label:
            lx, ly = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2) if not rad else (max(a[0], b[0]) + 0.4, (a[1] + b[1]) / 2)
            ax.text(lx, ly, label, ha="center", va="center", fontsize=7.5, color="#222222",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6})
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="#555555") for c in METHOD_MAP_COLOURS.values()]
    ax.legend(handles, ["data", "frozen teacher", "trained in stage 1: student (NGM + AIM)",
                        "trained in stage 2: segmentation network (student frozen)", "output"],
                        loc="upper right", fontsize=8, frameon=False, ncol=1)
    ax.set_xlim(0.0, 17.1)
    ax.set_ylim(0.3, 5.45)
    ax.set_axis_off()
    ax.set_title("DMDD: teacher, decoupled student, NGM and AIM (stage 1), multi-perception segmentation (stage 2)")
    return fig
