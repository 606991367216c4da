"""Read any image file into an RGB float array in [0, 1]: the one decoder used by the data and synthesis code.

Modes handled: 1, L, LA, P (with or without transparency), RGB, RGBA, CMYK, I;16 (16-bit PNG), I and F.
Alpha is dropped (the colour channels are kept as they are), grayscale is repeated over three channels. [ours]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
"""File name endings treated as images (case-insensitive)."""

_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def is_image_file(path: str | Path) -> bool:
    """True for a regular file whose suffix is in :data:`IMAGE_EXTENSIONS`."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def open_image(path: str | Path) -> Image.Image:
    """Open and decode an image file; raise ValueError naming the file if it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    try:
        with Image.open(p) as img:
            img.load()
            return img.copy() if img.mode != "P" else img.convert("RGBA")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {p}: {err}. Is it a valid image file?") from err


def _high_bit_gray(img: Image.Image) -> np.ndarray:
    """(H,W) float32 in [0,1] from a 16/32-bit integer or float grayscale image."""
    arr = np.asarray(img).astype(np.float32)
    if img.mode == "F":
        return np.clip(arr / 255.0 if arr.max(initial=0.0) > 1.0 else arr, 0.0, 1.0)
    if img.mode.startswith("I;16") or arr.max(initial=0.0) > 255.0:
        return np.clip(arr / 65535.0, 0.0, 1.0)
    return np.clip(arr / 255.0, 0.0, 1.0)


def read_rgb(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Image file -> (H,W,3) float32 in [0,1]; resized to ``size`` = (H,W) with antialiased bicubic if given.

    A non-square image is stretched to ``size`` (no crop), as DeSTSeg resizes MVTec AD images. [DeSTSeg]
    """
    return rgb_array(open_image(path), size)


def rgb_array(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """A decoded image -> (H,W,3) float32 in [0,1], as :func:`read_rgb`."""
    if img.mode in _HIGH_BIT_MODES:
        gray = _high_bit_gray(img)
        if size is not None:
            resized = Image.fromarray(gray).resize((size[1], size[0]), Image.Resampling.BICUBIC)
            gray = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[:, :, None], 3, axis=2)
    rgb = img.convert("RGB")
    if size is not None and rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def binary_mask_array(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """A decoded mask -> (H,W) float32 in {0,1}: any non-zero colour channel is foreground; nearest resize."""
    arr = np.asarray(img)
    if arr.ndim == 3:
        colour_channels = 1 if img.mode in ("LA", "La", "PA") else min(arr.shape[2], 3)
        arr = arr[:, :, :colour_channels].max(axis=2)
    fg = Image.fromarray((arr > 0).astype(np.uint8) * 255)
    if size is not None and fg.size != (size[1], size[0]):
        fg = fg.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return (np.asarray(fg) > 0).astype(np.float32)
