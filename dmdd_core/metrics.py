"""Detection and localisation metrics. The metrics know nothing of the model: they take arrays.

- image AUROC: ``scores`` (N,) against ``labels`` (N,) (1 = defective);
- pixel AUROC, pixel AP, pixel F1-max and the PRO metrics: every pixel of every test image, good images
  included, ``maps`` against ``masks``.

The pixel-level metrics take a test set in either of two forms: two (N,H,W) arrays (every image at one size,
e.g. the model's input), or two sequences of N 2-D arrays, mask i and map i of one shape, the images free to
differ in size from one another (each test image at its original size, which varies within some categories of
VisA). Both forms give the same value for the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
from scipy import ndimage

from .protocol import FPR_LIMIT

ImageSet: TypeAlias = "np.ndarray | Sequence[np.ndarray]"
"""A test set's masks or maps: one (N,H,W) array, or a sequence of N 2-D arrays (sizes may differ)."""


def _image_pairs(masks: ImageSet, maps: ImageSet, what: str, stacked: bool = True) -> tuple[ImageSet, ImageSet]:
    """The one normalisation of pixel-level inputs. A list or tuple of 2-D arrays (either argument) makes a
    per-image set: both become lists of arrays, pair i of one shape, sizes free to differ from pair to pair.
    Anything else is taken as one array each, of one shape, (N,H,W) when ``stacked``."""
    if any(isinstance(x, list | tuple) and len(x) > 0 and np.ndim(x[0]) == 2 for x in (masks, maps)):
        mask_list, map_list = [np.asarray(m) for m in masks], [np.asarray(s) for s in maps]
        if len(mask_list) != len(map_list):
            raise ValueError(f"{what}: {len(mask_list)} masks but {len(map_list)} maps")
        for i, (m, s) in enumerate(zip(mask_list, map_list)):
            if m.ndim != 2 or m.shape != s.shape:
                raise ValueError(f"{what}: mask {i} {m.shape} and map {i} {s.shape} must be 2-D of one shape")
        return mask_list, map_list
    mask_array, map_array = np.asarray(masks), np.asarray(maps)
    if mask_array.shape != map_array.shape or (stacked and mask_array.ndim != 3):
        must = "must both be (N,H,W) or lists of 2-D arrays" if stacked else "differ in shape"
        raise ValueError(f"{what}: masks {mask_array.shape} and maps {map_array.shape} {must}")
    return mask_array, map_array


def _flat(images: ImageSet) -> np.ndarray:
    """Every pixel of a set, image after image: a view of an array, a concatenation of a list."""
    if isinstance(images, np.ndarray):
        return images.ravel()
    return np.concatenate([a.ravel() for a in images])


