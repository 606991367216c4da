"""Detection and localisation metrics. The metrics know nothing of the model: they take arrays.

- image AUROC: ``scores`` (N,) against ``labels`` (N,) (1 = defective);
- pixel AUROC: every pixel of every test image, good images included, ``maps`` (N,H,W) against ``masks``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def _auroc(target: np.ndarray, score: np.ndarray, what: str) -> float:
    target = np.asarray(target).ravel().astype(bool)
    score = np.asarray(score, dtype=np.float64).ravel()
    if target.shape != score.shape:
        raise ValueError(f"{what}: {target.size} targets but {score.size} scores")
    if target.all() or not target.any():
        raise ValueError(f"{what} needs both normal and anomalous examples; got only {'anomalous' if target.any() else 'normal'} ones")
    if not np.isfinite(score).all():
        raise ValueError(f"{what}: the scores contain NaN or infinity")
    return float(roc_auc_score(target, score))


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores; labels 1 = defective."""
    return _auroc(labels, scores, "image AUROC")


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Area under the ROC curve over all pixels of all test images (N,H,W)."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"pixel AUROC: masks {masks.shape} and maps {maps.shape} differ in shape")
    return _auroc(masks, maps, "pixel AUROC")


def f1_max_threshold(target: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """(best F1, the threshold reaching it) over every threshold on ``score``; ``score >= threshold`` is
    anomalous. Meant for the validation split: a threshold chosen on the test set would flatter its F1."""
    target = np.asarray(target).ravel().astype(bool)
    score = np.asarray(score, dtype=np.float64).ravel()
    if target.shape != score.shape:
        raise ValueError(f"F1-max: {target.size} targets but {score.size} scores")
    if not target.any():
        raise ValueError("F1-max needs anomalous examples; got none")
    precision, recall, thresholds = precision_recall_curve(target, score)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def pixel_ap(masks: np.ndarray, maps: np.ndarray) -> float:
    """Average precision over all pixels of all test images (N,H,W), good images included."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"pixel AP: masks {masks.shape} and maps {maps.shape} differ in shape")
    target = masks.ravel().astype(bool)
    if not target.any():
        raise ValueError("pixel AP needs anomalous pixels; the masks are empty")
    return float(average_precision_score(target, np.asarray(maps, dtype=np.float64).ravel()))


# --- PRO ---------------------------------------------------------------------------------------------------------
FPR_LIMIT = 0.3
"""The false-positive rate up to which the PRO curve is integrated. [MVTec AD]"""
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _check_maps(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(masks).astype(bool), np.asarray(maps)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"PRO: masks {masks.shape} and maps {maps.shape} must both be (N,H,W)")
    if not np.isfinite(maps).all():
        raise ValueError("PRO: the maps contain NaN or infinity")
    if not masks.any():
        raise ValueError("PRO needs at least one anomalous region; the masks are empty")
    if masks.all():
        raise ValueError("PRO needs anomaly-free pixels; every pixel is anomalous")
    return masks, maps


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of every mask (N,H,W) -> (int32 labels with ids unique over the set, 0 = normal;
    the number of regions)."""
    labels = np.zeros(masks.shape, dtype=np.int32)
    count = 0
    for i, mask in enumerate(masks):
        image_labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        labels[i] = np.where(image_labels > 0, image_labels + count, 0)
        count += n
    return labels, count


def pro_curve(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = FPR_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap curve: (FPR, PRO) at every distinct score, from (0, 0), ties merged.

    FPR: share of all anomaly-free pixels of all images (good images included) scored at or above the threshold.
    PRO: mean over every 8-connected ground-truth region of all images of the share of its pixels at or above
    it. Only the points up to the first one past ``fpr_limit`` are computed (pass 1.0 for the whole curve): the
    pixels below the score where the FPR first reaches the limit never matter, so they are not sorted.
    """
    masks, maps = _check_maps(masks, maps)
    labels, count = label_regions(masks)
    scores = maps.ravel()
    regions = labels.ravel()
    normal = regions == 0
    n_normal = int(normal.sum())
    # Lowest score still needed: the k-th highest normal score, k = ceil(limit * n_normal).
    k = min(n_normal, max(1, int(np.ceil(fpr_limit * n_normal - 1e-9))))
    floor = np.partition(scores[normal], n_normal - k)[n_normal - k]
    keep = scores >= floor
    scores, regions = scores[keep], regions[keep]
    sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
    weight_pro = np.where(regions > 0, 1.0 / (sizes[regions] * count), 0.0)
    weight_fpr = (regions == 0) / n_normal
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    fpr = np.cumsum(weight_fpr[order])
    pro = np.cumsum(weight_pro[order])
    last_of_run = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr, pro = fpr[last_of_run], pro[last_of_run]
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], np.minimum(pro, 1.0)])


def _area_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoidal area under (fpr, pro) from 0 to ``limit``, interpolating linearly at ``limit``."""
    inside = fpr <= limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < limit and inside.sum() < len(fpr):
        j = int(inside.sum())
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_limit = y0 + (limit - x0) * (y1 - y0) / (x1 - x0)
        x, y = np.append(x, limit), np.append(y, y_limit)
    return float(np.trapezoid(y, x))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float:
    """The reference AUPRO (MVTec AD's definition, METHOD.md section 8): area under the exact PRO curve of the
    whole test set up to FPR ``fpr_limit``, interpolated linearly there, divided by ``fpr_limit``; in [0, 1]."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    return _area_to(fpr, pro, fpr_limit) / fpr_limit


def aupro_per_image(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float:
    """A circulating variant, NOT the reference: AUPRO computed on each anomalous image alone (its own regions,
    its own anomaly-free pixels) and averaged over those images; good images play no part. It ignores false
    positives on good images, so it is usually higher."""
    masks, maps = _check_maps(masks, maps)
    values = [aupro(m[None], s[None], fpr_limit) for m, s in zip(masks, maps) if m.any() and not m.all()]
    return float(np.mean(values))


def aupro_linear_thresholds(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = FPR_LIMIT,
                            num_thresholds: int = 200) -> float:
    """A circulating variant, NOT the reference: PRO and FPR at ``num_thresholds`` thresholds spaced linearly
    between the lowest and highest score, points with FPR <= ``fpr_limit`` kept, the FPRs rescaled by the largest
    one kept (not by ``fpr_limit``), area by the trapezoid rule. The coarse grid and the rescaling move the figure
    away from the reference, by an amount and in a direction that depend on the maps; with very many thresholds
    it tends to the reference. When every kept point has FPR 0 the curve is a single point and its PRO is
    returned."""
    masks, maps = _check_maps(masks, maps)
    labels, count = label_regions(masks)
    scores, regions = maps.ravel(), labels.ravel()
    normal = regions == 0
    sizes = np.bincount(regions, minlength=count + 1)[1:].astype(np.float64)
    fprs, pros = [], []
    for t in np.linspace(scores.min(), scores.max(), num_thresholds):
        hit = scores >= t
        fprs.append(hit[normal].mean())
        pros.append(np.mean(np.bincount(regions[hit], minlength=count + 1)[1:] / sizes))
    fpr, pro = np.asarray(fprs), np.asarray(pros)
    kept = fpr <= fpr_limit
    if not kept.any():
        return 0.0
    if fpr[kept].max() == 0:
        return float(pro[kept].max())
    order = np.argsort(fpr[kept])
    x, y = fpr[kept][order], pro[kept][order]
    return float(np.trapezoid(y, x / x.max()))
