"""Perlin masks, texture sources, the blending formula and the per-category rotation policy."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmdd_core.synthesis import (
    FILL_VALUE,
    ROTATION_POLICY,
    TextureSource,
    perlin_mask,
    perlin_noise,
    rotate_for_category,
    rotation_policy,
    synthesize_anomaly,
)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("shape,res", [((64, 64), (4, 4)), ((100, 70), (3, 7)), ((37, 129), (32, 1))])
def test_perlin_noise_shape_range_and_determinism(shape: tuple[int, int], res: tuple[int, int]) -> None:
    noise = perlin_noise(shape, res, _rng(0))
    assert noise.shape == shape and noise.dtype == np.float32
    assert np.isfinite(noise).all() and np.abs(noise).max() <= 1.0 + 1e-5
    assert noise.std() > 0.05
    np.testing.assert_array_equal(noise, perlin_noise(shape, res, _rng(0)))
    assert not np.array_equal(noise, perlin_noise(shape, res, _rng(1)))


@pytest.mark.parametrize("res", [(4, 4), (16, 8), (32, 32)])
def test_thresholded_noise_has_both_classes(res: tuple[int, int]) -> None:
    mask = perlin_noise((128, 128), res, _rng(3)) > 0.5
    assert 0 < mask.mean() < 0.5


def test_perlin_mask_is_binary_with_both_classes_and_deterministic() -> None:
    fractions = []
    for seed in range(12):
        mask = perlin_mask((96, 80), _rng(seed), max_scale_exp=5, threshold=0.5)
        assert mask.shape == (96, 80) and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        np.testing.assert_array_equal(mask, perlin_mask((96, 80), _rng(seed)))
        fractions.append(mask.mean())
    fractions_arr = np.array(fractions)
    assert (fractions_arr > 0).sum() >= 8 and (fractions_arr < 1).all()
    assert perlin_mask((64, 64), _rng(0), threshold=-2.0).all()


def _constant_texture(folder: Path, value: tuple[int, int, int]) -> TextureSource:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), value).save(folder / "flat.png")
    return TextureSource.from_folder(folder)


def test_synthesize_anomaly_follows_blend_formula(tmp_path: Path) -> None:
    colour = np.array([200, 30, 90]) / 255.0
    textures = _constant_texture(tmp_path / "tex", (200, 30, 90))
    image = np.random.default_rng(7).uniform(0.3, 0.7, size=(64, 64, 3)).astype(np.float32)
    seed = next(s for s in range(100) if perlin_mask((64, 64), _rng(s)).any())
    augmented, mask = synthesize_anomaly(image, textures, _rng(seed), beta_max=0.8)
    assert augmented.shape == image.shape and mask.shape == (64, 64)
    assert augmented.dtype == np.float32 and mask.dtype == np.float32
    np.testing.assert_array_equal(mask, perlin_mask((64, 64), _rng(seed)))
    outside, inside = mask == 0, mask == 1
    np.testing.assert_array_equal(augmented[outside], image[outside])
    betas = (augmented[inside] - colour) / (image[inside] - colour)
    beta = float(np.median(betas))
    assert 0.0 <= beta <= 0.8
    expected = (1 - beta) * colour + beta * image[inside]
    np.testing.assert_allclose(augmented[inside], expected, atol=1e-5)


def test_grayscale_images_get_grayscale_anomalies(tmp_path: Path) -> None:
    textures = _constant_texture(tmp_path / "tex", (200, 30, 90))
    gray = np.repeat(np.random.default_rng(3).uniform(0.3, 0.7, size=(64, 64, 1)), 3, axis=2).astype(np.float32)
    colour = np.random.default_rng(4).uniform(0.3, 0.7, size=(64, 64, 3)).astype(np.float32)
    seed = next(s for s in range(100) if perlin_mask((64, 64), _rng(s)).any())
    augmented, mask = synthesize_anomaly(gray, textures, _rng(seed))
    assert mask.any() and np.ptp(augmented, axis=2).max() < 1e-5
    inside = mask == 1
    assert np.abs(augmented[inside] - gray[inside]).max() > 0.05
    unmatched, _ = synthesize_anomaly(gray, textures, _rng(seed), match_grayscale=False)
    assert np.ptp(unmatched[inside], axis=1).max() > 0.1
    coloured, _ = synthesize_anomaly(colour, textures, _rng(seed))
    red_shift = (coloured[inside, 0] - coloured[inside, 1]).mean() - (colour[inside, 0] - colour[inside, 1]).mean()
    assert red_shift > 0.05


def test_synthesize_anomaly_is_deterministic() -> None:
    textures = TextureSource.builtin()
    image = np.full((48, 48, 3), 0.5, dtype=np.float32)
    a1, m1 = synthesize_anomaly(image, textures, _rng(11))
    a2, m2 = synthesize_anomaly(image, textures, _rng(11))
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(m1, m2)


def test_rotation_policy_table() -> None:
    for category in ("capsule", "metal_nut", "pill", "toothbrush", "transistor"):
        assert ROTATION_POLICY[category] == "none"
    for category in ("wood", "zipper", "cable"):
        assert ROTATION_POLICY[category] == "small"
    for category in ("bottle", "grid", "hazelnut", "leather", "tile", "carpet", "screw", "brick", "grass", "gravel"):
        assert ROTATION_POLICY[category] == "right_angle_small"
    assert rotation_policy("bracket_black") == "none"
    assert rotation_policy("no_such_category") == "none"


def _ramp(size: int = 64) -> np.ndarray:
    """(size,size,3) image brightening from left to right."""
    ramp = np.tile(np.linspace(0.0, 1.0, size, dtype=np.float32), (size, 1))
    return np.repeat(ramp[:, :, None], 3, axis=2)


def _brightest_side(image: np.ndarray) -> str:
    centre = image[16:-16, 16:-16, 0]
    dy = centre[-8:].mean() - centre[:8].mean()
    dx = centre[:, -8:].mean() - centre[:, :8].mean()
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "bottom" if dy > 0 else "top"


def test_rotate_none_returns_image_unchanged() -> None:
    image = _ramp()
    np.testing.assert_array_equal(rotate_for_category(image, "capsule", _rng(0)), image)
    np.testing.assert_array_equal(rotate_for_category(image, "unknown_thing", _rng(0)), image)


def test_rotate_small_keeps_orientation_and_fills_grey() -> None:
    image = _ramp()
    for seed in range(8):
        rotated = rotate_for_category(image, "wood", _rng(seed))
        assert rotated.shape == image.shape
        assert _brightest_side(rotated) == "right"
        assert not np.array_equal(rotated, image)
    corners = np.stack([rotate_for_category(image, "wood", _rng(s))[0, 0] for s in range(8)])
    assert np.isclose(corners, FILL_VALUE, atol=1e-4).all(axis=1).any()


def test_rotate_right_angle_reaches_all_four_orientations() -> None:
    image = _ramp()
    sides = {_brightest_side(rotate_for_category(image, "bottle", _rng(seed))) for seed in range(40)}
    assert sides == {"left", "right", "top", "bottom"}


def test_builtin_textures_load_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("TextureSource.builtin tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    textures = TextureSource.builtin()
    assert len(textures.names) >= 8
    assert any(n.startswith("skimage:") for n in textures.names)
    assert any(n.startswith("sklearn:") for n in textures.names)
    assert any(n.startswith("procedural:") for n in textures.names)
    for name in textures.names:
        full = textures.image(name)
        assert full.dtype == np.uint8 and full.ndim == 3 and full.shape[2] == 3
    sample = textures.sample(_rng(0), (50, 70))
    assert sample.shape == (50, 70, 3) and sample.dtype == np.float32
    assert 0.0 <= sample.min() and sample.max() <= 1.0


def test_builtin_textures_exclude() -> None:
    names = TextureSource.builtin(exclude=("brick", "skimage:grass", "stripes")).names
    assert "skimage:brick" not in names and "skimage:grass" not in names
    assert not any("stripes" in n for n in names)
    assert "skimage:gravel" in names


def test_texture_source_from_folder(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (20, 30), (255, 0, 0)).save(tmp_path / "a" / "red.png")
    Image.new("L", (25, 25), 128).save(tmp_path / "a" / "b" / "grey.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    textures = TextureSource.from_folder(tmp_path)
    assert sorted(textures.names) == [str(Path("a/b/grey.jpg")), str(Path("a/red.png"))]
    for seed in range(4):
        sample = textures.sample(_rng(seed), (16, 16))
        assert sample.shape == (16, 16, 3) and 0.0 <= sample.min() and sample.max() <= 1.0


def test_texture_source_from_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        TextureSource.from_folder(empty)
    with pytest.raises(FileNotFoundError, match="missing"):
        TextureSource.from_folder(tmp_path / "missing")