def _auroc(target: np.ndarray, score: np.ndarray, what: str) -> float:
    tps, fps, _, positives, negatives = _ranked_counts(target, score, what)
    if not positives or not negatives:
        raise ValueError(f"{what} needs both normal and anomalous examples; got only {'anomalous' if positives else 'normal'} ones")
    return _roc_area(tps, fps, positives, negatives)


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores; labels 1 = defective."""
    return _auroc(labels, scores, "image AUROC")


def pixel_auroc(masks: ImageSet, maps: ImageSet) -> float:
    """Area under the ROC curve over all pixels of all test images: (N,H,W) arrays or lists of 2-D arrays."""
    masks, maps = _image_pairs(masks, maps, "pixel AUROC", stacked=False)
    return _auroc(_flat(masks), _flat(maps), "pixel AUROC")


def _ranked_counts(target: np.ndarray, score: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """The confusion counts at every distinct score, from one sort: (true positives, false positives, the
    scores as thresholds), highest score first, ties merged (a threshold t calls ``score >= t`` anomalous);
    and the numbers of positives and negatives. Every pixel-level ROC, precision and recall figure derives from
    these, so one test set is sorted once for all of them."""
    target = np.asarray(target).ravel().astype(bool)
    score = np.asarray(score).ravel()
    if score.dtype not in (np.float32, np.float64):
        score = score.astype(np.float64)
    if target.shape != score.shape:
        raise ValueError(f"{what}: {target.size} targets but {score.size} scores")
    if not np.isfinite(score).all():
        raise ValueError(f"{what}: the scores contain NaN or infinity")
    positives = int(target.sum())
    order = np.argsort(score)[::-1]
    ranked = score[order]
    hits = np.cumsum(target[order], dtype=np.int64)
    del order
    ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)
    tps = hits[ends]
    return tps, ends + 1 - tps, ranked[ends], positives, target.size - positives


def _roc_area(tps: np.ndarray, fps: np.ndarray, positives: int, negatives: int) -> float:
    """Trapezoidal area under the ROC curve through every distinct threshold, from (0, 0)."""
    tpr = np.concatenate([[0.0], tps / positives])
    fpr = np.concatenate([[0.0], fps / negatives])
    return float(np.trapezoid(tpr, fpr))


def _average_precision(tps: np.ndarray, fps: np.ndarray, positives: int) -> float:
    """Sum over thresholds of (recall gained) x precision: the step-wise AP, without interpolation."""
    precision = tps / (tps + fps)
    gained = np.diff(np.concatenate([[0], tps])) / positives
    return float(np.sum(gained * precision))


def _f1(tps: np.ndarray, fps: np.ndarray, positives: int) -> np.ndarray:
    """F1 at every threshold: 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P)."""
    return 2 * tps / (tps + fps + positives)


def f1_max_threshold(target: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """(best F1, the threshold reaching it) over every threshold on ``score``; ``score >= threshold`` is
    anomalous. Meant for the validation split: a threshold chosen on the test set would flatter its F1."""
    tps, fps, thresholds, positives, _ = _ranked_counts(target, score, "F1-max")
    if not positives:
        raise ValueError("F1-max needs anomalous examples; got none")
    f1 = _f1(tps, fps, positives)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def pixel_metrics(masks: ImageSet, maps: ImageSet) -> dict[str, float]:
    """Pixel AUROC, pixel AP and pixel F1-max of a test set from one sort of its pixels ((N,H,W) arrays or
    lists of 2-D arrays), each equal to :func:`pixel_auroc`, :func:`pixel_ap` and :func:`pixel_f1_max`. At
    original resolution a category holds some 10^8 pixels: sorting them once instead of three times is most of
    the evaluation's time."""
    masks, maps = _image_pairs(masks, maps, "pixel metrics", stacked=False)
    tps, fps, _, positives, negatives = _ranked_counts(_flat(masks), _flat(maps), "pixel metrics")
    if not positives or not negatives:
        raise ValueError(
            "pixel metrics need both normal and anomalous pixels; got only "
            f"{'anomalous' if positives else 'normal'} ones"
        )
    return {
        "pixel_auroc": _roc_area(tps, fps, positives, negatives),
        "pixel_ap": _average_precision(tps, fps, positives),
        "pixel_f1_max": float(_f1(tps, fps, positives).max()),
    }


def pixel_f1_max(masks: ImageSet, maps: ImageSet) -> float:
    """The best F1 over every threshold, all pixels of all test images pooled ((N,H,W) arrays or lists of 2-D
    arrays). On the test set this is an optimistic figure to report, not a way to choose a threshold."""
    masks, maps = _image_pairs(masks, maps, "pixel F1-max", stacked=False)
    return f1_max_threshold(_flat(masks), _flat(maps))[0]


def pixel_ap(masks: ImageSet, maps: ImageSet) -> float:
    """Average precision over all pixels of all test images ((N,H,W) arrays or lists of 2-D arrays), good
    images included."""
    masks, maps = _image_pairs(masks, maps, "pixel AP", stacked=False)
    tps, fps, _, positives, _ = _ranked_counts(_flat(masks), _flat(maps), "pixel AP")
    if not positives:
        raise ValueError("pixel AP needs anomalous pixels; the masks are empty")
    return _average_precision(tps, fps, positives)


# --- PRO ---------------------------------------------------------------------------------------------------------
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _check_maps(masks: ImageSet, maps: ImageSet) -> tuple[ImageSet, ImageSet]:
    masks, maps = _image_pairs(masks, maps, "PRO")
    if not all(np.isfinite(s).all() for s in maps):
        raise ValueError("PRO: the maps contain NaN or infinity")
    if not any(m.any() for m in masks):
        raise ValueError("PRO needs at least one anomalous region; the masks are empty")
    if all(m.all() for m in masks):
        raise ValueError("PRO needs anomaly-free pixels; every pixel is anomalous")
    return masks, maps


def _region_ids(masks: ImageSet) -> tuple[np.ndarray, int]:
    """8-connected regions of every mask, as one flat int32 array over all pixels (image after image, as
    :func:`_flat`), ids unique over the set, 0 = normal; and the number of regions."""
    labels = np.zeros(sum(m.size for m in masks), dtype=np.int32)
    count = start = 0
    for mask in masks:
        image_labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if n:
            labels[start : start + mask.size] = np.where(image_labels > 0, image_labels + count, 0).ravel()
        count += n
        start += mask.size
    return labels, count


def label_regions(masks: ImageSet) -> tuple[np.ndarray | list[np.ndarray], int]:
    """8-connected regions of every mask -> (int32 labels with ids unique over the set, 0 = normal, shaped
    like ``masks``: one (N,H,W) array, or a list of 2-D arrays for a list of masks; the number of regions)."""
    if not isinstance(masks, np.ndarray):
        masks = [np.asarray(m) for m in masks]
    labels, count = _region_ids(masks)
    if isinstance(masks, np.ndarray):
        return labels.reshape(masks.shape), count
    ends = np.cumsum([m.size for m in masks])
    return [part.reshape(m.shape) for part, m in zip(np.split(labels, ends[:-1]), masks)], count


