"""The distillation losses (NGM, AIM) and the segmentation losses (focal, L1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dmdd_core.losses import aim_loss, focal_loss, l1_loss, ngm_loss

LEVELS = ((8, 16), (12, 8), (16, 4))
"""(channels, side) of three feature levels of a 64x64 image at strides 4, 8, 16."""


def features(seed: int, batch: int = 2) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=g) for c, s in LEVELS]


def quadrant_mask(batch: int = 2, side: int = 64) -> Tensor:
    """(B,1,64,64) mask set on the top-left quadrant: block-aligned at every level."""
    mask = torch.zeros(batch, 1, side, side)
    mask[:, :, : side // 2, : side // 2] = 1
    return mask


def inside_quadrant(t: Tensor) -> Tensor:
    """(B,C,s,s) -> bool (B,1,s,s), True in the top-left quadrant."""
    m = torch.zeros(t.shape[0], 1, *t.shape[-2:], dtype=torch.bool)
    m[:, :, : t.shape[-2] // 2, : t.shape[-1] // 2] = True
    return m


@torch.no_grad()
def mean_cos(a: list[Tensor], b: list[Tensor], inside: bool) -> float:
    values = []
    for f, t in zip(a, b):
        cos = F.cosine_similarity(f, t, dim=1)
        region = inside_quadrant(t)[:, 0]
        values.append(cos[region if inside else ~region].mean())
    return float(torch.stack(values).mean())


# --- NGM --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("region", ["all", "normal"])
def test_ngm_is_zero_for_identical_features_and_positive_otherwise(region: str) -> None:
    t = features(0)
    mask = quadrant_mask()
    assert float(ngm_loss([x.clone() for x in t], t, mask, region)) == pytest.approx(0.0, abs=1e-5)
    assert float(ngm_loss(features(1), t, mask, region)) > 0.5


def test_ngm_is_cosine_distance_summed_over_batch_and_levels() -> None:
    f, t = features(0), features(1)
    expected = sum((1 - F.cosine_similarity(a, b, dim=1)).mean(dim=(1, 2)).sum() for a, b in zip(f, t))
    torch.testing.assert_close(ngm_loss(f, t), expected)


@pytest.mark.parametrize("region", ["all", "normal"])
def test_ngm_ignores_the_scale_of_each_feature_vector(region: str) -> None:
    f, t = features(0), features(1)
    g = torch.Generator().manual_seed(2)
    scaled = [x * (0.01 + 10 * torch.rand(x.shape[0], 1, *x.shape[-2:], generator=g)) for x in f]
    mask = quadrant_mask()
    torch.testing.assert_close(ngm_loss(scaled, t, mask, region), ngm_loss(f, t, mask, region))


def test_ngm_normal_region_ignores_the_anomaly() -> None:
    f, t = features(0), features(1)
    mask = quadrant_mask()
    changed = [torch.where(inside_quadrant(x), torch.randn_like(x) * 5, x) for x in f]
    torch.testing.assert_close(ngm_loss(changed, t, mask, "normal"), ngm_loss(f, t, mask, "normal"))
    assert not torch.allclose(ngm_loss(changed, t, mask, "all"), ngm_loss(f, t, mask, "all"))


def test_ngm_normal_region_needs_the_mask() -> None:
    with pytest.raises(ValueError, match="mask"):
        ngm_loss(features(0), features(1), None, "normal")


# --- AIM --------------------------------------------------------------------------------------------------------
def test_aim_pushes_away_inside_the_anomaly_and_pulls_outside() -> None:
    teacher = features(0)
    noise = features(1)
    free = [(t + 0.8 * n).requires_grad_(True) for t, n in zip(teacher, noise)]
    mask = quadrant_mask()
    inside_before = mean_cos(free, teacher, inside=True)
    outside_before = mean_cos(free, teacher, inside=False)
    assert inside_before > 0.5 and outside_before > 0.5
    optimizer = torch.optim.SGD(free, lr=20.0)
    for _ in range(100):
        optimizer.zero_grad()
        aim_loss(free, teacher, mask).backward()
        optimizer.step()
    assert mean_cos(free, teacher, inside=True) < inside_before - 0.4
    assert mean_cos(free, teacher, inside=False) > outside_before + 0.1


def test_aim_with_empty_mask_is_the_normal_term_only() -> None:
    f, t = features(0), features(1)
    empty = torch.zeros(2, 1, 64, 64)
    expected = sum((1 - F.cosine_similarity(a, b, dim=1)).mean(dim=(1, 2)).sum() for a, b in zip(f, t))
    torch.testing.assert_close(aim_loss(f, t, empty), expected)
    assert float(aim_loss(f, t, empty, normal_term=False)) == 0.0


def test_aim_skips_the_anomalous_term_per_sample() -> None:
    f, t = features(0), features(1)
    mask = quadrant_mask()
    mask[1] = 0
    both = aim_loss(f, t, mask)
    first = aim_loss([x[:1] for x in f], [x[:1] for x in t], mask[:1])
    second = aim_loss([x[1:] for x in f], [x[1:] for x in t], mask[1:])
    second_normal_only = ngm_loss([x[1:] for x in f], [x[1:] for x in t])
    torch.testing.assert_close(both, first + second)
    torch.testing.assert_close(second, second_normal_only)


@pytest.mark.parametrize("margin", [0.0, 0.25, 0.5, 1.0, 1.5])
def test_aim_margin(margin: float) -> None:
    t = features(0)
    mask = quadrant_mask()
    batch, levels = 2, len(LEVELS)
    expected = batch * levels * max(0.0, 1.0 - margin)
    assert float(aim_loss([x.clone() for x in t], t, mask, margin=margin)) == pytest.approx(expected, abs=1e-4)
    assert float(aim_loss([x.clone() for x in t], t, mask, margin=margin, normal_term=False)) == pytest.approx(
        expected, abs=1e-4
    )


def test_aim_inside_term_ignores_features_already_far_enough() -> None:
    t = features(0)
    opposite = [-x for x in t]
    mask = torch.ones(2, 1, 64, 64)
    assert float(aim_loss(opposite, t, mask)) == pytest.approx(0.0, abs=1e-5)
    assert float(aim_loss([x.clone() for x in t], t, mask)) == pytest.approx(2 * len(LEVELS), abs=1e-4)


# --- segmentation losses ----------------------------------------------------------------------------------------
def test_focal_and_l1_are_near_zero_for_perfect_logits_and_large_for_wrong_ones() -> None:
    target = quadrant_mask(2, 16)
    perfect = torch.where(target > 0, 20.0, -20.0)
    wrong = -perfect
    assert float(focal_loss(perfect, target)) < 1e-6
    assert float(l1_loss(perfect, target)) < 1e-6
    assert float(focal_loss(wrong, target)) > 10.0
    assert float(l1_loss(wrong, target)) > 0.99


def test_focal_loss_matches_its_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g) * 3
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.7).float()
    p = torch.sigmoid(logits)
    p_t = torch.where(target > 0, p, 1 - p)
    for gamma in (0.0, 2.0, 4.0):
        expected = (-((1 - p_t) ** gamma) * torch.log(p_t)).mean()
        torch.testing.assert_close(focal_loss(logits, target, gamma), expected, atol=1e-5, rtol=1e-4)
