"""The synthetic anomaly sources that resemble real defects (patches of normal images, strokes, brightness changes):
their output statistics, their shares, and that the paper's texture recipe is unchanged when they are off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from dmdd_core.config import DMDDConfig
from dmdd_core.synthesis import (
    BLOB_MASK_LEVEL,
    STROKE_CONTRAST,
    SourceDraws,
    SourceMix,
    SynthesisDraws,
    TextureSource,
    brightness_fields,
    patch_images,
    step_generator,
    stroke_masks,
    synthesize_anomalies,
)

EVERY_NEW_SOURCE = SourceMix(0, 1, 1, 1)


def _draws(n: int, mix: SourceMix = EVERY_NEW_SOURCE, seed: int = 0) -> SourceDraws:
    return SourceDraws.draw(n, mix, torch.Generator().manual_seed(seed))


def test_each_sample_takes_a_source_in_proportion_to_its_share() -> None:
    kinds = _draws(4000, SourceMix(1, 2, 3, 4)).kind.numpy()
    observed = np.bincount(kinds, minlength=4)
    assert stats.chisquare(observed, 4000 * np.array([0.1, 0.2, 0.3, 0.4])).pvalue > 1e-3
    assert set(_draws(50, SourceMix(0, 0, 1, 0)).kind.tolist()) == {2}


def test_bad_shares_are_rejected_naming_the_fields() -> None:
    with pytest.raises(ValueError, match="positive sum"):
        SourceMix(0, 0, 0, 0)
    with pytest.raises(ValueError, match="synth_stroke"):
        DMDDConfig.preset("smoke", synth_stroke=-1.0)


def test_the_texture_recipe_alone_draws_nothing_more() -> None:
    images = torch.rand(3, 3, 32, 32)
    textures = TextureSource.builtin(variants=1)
    outputs = []
    for mix in (None, SourceMix()):
        generator = step_generator(1, 0, 5)
        outputs.append((*synthesize_anomalies(images, textures, generator, mix=mix), torch.rand(1, generator=generator)))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_a_patch_is_another_image_moved_and_relit() -> None:
    images = torch.stack([torch.full((3, 16, 16), v) for v in (0.2, 0.4, 0.6, 0.8)])
    draws = _draws(4)
    draws.patch_scale[:], draws.patch_shift[:] = 1.0, 0.0
    draws.patch_gain[:], draws.patch_offset[:] = 1.0, 0.0
    assert torch.allclose(patch_images(images, draws), images.roll(1, dims=0), atol=1e-6)  # identity: the next image
    draws = _draws(4, seed=1)
    out = patch_images(images, draws)
    expected = (images.roll(1, dims=0)[:, 0, 0, 0] * draws.patch_gain + draws.patch_offset).clamp(0, 1).float()
    assert torch.allclose(out.flatten(1).mean(1), expected, atol=1e-5) and out.flatten(1).std(1).max() < 1e-5
    # On a ramp, a scale s shrinks or stretches the content: the patch's own slope is the ramp's divided by s.
    ramp = torch.linspace(0, 1, 64).expand(1, 3, 64, 64).repeat(2, 1, 1, 1)
    draws = _draws(2, seed=2)
    draws.patch_scale[:] = torch.tensor([0.5, 2.0], dtype=draws.patch_scale.dtype)
    draws.patch_shift[:], draws.patch_gain[:], draws.patch_offset[:] = 0.0, 1.0, 0.0
    slopes = patch_images(ramp, draws)[:, 0, 32, 28:36].diff(dim=1).mean(1) * 63
    assert torch.allclose(slopes, torch.tensor([2.0, 0.5]), rtol=0.05)


def test_strokes_are_thin_connected_curves_dark_or_bright() -> None:
    n, side = 300, 256
    draws = _draws(n)
    masks = stroke_masks(draws, (side, side))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    # Thin: no more pixels than the width times the curve's length (at most the control polygon's) and a bit.
    points = draws.stroke_points * side
    polygon = (points[:, 1] - points[:, 0]).norm(dim=1) + (points[:, 2] - points[:, 1]).norm(dim=1)
    width = draws.stroke_width.double()
    pixels = masks.flatten(1).sum(1).double()
    assert pixels.min() > 0 and torch.all(pixels <= width * (1.5 * polygon + width + 2))
    eight = np.ones((3, 3))
    assert all(ndimage.label(m[0].numpy(), structure=eight)[1] == 1 for m in masks)  # one connected curve each
    # Wider strokes cover more pixels per curve: the area ratio of width 3 (kernel 3) to width 1 along the same curve.
    same = _draws(40, seed=3)
    same.stroke_width[:] = 1
    thin = stroke_masks(same, (side, side)).sum((1, 2, 3))
    same.stroke_width[:] = 3
    thick = stroke_masks(same, (side, side)).sum((1, 2, 3))
    assert 2.0 < float((thick / thin).median()) < 3.5
    change = draws.stroke_change.abs()
    assert change.min() >= STROKE_CONTRAST[0] and change.max() < STROKE_CONTRAST[1]
    assert stats.binomtest(int((draws.stroke_change < 0).sum()), n).pvalue > 1e-3  # as many dark as bright


def test_brightness_changes_are_smooth_blobs_labelled_where_they_matter() -> None:
    side = 128
    draws = _draws(200, seed=4)
    fields = brightness_fields(draws, (side, side))[:, 0].double()
    peak = fields.abs().flatten(1).amax(1)
    assert torch.allclose(peak, draws.blob_amplitude.abs(), rtol=0.05)
    assert torch.all(torch.sign(fields.flatten(1).sum(1)) == torch.sign(draws.blob_amplitude))
    # Smooth: no step between neighbouring pixels exceeds what a bump over the smallest radius allows.
    steps = torch.maximum(fields.diff(dim=1).abs().flatten(1).amax(1), fields.diff(dim=2).abs().flatten(1).amax(1))
    assert torch.all(steps <= 2.0 * draws.blob_amplitude.abs() / (draws.blob_radius.min(1).values * side))
    # The labelled area is the ellipse where (1 - r^2)^2 >= level: pi * rx * ry * (1 - sqrt(level)).
    labelled = (fields.abs() >= BLOB_MASK_LEVEL * peak[:, None, None]).double().mean((1, 2))
    inside = ((draws.blob_centre - draws.blob_radius).min(1).values > 0) & ((draws.blob_centre + draws.blob_radius).max(1).values < 1)
    expected = np.pi * draws.blob_radius.prod(1) * (1 - BLOB_MASK_LEVEL**0.5)
    assert inside.sum() > 20
    assert torch.allclose(labelled[inside], expected[inside], rtol=0.06)


def test_synthesis_draws_the_sources_after_the_paper_recipe() -> None:
    images = torch.rand(6, 3, 64, 64)
    textures = TextureSource.builtin(variants=1)
    generator = step_generator(1, 3, 7)
    _, augmented, masks = synthesize_anomalies(images, textures, generator, mix=SourceMix(0, 0, 1, 0))
    replay = step_generator(1, 3, 7)
    SynthesisDraws.draw(6, len(textures), replay)
    draws = SourceDraws.draw(6, SourceMix(0, 0, 1, 0), replay)
    expected = stroke_masks(draws, (64, 64))
    assert torch.equal(masks, expected)
    outside = expected == 0
    assert torch.equal(augmented.expand(-1, 3, -1, -1)[outside.expand(-1, 3, -1, -1)], images[outside.expand(-1, 3, -1, -1)])
    change = (augmented - images)[expected.expand(-1, 3, -1, -1) > 0]
    assert change.abs().max() <= STROKE_CONTRAST[1]


def test_config_shares_reach_the_training_batches(tmp_path) -> None:  # noqa: ANN001
    from conftest import make_mvtec_tree
    from dmdd_core.data import SyntheticPairs

    make_mvtec_tree(tmp_path, "part", n_train=4, defects={"good": 1}, size=(32, 32))
    cfg = DMDDConfig.preset("smoke", image_size=32, synth_texture=0.0, synth_brightness=1.0, val_fraction=0.0)
    pairs = SyntheticPairs.from_config(tmp_path, "part", cfg, textures=TextureSource.builtin(variants=1))
    assert pairs.mix == SourceMix(0.0, 0.0, 0.0, 1.0)
    batch = pairs.batch(0)
    # Every sample's anomaly is a brightness change: one ellipse each, no texture.
    assert all(ndimage.label(m[0].numpy())[1] == 1 for m in batch.mask)
