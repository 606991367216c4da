"""Synthetic anomalies: Perlin masks and texture blending -> (original, augmented, mask). [DeSTSeg]

The one synthesis code path of the package (METHOD.md section 1), used by training, notebooks and tests:

1. optionally rotate the normal image I by its category's policy (:func:`rotate_for_category`);
2. M = threshold(rotate(Perlin noise at scale 2^kx x 2^ky)), k in 0..5 (:func:`perlin_mask`);
3. T = a random crop of a texture image, resized to I (:class:`TextureSource`);
4. I_aug = I*(1-M) + (1-beta)*T*M + beta*I*M with beta ~ U(0, beta_max) (:func:`synthesize_anomaly`).

Every random draw comes from the ``np.random.Generator`` passed in, so a sample is a pure function of its seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from dmdd_core.catalog import ROTATION_POLICY, rotation_policy  # noqa: F401  (re-exported: the rotation table)
from dmdd_core.imageio import IMAGE_EXTENSIONS, is_image_file, read_rgb

FILL_VALUE: float = 114.0 / 255.0
"""Fill grey (114,114,114) for pixels a rotation brings in from outside the image. [DeSTSeg]"""


# --- Perlin noise ------------------------------------------------------------------------------------------------
def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic interpolant 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2D gradient (Perlin) noise, (H,W) float32 roughly in [-1,1], with res = (cells along H, cells along W).

    A lattice of res+1 random unit gradients covers a padded grid of res*ceil(shape/res) pixels, of which the
    top-left (H,W) is returned, so the shape need not be divisible by res. [ours]
    """
    h, w = shape
    ry, rx = res
    if h < 1 or w < 1 or ry < 1 or rx < 1:
        raise ValueError(f"perlin_noise needs positive shape and res, got shape={shape}, res={res}")
    cell_h, cell_w = -(-h // ry), -(-w // rx)
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(ry + 1, rx + 1))
    grad_y, grad_x = np.sin(angles), np.cos(angles)

    pos_y = np.arange(h) / cell_h  # (H,) position in lattice units
    pos_x = np.arange(w) / cell_w  # (W,)
    iy, ix = pos_y.astype(np.int64), pos_x.astype(np.int64)
    fy, fx = pos_y - iy, pos_x - ix

    def corner(dy: int, dx: int) -> np.ndarray:
        """Dot product of the corner's gradient with the offset to the pixel, (H,W)."""
        rows, cols = np.ix_(iy + dy, ix + dx)
        return grad_y[rows, cols] * (fy - dy)[:, None] + grad_x[rows, cols] * (fx - dx)[None, :]

    u, v = _fade(fx)[None, :], _fade(fy)[:, None]
    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top = n00 + u * (n01 - n00)
    bottom = n10 + u * (n11 - n10)
    return (math.sqrt(2.0) * (top + v * (bottom - top))).astype(np.float32)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    max_scale_exp: int = 5,
    threshold: float = 0.5,
) -> np.ndarray:
    """Binary anomaly mask M, (H,W) float32 in {0,1}; may be empty. [DeSTSeg]

    Perlin noise with 2^k cells per axis (k drawn independently per axis from 0..max_scale_exp, clipped to the
    image), rotated by an angle in [-90, 90] degrees (reflect padding), thresholded at ``threshold``.
    """
    h, w = shape
    ky, kx = rng.integers(0, max_scale_exp + 1, size=2)
    res = (min(2 ** int(ky), h), min(2 ** int(kx), w))
    noise = perlin_noise(shape, res, rng)
    angle = float(rng.uniform(-90.0, 90.0))
    noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="reflect")
    return (noise > threshold).astype(np.float32)


# --- texture sources ---------------------------------------------------------------------------------------------
_SKIMAGE_FILES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "cell": "cell.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "colorwheel": "color.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "logo": "logo.png",
    "moon": "moon.png",
    "motorcycle": "motorcycle_left.png",
    "page": "page.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "text": "text.png",
}
"""scikit-image's bundled sample images (files inside the installed package; no download)."""

_SKLEARN_FILES: tuple[str, ...] = ("china.jpg", "flower.jpg")
"""scikit-learn's bundled sample images (``sklearn.datasets.load_sample_images``)."""

_PROCEDURAL_KINDS: tuple[str, ...] = ("stripes", "checker", "colour_noise", "blobs")
_PROCEDURAL_SIZE = 384
_MAX_TEXTURE_SIDE = 1024


def _skimage_data_dir() -> Path | None:
    try:
        import skimage.data
    except ImportError:
        return None
    return Path(skimage.data.data_dir)


def _sklearn_images_dir() -> Path | None:
    try:
        import sklearn.datasets
    except ImportError:
        return None
    return Path(sklearn.datasets.__file__).parent / "images"


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.05, 0.95, size=3).astype(np.float32)


