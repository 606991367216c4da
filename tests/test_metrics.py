"""The metrics: hand-computed cases, a brute-force threshold sweep, ties, empty masks, the PRO variants, and test
sets whose images differ in size."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from dmdd_core.metrics import (
    ImageSet,
    aupro,
    aupro_linear_thresholds,
    aupro_per_image,
    f1_max_threshold,
    image_auroc,
    label_regions,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    pixel_metrics,
    pro_curve,
)


def brute_force_aupro(masks: ImageSet, maps: ImageSet, limit: float = 0.3) -> float:
    """AUPRO straight from its definition: every distinct score as a threshold, loops, no shortcuts. ``masks``
    and ``maps``: (N,H,W) arrays or lists of 2-D arrays of any sizes."""
    from scipy import ndimage

    regions, normal_parts = [], []
    for mask, score in zip(masks, maps):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [score[labels == r] for r in range(1, n + 1)]
        normal_parts.append(score[~np.asarray(mask).astype(bool)])
    normal = np.concatenate(normal_parts)
    points = [(0.0, 0.0)]
    for t in sorted({float(v) for score in maps for v in np.ravel(score)}, reverse=True):
        points.append((float(np.mean(normal >= t)), float(np.mean([np.mean(r >= t) for r in regions]))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (limit - x0) * (y1 - y0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_case(seed: int, n: int = 4, size: int = 12, levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n - 1):  # the last image is good
        for _ in range(rng.integers(1, 3)):
            r, c = rng.integers(0, size - 3, size=2)
            h, w = rng.integers(1, 4, size=2)
            masks[i, r : r + h, c : c + w] = 1
    maps = rng.random((n, size, size)) + 0.8 * masks * rng.random((n, size, size))
    if levels is not None:
        maps = np.round(maps * levels) / levels  # many ties
    return masks, maps


def test_perfect_and_inverted_maps() -> None:
    masks, _ = random_case(0)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0)
    assert aupro_per_image(masks, masks.astype(float)) == pytest.approx(1.0)
    assert pixel_ap(masks, masks.astype(float)) == pytest.approx(1.0)


def test_hand_computed_partial_overlap() -> None:
    # One image, 10 pixels in a row: a region of 2 pixels (0, 1), 8 normal pixels.
    masks = np.zeros((1, 1, 10), dtype=np.uint8)
    masks[0, 0, :2] = 1
    maps = np.array([[[0.9, 0.5, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1, 0.0]]])
    # Thresholds: 0.9 -> (0, 1/2); 0.8 -> (1/8, 1/2); 0.7 -> (2/8, 1/2); 0.6 -> (3/8, 1/2) past 0.3.
    fpr, pro = pro_curve(masks, maps)
    assert fpr[:4].tolist() == [0.0, 0.0, 0.125, 0.25] and pro[:4].tolist() == [0.0, 0.5, 0.5, 0.5]
    # Area to 0.3: 0.5 * 0.3 (the curve is flat at 0.5 from FPR 0) -> AUPRO 0.5.
    assert aupro(masks, maps) == pytest.approx(0.5)
    assert brute_force_aupro(masks, maps) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_sweep(seed: int) -> None:
    masks, maps = random_case(seed)
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-12)


@pytest.mark.parametrize("levels", [3, 10])
def test_ties_are_merged_like_the_brute_force(levels: int) -> None:
    masks, maps = random_case(7, levels=levels)
    assert len(np.unique(maps)) <= levels * 2 + 1
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-12)
    assert aupro(masks, np.zeros_like(maps)) == pytest.approx(brute_force_aupro(masks, np.zeros_like(maps)))


def test_regions_are_eight_connected_and_weighted_equally() -> None:
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = 1  # touching diagonally: one region
    masks[0, 4, 4] = 1  # a second region
    labels, count = label_regions(masks)
    assert count == 2 and labels[0, 0, 0] == labels[0, 1, 1] != labels[0, 4, 4]
    maps = np.zeros((1, 6, 6))
    maps[0, 4, 4] = 1.0  # the small region found entirely, the larger not at all: PRO 1/2 at FPR 0
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps))
    assert pro_curve(masks, maps)[1][1] == pytest.approx(0.5)


def test_empty_masks_and_bad_shapes_are_errors() -> None:
    with pytest.raises(ValueError, match="masks are empty"):
        aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    with pytest.raises(ValueError, match="anomaly-free"):
        aupro(np.ones((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match=r"\(N,H,W\)"):
        aupro(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        aupro(np.eye(4)[None], np.full((1, 4, 4), np.nan))
    with pytest.raises(ValueError, match="masks are empty"):
        pixel_ap(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))


def test_the_variants_differ_from_the_reference_as_documented() -> None:
    # Defects found perfectly, but the good images carry strong false positives: the reference counts them,
    # the per-image variant does not see them.
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 16, 16), dtype=np.uint8)
    masks[0, 2:6, 2:6] = masks[1, 8:12, 3:9] = 1
    maps = rng.random((4, 16, 16)) * 0.5 + masks * 0.5
    maps[2:, :8] += 0.6  # false positives on half of each good image
    reference, per_image = aupro(masks, maps), aupro_per_image(masks, maps)
    assert per_image == pytest.approx(1.0) and reference < 0.9
    linear = aupro_linear_thresholds(masks, maps)
    assert 0.0 <= linear <= 1.0
    assert aupro_linear_thresholds(masks, masks.astype(float)) == pytest.approx(1.0)


def test_linear_threshold_variant_differs_and_tends_to_the_reference() -> None:
    masks, maps = random_case(3, n=6, size=24)
    reference = aupro(masks, maps)
    coarse = aupro_linear_thresholds(masks, maps, num_thresholds=20)
    usual = aupro_linear_thresholds(masks, maps)
    fine = aupro_linear_thresholds(masks, maps, num_thresholds=20000)
    assert abs(coarse - reference) > 0.005
    assert abs(fine - reference) < abs(coarse - reference) and abs(fine - reference) < 0.002
    assert usual != reference


def test_f1_max_threshold_hand_case() -> None:
    f1, threshold = f1_max_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]))
    # Threshold 0.4: predictions {0.6, 0.4, 0.9} -> TP 2, FP 1 -> F1 = 4 / 5.
    assert f1 == pytest.approx(0.8) and threshold == pytest.approx(0.4)


def test_pixel_f1_max_hand_case() -> None:
    masks = np.array([[[0, 0], [1, 1]]])
    maps = np.array([[[0.1, 0.6], [0.4, 0.9]]])
    assert pixel_f1_max(masks, maps) == pytest.approx(0.8)  # as in the image case above: threshold 0.4
    assert pixel_f1_max(masks, maps) == f1_max_threshold(masks.ravel(), maps.ravel())[0]


# --- test sets whose images differ in size (each image at its original size) ------------------------------------
def linear_thresholds_by_loop(masks: ImageSet, maps: ImageSet, limit: float = 0.3, num_thresholds: int = 200) -> float:
    """The 200-linear-threshold variant as first written: one pass over every pixel per threshold."""
    regions, count = label_regions(masks)
    flat_regions = np.concatenate([np.ravel(r) for r in regions])
    scores = np.concatenate([np.ravel(s) for s in maps])
    normal = flat_regions == 0
    sizes = np.bincount(flat_regions, minlength=count + 1)[1:].astype(np.float64)
    fprs, pros = [], []
    for t in np.linspace(scores.min(), scores.max(), num_thresholds):
        hit = scores >= t
        fprs.append(hit[normal].mean())
        pros.append(np.mean(np.bincount(flat_regions[hit], minlength=count + 1)[1:] / sizes))
    fpr, pro = np.asarray(fprs), np.asarray(pros)
    kept = fpr <= limit
    if not kept.any():
        return 0.0
    if fpr[kept].max() == 0:
        return float(pro[kept].max())
    order = np.argsort(fpr[kept])
    return float(np.trapezoid(pro[kept][order], fpr[kept][order] / fpr[kept][order].max()))


def mixed_sizes_case(seed: int, levels: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Five images of five sizes (the last one good), float32 maps, one to two rectangular defects each."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i, (h, w) in enumerate([(9, 14), (12, 12), (7, 20), (16, 10), (11, 13)]):
        mask = np.zeros((h, w), dtype=np.uint8)
        for _ in range(rng.integers(1, 3) if i < 4 else 0):
            r, c = rng.integers(0, h - 3), rng.integers(0, w - 3)
            mask[r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = 1
        score = rng.random((h, w)) + 0.8 * mask * rng.random((h, w))
        if levels is not None:
            score = np.round(score * levels) / levels
        masks.append(mask)
        maps.append(score.astype(np.float32))
    return masks, maps


def test_a_list_of_equal_sizes_gives_what_the_stacked_array_gives() -> None:
    masks, maps = random_case(4, n=5, size=14, levels=20)
    as_lists = (list(masks), list(maps))
    for fn in (pixel_auroc, pixel_ap, pixel_f1_max, aupro, aupro_per_image, aupro_linear_thresholds):
        assert fn(*as_lists) == fn(masks, maps), fn.__name__
    for got, expected in zip(pro_curve(*as_lists), pro_curve(masks, maps)):
        np.testing.assert_array_equal(got, expected)
    labels, count = label_regions(list(masks))
    np.testing.assert_array_equal(np.stack(labels), label_regions(masks)[0])
    assert count == label_regions(masks)[1]
    assert aupro(tuple(masks), maps) == aupro(masks, maps)  # a tuple, or one side a list, is a per-image set too


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 4])
def test_mixed_sizes_match_the_pooled_pixels_and_the_brute_force(seed: int, levels: int | None) -> None:
    masks, maps = mixed_sizes_case(seed, levels)
    target = np.concatenate([m.ravel() for m in masks]).astype(bool)
    pooled = np.concatenate([s.ravel() for s in maps]).astype(np.float64)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(target, pooled), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(target, pooled), abs=1e-12)
    best_f1 = max(2 * (target & (pooled >= t)).sum() / (target.sum() + (pooled >= t).sum()) for t in set(pooled))
    assert pixel_f1_max(masks, maps) == pytest.approx(best_f1, abs=1e-12)
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-12)
    assert aupro_linear_thresholds(masks, maps) == pytest.approx(linear_thresholds_by_loop(masks, maps), abs=1e-12)
    alone = [brute_force_aupro([m], [s]) for m, s in zip(masks, maps) if m.any()]
    assert aupro_per_image(masks, maps) == pytest.approx(np.mean(alone), abs=1e-12)
    labels, count = label_regions(masks)
    assert [r.shape for r in labels] == [m.shape for m in masks] and all(r.dtype == np.int32 for r in labels)
    ids = np.concatenate([np.unique(r[r > 0]) for r in labels])
    assert sorted(ids.tolist()) == list(range(1, count + 1))  # ids unique over the set


def test_images_side_by_side_equal_the_list_of_them() -> None:
    # Two images of one height and different widths, no defect touching the seam: as a list, or as one wide
    # image, they hold the same pixels and the same regions, so every metric agrees.
    rng = np.random.default_rng(5)
    left, right = np.zeros((10, 7), np.uint8), np.zeros((10, 12), np.uint8)
    left[2:5, 1:4] = 1
    right[6:9, 3:6] = right[0:2, 8:10] = 1
    maps = [rng.random(left.shape) + 0.5 * left, rng.random(right.shape) + 0.5 * right]
    wide_mask, wide_map = np.hstack([left, right])[None], np.hstack(maps)[None]
    for fn in (pixel_auroc, pixel_ap, pixel_f1_max, aupro, aupro_linear_thresholds):
        assert fn([left, right], maps) == pytest.approx(fn(wide_mask, wide_map), abs=1e-12), fn.__name__


@pytest.mark.parametrize("seed", range(3))
def test_linear_thresholds_match_the_loop_over_thresholds(seed: int) -> None:
    masks, maps = random_case(seed, n=5, size=20)
    for num in (2, 17, 200):
        for m in (maps, maps.astype(np.float32), np.round(maps * 5) / 5):
            assert aupro_linear_thresholds(masks, m, num_thresholds=num) == pytest.approx(
                linear_thresholds_by_loop(masks, m, num_thresholds=num), abs=1e-12)
    constant = np.zeros_like(maps)
    assert aupro_linear_thresholds(masks, constant) == linear_thresholds_by_loop(masks, constant)


def test_mismatched_images_are_errors_that_say_which() -> None:
    masks, maps = mixed_sizes_case(0)
    swapped = maps[:1] + [maps[2], maps[1]] + maps[3:]
    for fn in (pixel_auroc, pixel_ap, pixel_f1_max, aupro, aupro_per_image, aupro_linear_thresholds, pro_curve):
        with pytest.raises(ValueError, match=r"mask 1 \(12, 12\) and map 1 \(7, 20\)"):
            fn(masks, swapped)
        with pytest.raises(ValueError, match="5 masks but 4 maps"):
            fn(masks, maps[:4])
    with pytest.raises(ValueError, match="must be 2-D"):
        aupro(masks, [maps[0], *maps[1:4], maps[4][None]])
    with pytest.raises(ValueError, match="pixel AUROC: masks .* differ in shape"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        aupro(masks, [*maps[:4], np.full(maps[4].shape, np.nan)])
    with pytest.raises(ValueError, match="masks are empty"):
        aupro([np.zeros((3, 4)), np.zeros((5, 2))], [np.ones((3, 4)), np.ones((5, 2))])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("levels", [None, 7])
def test_pixel_metrics_from_one_sort_match_scikit_learn(dtype: type, levels: int | None) -> None:
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(3)
    masks = rng.random((6, 20, 24)) < 0.1
    maps = (rng.random(masks.shape) + 0.4 * masks).astype(dtype)
    if levels:  # many tied scores, across both classes
        maps = (np.round(maps * levels) / levels).astype(dtype)
    target, pooled = masks.ravel(), maps.ravel()
    precision, recall, _ = precision_recall_curve(target, pooled)
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    together = pixel_metrics(masks, maps)
    assert together["pixel_auroc"] == pytest.approx(roc_auc_score(target, pooled), abs=1e-12)
    assert together["pixel_ap"] == pytest.approx(average_precision_score(target, pooled), abs=1e-12)
    assert together["pixel_f1_max"] == pytest.approx(f1, abs=1e-12)
    assert together == {"pixel_auroc": pixel_auroc(masks, maps), "pixel_ap": pixel_ap(masks, maps),
                        "pixel_f1_max": pixel_f1_max(masks, maps)}
    assert image_auroc(target[:300], pooled[:300]) == pytest.approx(roc_auc_score(target[:300], pooled[:300]), abs=1e-12)
    with pytest.raises(ValueError, match="only normal"):
        pixel_metrics(np.zeros_like(masks), maps)
