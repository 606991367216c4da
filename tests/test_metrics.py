"""The metrics: hand-computed cases, a brute-force threshold sweep, ties, empty masks, and the PRO variants."""

from __future__ import annotations

import numpy as np
import pytest

from dmdd_core.metrics import (
    aupro,
    aupro_linear_thresholds,
    aupro_per_image,
    f1_max_threshold,
    label_regions,
    pixel_ap,
    pro_curve,
)


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """AUPRO straight from its definition: every distinct score as a threshold, loops, no shortcuts."""
    from scipy import ndimage

    regions = []
    for mask, score in zip(masks, maps):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [score[labels == r] for r in range(1, n + 1)]
    normal = maps[~masks.astype(bool)]
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
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