def procedural_texture(kind: str, seed: int, size: int = _PROCEDURAL_SIZE) -> np.ndarray:
    """A texture drawn from ``seed``: stripes, checker, colour_noise or blobs; (size,size,3) float32 [0,1]. [ours]"""
    rng = np.random.default_rng([seed, _PROCEDURAL_KINDS.index(kind)])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0.0, math.pi)
    along = xx * math.cos(theta) + yy * math.sin(theta)
    across = -xx * math.sin(theta) + yy * math.cos(theta)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    if kind == "stripes":
        period = rng.uniform(6.0, 40.0)
        t = 0.5 + 0.5 * np.sin(2.0 * math.pi * along / period + rng.uniform(0, 2 * math.pi))
        t = t ** rng.uniform(0.5, 2.0)
    elif kind == "checker":
        cell = rng.uniform(8.0, 48.0)
        t = ((np.floor(along / cell) + np.floor(across / cell)) % 2).astype(np.float32)
        t = ndimage.gaussian_filter(t, 0.7)
    elif kind == "colour_noise":
        sigma = rng.uniform(2.0, 12.0)
        field = ndimage.gaussian_filter(rng.standard_normal((size, size, 3)), (sigma, sigma, 0))
        field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
        return field.astype(np.float32)
    elif kind == "blobs":
        sigma = rng.uniform(4.0, 16.0)
        field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
        t = (field > np.quantile(field, rng.uniform(0.3, 0.7))).astype(np.float32)
        t = ndimage.gaussian_filter(t, 1.0)
    else:
        raise ValueError(f"unknown procedural texture {kind!r}; choose one of {_PROCEDURAL_KINDS}")
    grain = 0.03 * rng.standard_normal((size, size, 1))
    image = c0 * (1.0 - t[:, :, None]) + c1 * t[:, :, None] + grain
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _to_uint8_capped(image: np.ndarray) -> np.ndarray:
    """(H,W,3) float [0,1] -> uint8, the longest side shrunk to at most _MAX_TEXTURE_SIDE (memory)."""
    pil = Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8))
    longest = max(pil.size)
    if longest > _MAX_TEXTURE_SIDE:
        scale = _MAX_TEXTURE_SIDE / longest
        pil = pil.resize((round(pil.size[0] * scale), round(pil.size[1] * scale)), Image.Resampling.BICUBIC)
    return np.asarray(pil)


class TextureSource:
    """A set of texture images T for the synthesis, loaded lazily and cached as uint8. [ours]

    Build with :meth:`builtin` (offline: real photographs shipped by scikit-image and scikit-learn, plus procedural
    textures) or :meth:`from_folder` (DTD, the paper's setting [DeSTSeg]).
    """

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]]) -> None:
        if not loaders:
            raise ValueError("a TextureSource needs at least one texture")
        self._loaders = dict(loaders)
        self._names = tuple(self._loaders)
        self._cache: dict[str, np.ndarray] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """Texture names, e.g. ``skimage:coffee``, ``sklearn:china``, ``procedural:stripes_0`` or a file path."""
        return self._names

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"TextureSource({len(self)} textures, {len(self._cache)} loaded)"

    @classmethod
    def builtin(cls, exclude: Iterable[str] = (), seed: int = 0, variants: int = 2) -> TextureSource:
        """Offline textures: scikit-image and scikit-learn sample photographs + ``variants`` procedural ones per
        kind (stripes, checker, colour_noise, blobs) drawn from ``seed``. Files are read from the installed
        packages, never downloaded. ``exclude`` drops textures by full name (``skimage:brick``) or short name
        (``brick``), e.g. a category's own material. [ours]
        """
        excluded = set(exclude)

        def keep(full_name: str) -> bool:
            return full_name not in excluded and full_name.split(":", 1)[1] not in excluded

        loaders: dict[str, Callable[[], np.ndarray]] = {}
        skimage_dir = _skimage_data_dir()
        if skimage_dir is not None:
            for short, filename in _SKIMAGE_FILES.items():
                path = skimage_dir / filename
                if path.is_file() and keep(f"skimage:{short}"):
                    loaders[f"skimage:{short}"] = partial(read_rgb, path)
        sklearn_dir = _sklearn_images_dir()
        if sklearn_dir is not None:
            for filename in _SKLEARN_FILES:
                path = sklearn_dir / filename
                if path.is_file() and keep(f"sklearn:{path.stem}"):
                    loaders[f"sklearn:{path.stem}"] = partial(read_rgb, path)
        for kind in _PROCEDURAL_KINDS:
            for variant in range(variants):
                name = f"procedural:{kind}_{variant}"
                if keep(name) and kind not in excluded:
                    loaders[name] = partial(procedural_texture, kind, seed * 1000 + variant)
        return cls(loaders)

    @classmethod
    def from_folder(cls, path: str | Path) -> TextureSource:
        """Every image file under ``path`` (recursive), e.g. DTD's ``images/`` folder. [DeSTSeg: DTD]"""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"texture folder not found: {root}. Point texture_dir at a folder of images "
                                    "(e.g. DTD's images/), or leave it unset for the built-in textures.")
        files = sorted(p for p in root.rglob("*") if is_image_file(p))
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under texture folder "
                                    f"{root}")
        return cls({str(p.relative_to(root)): partial(read_rgb, p) for p in files})

    def image(self, name: str) -> np.ndarray:
        """The full texture ``name`` as (H,W,3) uint8, loaded on first use and cached."""
        cached = self._cache.get(name)
        if cached is None:
            cached = _to_uint8_capped(self._loaders[name]())
            self._cache[name] = cached
        return cached

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        """A random texture, randomly cropped (30-100 % of its shorter side, target aspect ratio) and resized to
        ``size`` = (H,W); (H,W,3) float32 in [0,1]. [ours]"""
        out_h, out_w = size
        name = self._names[int(rng.integers(len(self._names)))]
        texture = self.image(name)
        tex_h, tex_w = texture.shape[:2]
        aspect = out_w / out_h
        crop_h = float(rng.uniform(0.3, 1.0)) * min(tex_h, tex_w / aspect)
        crop_w = crop_h * aspect
        top = float(rng.uniform(0.0, tex_h - crop_h))
        left = float(rng.uniform(0.0, tex_w - crop_w))
        pil = Image.fromarray(texture).resize(
            (out_w, out_h), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h)
        )
        return np.asarray(pil, dtype=np.float32) / 255.0


