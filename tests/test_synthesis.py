"""The batched synthesis against independent references: Perlin noise, mask statistics, the blend, texture crops,
grayscale matching and the per-category rotation policy."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage, stats

from dmdd_core.synthesis import (
    FILL_VALUE,
    MaskDraws,
    SynthesisDraws,
    TextureDraws,
    TextureSource,
    affine_grid,
    blend,
    is_grayscale,
    perlin_masks,
    perlin_noise,
    rotate_by_policy,
    step_generator,
    synthesize_anomalies,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- an independent reference of the recipe (METHOD.md section 1), per sample, in numpy and scipy ---------------
def _reference_noise(shape: tuple[int, int], res: tuple[int, int], angles: np.ndarray) -> np.ndarray:
    """Perlin noise pixel by pixel: the four corners' dot products, blended with the quintic fade."""
    h, w = shape
    cell_h, cell_w = math.ceil(h / res[0]), math.ceil(w / res[1])
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    out = np.zeros(shape)
    for i in range(h):
        for j in range(w):
            y, x = i / cell_h, j / cell_w
            iy, ix = int(y), int(x)
            fy, fx = y - iy, x - ix
            dots = {}
            for dy in (0, 1):
                for dx in (0, 1):
                    a = angles[iy + dy, ix + dx]
                    dots[dy, dx] = math.sin(a) * (fy - dy) + math.cos(a) * (fx - dx)
            top = dots[0, 0] + fade(fx) * (dots[0, 1] - dots[0, 0])
            bottom = dots[1, 0] + fade(fx) * (dots[1, 1] - dots[1, 0])
            out[i, j] = math.sqrt(2) * (top + fade(fy) * (bottom - top))
    return out


