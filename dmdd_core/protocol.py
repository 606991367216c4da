"""The evaluation protocol, stated once: what each metric is, which PRO definition is the reference, which
checkpoint is evaluated, where thresholds come from and at what resolution pixels are compared. Every table,
report and result file takes its wording from here. [MVTec AD's protocol for AUPRO; the rest ours]
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    """The key in :attr:`dmdd_core.infer.Evaluation.metrics` and in result files."""
    label: str
    """Its column head."""
    definition: str


FPR_LIMIT = 0.3
"""The false-positive rate up to which the PRO curve is integrated (MVTec AD's protocol)."""

AUPRO_DEFINITION = (
    "reference AUPRO (MVTec AD): dataset-level exact PRO curve over 8-connected ground-truth regions, FPR over all "
    f"anomaly-free pixels of the category (good images included), linear interpolation at FPR {FPR_LIMIT}, "
    f"area / {FPR_LIMIT}"
)

METRICS: tuple[Metric, ...] = (
    Metric("image_auroc", "image AUROC", "image scores against image labels"),
    Metric("image_f1_max", "image F1-max", "best F1 of the image scores over every threshold on this split (a "
           "figure to report; the thresholds applied to new images come from the validation split)"),
    Metric("pixel_auroc", "pixel AUROC", "every pixel of every image, good images included"),
    Metric("pixel_ap", "pixel AP", "average precision over every pixel of every image"),
    Metric("pixel_f1_max", "pixel F1-max", "best F1 over every threshold, every pixel of every image pooled"),
    Metric("aupro", "AUPRO", AUPRO_DEFINITION),
    Metric("aupro_per_image", "per-image variant", "a PRO variant, not the reference: AUPRO of each defective "
           "image alone, averaged over them (ignores false positives on good images)"),
    Metric("aupro_linear_200", "200-threshold variant", "a PRO variant, not the reference: PRO at 200 linearly "
           f"spaced thresholds, FPRs rescaled by the largest one kept under {FPR_LIMIT}"),
)
"""Every metric :func:`dmdd_core.infer.evaluate` computes, in the order it computes them; the two variants only
with ``pro_variants=True``. Tables choose their own columns (:data:`MAIN_METRICS`)."""

BY_KEY = {m.key: m for m in METRICS}
MAIN_METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max", "pixel_f1_max")
"""The columns of the benchmark's main table."""
PRO_VARIANTS: tuple[str, ...] = ("aupro", "aupro_per_image", "aupro_linear_200")
"""The reference AUPRO and its two variants, side by side in the benchmark's PRO table."""
HEADLINE_METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro")
"""The three figures papers report, and those of the baselines and the ablation tables."""


BASELINES: dict[str, str] = {
    "padim": "PaDiM (training-free, same teacher)",
    "naive_baseline": "mean image",
}
"""The baselines every evaluation reports beside DMDD, by their key in result files: PaDiM on DMDD's own teacher
(:mod:`dmdd_core.padim`), the classic method a learned model must beat, and the naive mean-image baseline
(:mod:`dmdd_core.baseline`), which tells whether a test set is too easy to show anything."""


def label(key: str) -> str:
    """The column head of a metric key."""
    return BY_KEY[key].label


CHECKPOINT_RULE = "last step (no checkpoint chosen on any split)"
"""Which checkpoint is evaluated: the last training step, always."""

THRESHOLD_RULE = "F1-max on the validation split at the last step"
"""Where the image and pixel thresholds of ``predict`` come from: never from a test split."""

RESOLUTIONS = ("input", "original")
"""Where pixel metrics are computed: at the model's input size, or at each test image's own size (MVTec AD's
official evaluation)."""


def resolution_text(setting: str, input_size: int, sizes: dict[str, int] | None = None) -> str:
    """The resolution the pixel metrics were computed at, in words: "the model's input, 128x128", "each image's
    original size (all 1024x1024)" or "each image's original size (2 sizes: 80 at 1024x1024, 20 at 900x900)",
    the most frequent sizes first."""
    if setting == "input":
        return f"the model's input, {input_size}x{input_size}"
    found = sorted((sizes or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    if len(found) <= 1:
        return "each image's original size" + (f" (all {found[0][0]})" if found else "")
    listed = ", ".join(f"{n} at {size}" for size, n in found[:4]) + (", ..." if len(found) > 4 else "")
    return f"each image's original size ({len(found)} sizes: {listed})"