# --- blending ----------------------------------------------------------------------------------------------------
def synthesize_anomaly(
    image: np.ndarray,
    textures: TextureSource,
    rng: np.random.Generator,
    *,
    beta_max: float = 0.8,
    max_scale_exp: int = 5,
    threshold: float = 0.5,
    match_grayscale: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste a texture into a normal image inside a Perlin mask. [DeSTSeg]

    image (H,W,3) float32 [0,1] -> (I_aug (H,W,3) float32, M (H,W) float32 {0,1}), with
    I_aug = I*(1-M) + (1-beta)*T*M + beta*I*M and beta ~ U(0, beta_max). Applied to every sample; M may be empty.
    Draw order from ``rng``: mask, texture, beta.

    ``match_grayscale``: when the image is grayscale (three equal channels), the texture is turned to grayscale
    too, so that colour alone never gives a synthetic anomaly away; real defects on a grayscale product are
    grayscale. [ours; DeSTSeg pastes colour textures everywhere]
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"synthesize_anomaly expects an (H,W,3) image, got shape {image.shape}")
    h, w = image.shape[:2]
    mask = perlin_mask((h, w), rng, max_scale_exp=max_scale_exp, threshold=threshold)
    texture = textures.sample(rng, (h, w))
    if match_grayscale and is_grayscale(image):
        texture = np.repeat(texture.mean(axis=2, keepdims=True), 3, axis=2)
    beta = float(rng.uniform(0.0, beta_max))
    m = mask[:, :, None]
    augmented = image * (1.0 - m) + (1.0 - beta) * texture * m + beta * image * m
    return augmented.astype(np.float32), mask


def is_grayscale(image: np.ndarray, tolerance: float = 1e-6) -> bool:
    """True when the three channels of an (H,W,3) image are equal."""
    return bool(np.ptp(image, axis=2).max(initial=0.0) <= tolerance)


# --- per-category rotation ---------------------------------------------------------------------------------------
SMALL_ANGLE: float = 5.0
"""Half-width in degrees of the small random rotation. [DeSTSeg]"""


def rotate_for_category(image: np.ndarray, category: str, rng: np.random.Generator) -> np.ndarray:
    """Rotate a normal image (H,W,3) float32 by its category's policy; uncovered pixels get grey 114. [DeSTSeg]

    Returns ``image`` itself for policy "none" (no draw from ``rng``).
    """
    policy = rotation_policy(category)
    if policy == "none":
        return image
    quarter_turns = int(rng.integers(4)) if policy == "right_angle_small" else 0
    angle = float(rng.uniform(-SMALL_ANGLE, SMALL_ANGLE))
    h, w = image.shape[:2]
    if h == w:
        image = np.rot90(image, quarter_turns, axes=(0, 1))
    else:
        angle += 90.0 * quarter_turns
    rotated = ndimage.rotate(image, angle, axes=(1, 0), reshape=False, order=1, mode="constant", cval=FILL_VALUE)
    return np.clip(rotated, 0.0, 1.0).astype(np.float32)