def pro_curve(masks: ImageSet, maps: ImageSet, fpr_limit: float = FPR_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap curve: (FPR, PRO) at every distinct score, from (0, 0), ties merged.

    FPR: share of all anomaly-free pixels of all images (good images included) scored at or above the threshold.
    PRO: mean over every 8-connected ground-truth region of all images of the share of its pixels at or above
    it. Only the points up to the first one past ``fpr_limit`` are computed (pass 1.0 for the whole curve): the
    pixels below the score where the FPR first reaches the limit never matter, so they are not sorted.
    ``masks`` and ``maps``: (N,H,W) arrays, or lists of 2-D arrays whose sizes may differ from image to image.
    """
    masks, maps = _check_maps(masks, maps)
    regions, count = _region_ids(masks)
    scores = _flat(maps)
    normal = regions == 0
    n_normal = int(normal.sum())
    # Lowest score still needed: the k-th highest normal score, k = ceil(limit * n_normal).
    k = min(n_normal, max(1, int(np.ceil(fpr_limit * n_normal - 1e-9))))
    floor = np.partition(scores[normal], n_normal - k)[n_normal - k]
    sizes = np.bincount(regions, minlength=count + 1).astype(np.float64)
    keep = scores >= floor
    scores, regions = scores[keep], regions[keep]
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


def aupro(masks: ImageSet, maps: ImageSet, fpr_limit: float = FPR_LIMIT) -> float:
    """The reference AUPRO (MVTec AD's definition, METHOD.md section 8): area under the exact PRO curve of the
    whole test set up to FPR ``fpr_limit``, interpolated linearly there, divided by ``fpr_limit``; in [0, 1].
    ``masks`` and ``maps``: (N,H,W) arrays, or lists of 2-D arrays whose sizes may differ from image to image."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    return _area_to(fpr, pro, fpr_limit) / fpr_limit


def aupro_per_image(masks: ImageSet, maps: ImageSet, fpr_limit: float = FPR_LIMIT) -> float:
    """A circulating variant, NOT the reference: AUPRO computed on each anomalous image alone (its own regions,
    its own anomaly-free pixels) and averaged over those images; good images play no part. It ignores false
    positives on good images, so it is usually higher."""
    masks, maps = _check_maps(masks, maps)
    values = [aupro([m], [s], fpr_limit) for m, s in zip(masks, maps) if m.any() and not m.all()]
    return float(np.mean(values))


def aupro_linear_thresholds(masks: ImageSet, maps: ImageSet, fpr_limit: float = FPR_LIMIT,
                            num_thresholds: int = 200) -> float:
    """A circulating variant, NOT the reference: PRO and FPR at ``num_thresholds`` thresholds spaced linearly
    between the lowest and highest score, points with FPR <= ``fpr_limit`` kept, the FPRs rescaled by the largest
    one kept (not by ``fpr_limit``), area by the trapezoid rule. The coarse grid and the rescaling move the figure
    away from the reference, by an amount and in a direction that depend on the maps; with very many thresholds
    it tends to the reference. When every kept point has FPR 0 the curve is a single point and its PRO is
    returned.

    Computed in one pass over the pixels, not one per threshold: each pixel's count of thresholds at or below
    its score, then counts per region (normal pixels being region 0) summed from the top threshold down."""
    masks, maps = _check_maps(masks, maps)
    regions, count = _region_ids(masks)
    scores = _flat(maps)
    thresholds = np.linspace(scores.min(), scores.max(), num_thresholds)
    # reached[p] = number of thresholds t with scores[p] >= t: pixel p is hit at thresholds 0 .. reached[p] - 1.
    reached = np.searchsorted(thresholds, scores, side="right")
    width = num_thresholds + 1
    per_region = np.bincount(regions.astype(np.int64) * width + reached, minlength=(count + 1) * width)
    hits = np.cumsum(per_region.reshape(count + 1, width)[:, ::-1], axis=1)[:, ::-1][:, 1:]  # (regions, thresholds)
    sizes = hits[:, 0] + per_region.reshape(count + 1, width)[:, 0]
    fpr = hits[0] / sizes[0]
    pro = np.ascontiguousarray((hits[1:] / sizes[1:, None]).T).mean(axis=1)
    kept = fpr <= fpr_limit
    if not kept.any():
        return 0.0
    if fpr[kept].max() == 0:
        return float(pro[kept].max())
    order = np.argsort(fpr[kept])
    x, y = fpr[kept][order], pro[kept][order]
    return float(np.trapezoid(y, x / x.max()))
