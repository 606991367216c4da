"""Detection and localisation metrics. The metrics know nothing of the model: they take arrays.

- image AUROC: ``scores`` (N,) against ``labels`` (N,) (1 = defective);
- pixel AUROC: every pixel of every test image, good images included, ``maps`` (N,H,W) against ``masks``.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score


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