def _reference_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The recipe as METHOD.md states it: 2^k cells per axis (k in 0..5), the noise rotated by U(-90, 90) degrees
    (mirrored at the border), thresholded at 0.5. Vectorised numpy noise (checked against the loop above)."""
    h, w = shape
    ky, kx = rng.integers(0, 6, size=2)
    ry, rx = min(2**ky, h), min(2**kx, w)
    angles = rng.uniform(0, 2 * np.pi, size=(ry + 1, rx + 1))
    ys, xs = np.arange(h) / math.ceil(h / ry), np.arange(w) / math.ceil(w / rx)
    iy, ix = ys.astype(int), xs.astype(int)
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        a = angles[np.ix_(iy + dy, ix + dx)]
        return np.sin(a) * (fy - dy) + np.cos(a) * (fx - dx)

    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    top = dot(0, 0) + fade(fx) * (dot(0, 1) - dot(0, 0))
    bottom = dot(1, 0) + fade(fx) * (dot(1, 1) - dot(1, 0))
    noise = math.sqrt(2) * (top + fade(fy) * (bottom - top))
    noise = ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, order=1, mode="reflect")
    return noise > 0.5


@pytest.mark.parametrize("shape,res", [((24, 24), (1, 1)), ((30, 22), (3, 7)), ((32, 40), (32, 4))])
def test_perlin_noise_equals_the_per_pixel_formula(shape: tuple[int, int], res: tuple[int, int]) -> None:
    angles = np.random.default_rng(1).uniform(0, 2 * np.pi, size=(33, 33))
    batched = perlin_noise(torch.tensor([res, (2, 2)]), torch.tensor(np.stack([angles, angles])), shape)
    assert batched.shape == (2, *shape) and batched.dtype == torch.float32
    np.testing.assert_allclose(batched[0].numpy(), _reference_noise(shape, res, angles), atol=2e-5)
    assert not torch.allclose(batched[0], batched[1])  # each sample has its own cell count


def test_reference_noise_loop_and_vectorised_reference_agree() -> None:
    rng = np.random.default_rng(4)
    state = rng.bit_generator.state
    mask = _reference_mask((20, 20), rng)
    rng.bit_generator.state = state
    ky, kx = rng.integers(0, 6, size=2)
    res = (min(2**ky, 20), min(2**kx, 20))
    angles = rng.uniform(0, 2 * np.pi, size=(res[0] + 1, res[1] + 1))
    noise = ndimage.rotate(_reference_noise((20, 20), res, angles), rng.uniform(-90, 90), reshape=False, order=1,
                           mode="reflect")
    np.testing.assert_array_equal(mask, noise > 0.5)


def test_perlin_noise_rejects_cells_outside_the_lattice() -> None:
    with pytest.raises(ValueError, match="cells must be"):
        perlin_noise(torch.tensor([[40, 2]]), torch.zeros(1, 33, 33), (64, 64))


def test_affine_grid_equals_torch() -> None:
    theta = torch.randn(3, 2, 3, generator=_gen(0), dtype=torch.float64)
    ours = affine_grid(theta, (17, 23))
    torch.testing.assert_close(ours, F.affine_grid(theta.float(), [3, 1, 17, 23], align_corners=False),
                               atol=1e-5, rtol=1e-5)


def test_mask_statistics_match_the_recipe() -> None:
    """Share of empty masks and the distribution of mask areas, over 2000 masks of each, against the reference."""
    n, shape = 2000, (64, 64)
    ours = perlin_masks(MaskDraws.draw(n, 5, _gen(0)), shape)[:, 0].mean(dim=(1, 2)).numpy()
    rng = np.random.default_rng(0)
    ref = np.array([_reference_mask(shape, rng).mean() for _ in range(n)])
    empty_ours, empty_ref = (ours == 0).mean(), (ref == 0).mean()
    # Two-proportion test of the empty share: |z| < 3.3 (p > 0.001).
    pooled = (empty_ours + empty_ref) / 2
    z = (empty_ours - empty_ref) / math.sqrt(2 * pooled * (1 - pooled) / n)
    assert abs(z) < 3.3, (empty_ours, empty_ref)
    assert 0.01 < empty_ref < 0.5  # the recipe leaves some masks empty
    # Areas of the non-empty masks: two-sample Kolmogorov-Smirnov test.
    assert stats.ks_2samp(ours[ours > 0], ref[ref > 0]).pvalue > 0.001
    assert abs(np.median(ours[ours > 0]) - np.median(ref[ref > 0])) < 0.02


def test_perlin_masks_are_binary_and_seeded() -> None:
    masks = perlin_masks(MaskDraws.draw(12, 5, _gen(3)), (96, 80))
    assert masks.shape == (12, 1, 96, 80) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks, perlin_masks(MaskDraws.draw(12, 5, _gen(3)), (96, 80)))
    assert not torch.equal(masks, perlin_masks(MaskDraws.draw(12, 5, _gen(4)), (96, 80)))
    assert perlin_masks(MaskDraws.draw(2, 5, _gen(0)), (64, 64), threshold=-2.0).all()


def _constant_texture(folder: Path, value: tuple[int, int, int]) -> TextureSource:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), value).save(folder / "flat.png")
    return TextureSource.from_folder(folder)


def test_blend_follows_the_formula_and_beta_is_uniform(tmp_path: Path) -> None:
    """I_aug = I outside M and (1-beta)*T + beta*I inside; beta recovered from 3000 images ~ U(0, 0.8)."""
    colour = torch.tensor([200, 30, 90]) / 255.0
    textures = _constant_texture(tmp_path / "tex", (200, 30, 90))
    n = 3000
    images = torch.full((n, 3, 32, 32), 0.5)
    images[:, 0] = 0.1
    original, augmented, masks = synthesize_anomalies(images, textures, _gen(7), beta_max=0.8, threshold=-2.0)
    assert torch.equal(original, images) and masks.all()
    inside = augmented[:, :, 5, 5]  # every pixel is inside with threshold -2
    betas = ((inside - colour) / (images[:, :, 5, 5] - colour)).median(dim=1).values.numpy()
    np.testing.assert_allclose(augmented, (1 - torch.tensor(betas)[:, None, None, None]) * colour[:, None, None]
                               + torch.tensor(betas)[:, None, None, None] * images, atol=1e-5)
    assert stats.kstest(betas, stats.uniform(0, 0.8).cdf).pvalue > 0.001
    # with the usual threshold, pixels outside the mask are untouched
    original, augmented, masks = synthesize_anomalies(images[:50], textures, _gen(8))
    outside = (masks == 0).expand_as(augmented)
    assert masks.any() and torch.equal(augmented[outside], original[outside])
    # the whole-image formula (blend) gives the same values
    draws = SynthesisDraws.draw(50, 1, _gen(8))
    full = blend(original, colour[None, :, None, None].expand_as(original), masks, draws.beta)
    torch.testing.assert_close(full, augmented, atol=1e-5, rtol=0)


def test_same_generator_same_batch_and_steps_differ() -> None:
    textures = TextureSource.builtin()
    images = torch.rand(6, 3, 48, 48, generator=_gen(0))
    first = synthesize_anomalies(images, textures, step_generator(1, 3, 10), rotation="right_angle_small")
    again = synthesize_anomalies(images, textures, step_generator(1, 3, 10), rotation="right_angle_small")
    other = synthesize_anomalies(images, textures, step_generator(1, 3, 11), rotation="right_angle_small")
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[1], other[1])
    assert 0.0 <= first[1].min() and first[1].max() <= 1.0


def test_grayscale_images_get_grayscale_anomalies(tmp_path: Path) -> None:
    textures = _constant_texture(tmp_path / "tex", (200, 30, 90))
    gray = torch.rand(4, 1, 64, 64, generator=_gen(3)).mul(0.4).add(0.3).expand(4, 3, 64, 64).contiguous()
    colour = torch.rand(4, 3, 64, 64, generator=_gen(4)).mul(0.4).add(0.3)
    images = torch.cat([gray, colour])
    assert is_grayscale(images).tolist() == [True] * 4 + [False] * 4
    _, augmented, masks = synthesize_anomalies(images, textures, _gen(5), threshold=-2.0)
    spread = augmented.amax(dim=1) - augmented.amin(dim=1)
    assert spread[:4].max() < 1e-5  # grayscale stays grayscale
    assert (augmented[:4] - gray).abs().amax() > 0.05  # yet the anomaly is there
    red_shift = (augmented[4:, 0] - augmented[4:, 1]).mean() - (colour[:, 0] - colour[:, 1]).mean()
    assert red_shift > 0.05  # colour images get the colour texture
    _, unmatched, _ = synthesize_anomalies(images, textures, _gen(5), threshold=-2.0, match_grayscale=False)
    assert (unmatched.amax(dim=1) - unmatched.amin(dim=1))[:4].max() > 0.1


def test_texture_crops_follow_the_crop_geometry(tmp_path: Path) -> None:
    """A horizontal ramp texture: each crop must read the ramp at left + (j + 0.5) * crop_w / W."""
    ramp = np.tile((np.arange(60) * 4).astype(np.uint8), (40, 1))
    Image.fromarray(np.stack([ramp] * 3, axis=2)).save(tmp_path / "ramp.png")
    textures = TextureSource.from_folder(tmp_path)
    draws = TextureDraws.draw(16, 1, _gen(0))
    crops = textures.crops(draws, (32, 32))
    assert crops.shape == (16, 3, 32, 32)
    for b in range(16):
        crop = 0.3 + 0.7 * float(draws.scale[b]) * 1.0
        side = crop * 40  # square output: the window's side is a share of the texture's height
        left = float(draws.left[b]) * (60 - side)
        centres = left + (np.arange(32) + 0.5) * side / 32  # continuous x in the texture
        expected = 4 * (centres - 0.5) / 255.0
        inner = (centres >= 0.5) & (centres <= 59.5)
        np.testing.assert_allclose(crops[b, 0, 7].numpy()[inner], expected[inner], atol=1e-4)
        assert torch.allclose(crops[b, 0], crops[b, 0, :1].expand(32, 32))  # every row the same


def test_textures_are_decoded_once_and_kept_as_uint8_tensors() -> None:
    calls: list[str] = []

    def loader(name: str) -> np.ndarray:
        calls.append(name)
        return np.random.default_rng(0).uniform(size=(200, 300, 3)).astype(np.float32)

    textures = TextureSource({"a": lambda: loader("a"), "b": lambda: loader("b")})
    for seed in range(5):
        synthesize_anomalies(torch.rand(8, 3, 32, 32), textures, _gen(seed), threshold=-2.0)
    assert sorted(calls) == ["a", "b"]
    kept = textures.tensor("a", 48)
    assert kept.dtype == torch.uint8 and kept.shape == (3, 48, 72)  # shorter side capped at 1.5 x 32


def test_rotation_policy_table() -> None:
    from dmdd_core.catalog import DATASETS

    mvtec = DATASETS["mvtec"]
    for category in ("capsule", "metal_nut", "pill", "toothbrush", "transistor"):
        assert mvtec.rotation_policy(category) == "none"
    for category in ("wood", "zipper", "cable"):
        assert mvtec.rotation_policy(category) == "small"
    for category in ("bottle", "grid", "hazelnut", "leather", "tile", "carpet", "screw"):
        assert mvtec.rotation_policy(category) == "right_angle_small"
    for category in ("brick", "grass", "gravel"):
        assert DATASETS["builtin"].rotation_policy(category) == "right_angle_small"
    assert DATASETS["mpdd"].rotation_policy("bracket_black") == "none"
    assert mvtec.rotation_policy("no_such_category") == "none"


def _ramps(n: int, size: int = 64) -> torch.Tensor:
    """(n,3,size,size) images brightening from left to right."""
    return torch.linspace(0.0, 1.0, size).expand(n, 3, size, size).contiguous()


def _brightest_side(image: torch.Tensor) -> str:
    centre = image[0, 16:-16, 16:-16]
    dy = float(centre[-8:].mean() - centre[:8].mean())
    dx = float(centre[:, -8:].mean() - centre[:, :8].mean())
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "bottom" if dy > 0 else "top"


def test_rotate_none_returns_images_unchanged() -> None:
    images = _ramps(4)
    draws = SynthesisDraws.draw(4, 1, _gen(0))
    assert rotate_by_policy(images, "none", draws) is images


def test_rotate_small_keeps_orientation_and_fills_grey() -> None:
    images = _ramps(16)
    draws = SynthesisDraws.draw(16, 1, _gen(1))
    rotated = rotate_by_policy(images, "small", draws)
    assert rotated.shape == images.shape
    assert {_brightest_side(r) for r in rotated} == {"right"}
    for image, angle in zip(rotated, draws.small_angle.tolist(), strict=True):
        if abs(angle) > 2:  # the corners come from outside the image
            assert torch.isclose(image[:, 0, 0], torch.tensor(FILL_VALUE), atol=1e-4).all()
    assert (draws.small_angle.abs() <= 5).all()


def test_rotate_right_angle_reaches_all_four_orientations() -> None:
    images = _ramps(40)
    rotated = rotate_by_policy(images, "right_angle_small", SynthesisDraws.draw(40, 1, _gen(2)))
    assert {_brightest_side(r) for r in rotated} == {"left", "right", "top", "bottom"}


def test_rotation_by_a_quarter_turn_is_exact() -> None:
    from dmdd_core.synthesis import rotate

    image = torch.rand(1, 3, 32, 32, generator=_gen(0))
    turned = rotate(image, torch.tensor([90.0]), fill=FILL_VALUE)
    assert torch.allclose(turned, torch.rot90(image, 1, (2, 3)), atol=1e-4) or torch.allclose(
        turned, torch.rot90(image, -1, (2, 3)), atol=1e-4
    )


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
    textures.load_all(64)
    for name in textures.names:
        kept = textures.tensor(name, 96)
        assert kept.dtype == torch.uint8 and kept.ndim == 3 and kept.shape[0] == 3 and min(kept.shape[1:]) <= 96
    crops = textures.crops(TextureDraws.draw(len(textures), len(textures), _gen(0)), (50, 70))
    assert crops.shape == (len(textures), 3, 50, 70) and 0.0 <= crops.min() and crops.max() <= 1.0


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
    crops = textures.crops(TextureDraws.draw(8, 2, _gen(0)), (16, 16))
    assert crops.shape == (8, 3, 16, 16) and 0.0 <= crops.min() and crops.max() <= 1.0


def test_texture_source_from_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        TextureSource.from_folder(empty)
    with pytest.raises(FileNotFoundError, match="missing"):
        TextureSource.from_folder(tmp_path / "missing")


def test_synthesis_rejects_images_that_are_not_a_batch() -> None:
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        synthesize_anomalies(torch.rand(3, 32, 32), TextureSource.builtin(), _gen(0))


def test_generators_of_different_purposes_or_key_counts_differ() -> None:
    draws = [torch.rand(4, generator=g) for g in (step_generator(1, 0, 1), step_generator(1, 0, 1, 0),
                                                 step_generator(2, 0, 1), step_generator(1, 0, 2))]
    for i in range(len(draws)):
        for j in range(i):
            assert not torch.equal(draws[i], draws[j])
    assert torch.equal(torch.rand(4, generator=step_generator(1, 0, 1)), draws[0])


def test_a_crop_reads_the_texture_as_a_whole_texture_read_would() -> None:
    """Only the covered rows and columns are turned to float; the edges of that region must not change values."""
    texture = np.random.default_rng(0).uniform(size=(90, 120, 3)).astype(np.float32)
    textures = TextureSource({"t": lambda: texture})
    draws = TextureDraws.draw(32, 1, _gen(2))
    kept = textures.tensor("t", 150).float() / 255.0
    for b in range(32):  # one crop per call: the region turned to float is that crop's own
        one = TextureDraws(*(t[b : b + 1] for t in (draws.index, draws.scale, draws.top, draws.left)))
        crop = textures.crops(one, (100, 100))[0]  # 27 to 90 px stretched to 100: bilinear upsampling
        side = (0.3 + 0.7 * float(draws.scale[b])) * 90
        top, left = float(draws.top[b]) * (90 - side), float(draws.left[b]) * (120 - side)
        theta = torch.tensor([[[side / 120, 0.0, (2 * left + side) / 120 - 1], [0.0, side / 90, (2 * top + side) / 90 - 1]]])
        grid = F.affine_grid(theta, [1, 3, 100, 100], align_corners=False)
        whole = F.grid_sample(kept[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        torch.testing.assert_close(crop, whole, atol=1e-4, rtol=0)  # float32 rounding of the coordinates
