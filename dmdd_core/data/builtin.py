"""The built-in dataset: three texture categories in MVTec AD layout, generated offline on first use. [ours]

Normal images are random 256x256 crops of scikit-image's real texture photographs ``brick``, ``grass`` and
``gravel`` (512x512 grayscale), with a random position, scale (+-8 %), rotation (k*90 deg +-4 deg),
brightness/contrast jitter and mild sensor noise. They are saved as 8-bit grayscale PNGs, like MVTec AD's grid,
screw and zipper; the loader turns them into three channels. Per category::

    <root>/builtin_v<VERSION>/<category>/train/good/000.png ... 059.png       60 normal images
    <root>/builtin_v<VERSION>/<category>/test/good/000.png ... 019.png        20 normal images
    <root>/builtin_v<VERSION>/<category>/test/<defect>/000.png ... 007.png    8 per defect type, 40 in all
    <root>/builtin_v<VERSION>/<category>/ground_truth/<defect>/000_mask.png   binary masks (0 / 255)

The test defects (:data:`DEFECT_TYPES`: scratches, holes, stains, foreign patches, cuts) are drawn by their own
generators, a different family from the Perlin-mask texture blending used for training. A model that had only
learnt to spot the training recipe would otherwise look better here than it is on real defects. Defect sizes are
spread from a few dozen pixels to about a tenth of the image, with moderate contrast (stains are faint, scratches
thin), so that a naive per-pixel baseline does not solve the task.

Generation is deterministic (fixed seeds): the same version gives byte-identical PNGs on every machine with the
same library versions. The folder name carries :data:`BUILTIN_VERSION`, so a change of the generator regenerates.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import polygon as fill_polygon
from tqdm.auto import tqdm

from dmdd_core.catalog import BUILTIN_CATEGORIES
from dmdd_core.config import is_fast_mode

BUILTIN_VERSION: int = 1
DEFECT_TYPES: tuple[str, ...] = ("scratch", "hole", "stain", "foreign", "cut")
N_TRAIN: int = 60
N_TEST_GOOD: int = 20
N_PER_DEFECT: int = 8
IMAGE_SIDE: int = 256
MARKER_NAME: str = ".dmdd_builtin.json"

_BASE_SEED = 20240803
_SOURCE_SIDE = 512
_CROP_SIDE = 320.0
_FOREIGN_MATERIAL = {"brick": "gravel", "grass": "gravel", "gravel": "grass"}
"""Source of the foreign patches: a fine-grained material other than the category's own."""


def default_data_root() -> Path:
    """``$DMDD_DATA`` if set, else ``$DMDD_HOME/data`` (one root for data and runs, e.g. a Drive folder on Colab),
    else ``~/.cache/dmdd``: the folder holding ``builtin_v<VERSION>`` and the downloads."""
    env = os.environ.get("DMDD_DATA", "").strip()
    home = os.environ.get("DMDD_HOME", "").strip()
    return Path(env).expanduser() if env else Path(home).expanduser() / "data" if home else Path.home() / ".cache" / "dmdd"


def _source_texture(category: str) -> np.ndarray:
    """scikit-image's real texture photograph of ``category``, (512,512) float64 [0,1]."""
    import skimage.data

    return getattr(skimage.data, category)().astype(np.float64) / 255.0


# --- normal images -----------------------------------------------------------------------------------------------
class _Cropper:
    """Random rotated, scaled 256x256 crops of one source texture (cubic spline, mirror at the borders)."""

    def __init__(self, source: np.ndarray) -> None:
        smoothed = ndimage.gaussian_filter(source, 0.4)
        self.coeffs = ndimage.spline_filter(smoothed, order=3, mode="mirror")
        self.source_mean = float(source.mean())

    def crop(self, rng: np.random.Generator) -> np.ndarray:
        """(256,256) float64 crop of the source."""
        side = _CROP_SIDE * rng.uniform(0.92, 1.08)
        theta = math.radians(90.0 * int(rng.integers(4)) + rng.uniform(-4.0, 4.0))
        half = side / 2.0
        centre = rng.uniform(half, _SOURCE_SIDE - half, size=2)
        scale = side / IMAGE_SIDE
        cos, sin = math.cos(theta) * scale, math.sin(theta) * scale
        matrix = np.array([[cos, -sin], [sin, cos]])
        out_centre = np.full(2, (IMAGE_SIDE - 1) / 2.0)
        offset = centre - matrix @ out_centre
        return ndimage.affine_transform(
            self.coeffs, matrix, offset, output_shape=(IMAGE_SIDE, IMAGE_SIDE), order=3, mode="mirror",
            prefilter=False,
        )


def _photometric_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness/contrast jitter and mild Gaussian noise, then 8-bit quantisation."""
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-0.04, 0.04)
    image = image + rng.normal(0.0, 0.008, size=image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# --- defects: each returns (image, mask) with mask bool (256,256) ------------------------------------------------
_GRID = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float64)


def _centre(rng: np.random.Generator, radius: float) -> np.ndarray:
    margin = min(radius * 0.6 + 4.0, IMAGE_SIDE / 2.0 - 1.0)
    return rng.uniform(margin, IMAGE_SIDE - margin, size=2)


def _scratch(image: np.ndarray, size: float, rng: np.random.Generator, other: np.ndarray) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """A thin curved bright or dark line (quadratic Bezier), 1-3 px wide."""
    length = 16.0 + 150.0 * size
    start = _centre(rng, length)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    direction = np.array([math.sin(theta), math.cos(theta)])
    end = start + direction * length
    bend = np.array([-direction[1], direction[0]]) * rng.uniform(-0.3, 0.3) * length
    control = (start + end) / 2.0 + bend
    t = np.linspace(0.0, 1.0, int(4 * length))[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    points = np.round(points).astype(int)
    inside = np.all((points >= 0) & (points < IMAGE_SIDE), axis=1)
    centre_line = np.zeros(image.shape, dtype=bool)
    centre_line[points[inside, 0], points[inside, 1]] = True
    distance = ndimage.distance_transform_edt(~centre_line)
    half_width = rng.uniform(0.4, 1.2)
    alpha = np.clip(half_width + 0.5 - distance, 0.0, 1.0)
    target = 1.0 if rng.random() < 0.5 else 0.0
    strength = rng.uniform(0.25, 0.5)
    out = image + alpha * strength * (target - image)
    return out, alpha > 0.0


def _hole(image: np.ndarray, size: float, rng: np.random.Generator, other: np.ndarray) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """A dark elliptical pit with soft shading and a lit rim on one side."""
    semi_major = 3.0 + 28.0 * size
    semi_minor = semi_major * rng.uniform(0.5, 1.0)
    centre = _centre(rng, semi_major)
    phi = rng.uniform(0.0, math.pi)
    dy, dx = _GRID[0] - centre[0], _GRID[1] - centre[1]
    u = (dx * math.cos(phi) + dy * math.sin(phi)) / semi_major
    v = (-dx * math.sin(phi) + dy * math.cos(phi)) / semi_minor
    radius = np.sqrt(u**2 + v**2)
    alpha = np.clip((1.0 - radius) * semi_minor / 1.5, 0.0, 1.0)
    light = rng.uniform(0.0, 2.0 * math.pi)
    shading = 0.5 + 0.5 * (u * math.cos(light) + v * math.sin(light)) / np.maximum(radius, 1e-6)
    depth = rng.uniform(0.2, 0.45)
    floor = image * (1.0 - depth * (0.7 + 0.3 * shading))
    out = image * (1.0 - alpha) + floor * alpha
    rim = np.clip(1.0 - np.abs(radius - 1.0) * semi_minor / 1.2, 0.0, 1.0) * np.clip(1.0 - shading, 0.0, 1.0)
    out = out + 0.08 * rim
    return out, radius <= 1.0 + 1.0 / semi_minor


def _wobbly_radius(rng: np.random.Generator, angle: np.ndarray, amount: float) -> np.ndarray:
    """1 + a few random low-frequency harmonics of the polar angle."""
    wobble = np.zeros_like(angle)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.0, amount / k) * np.cos(k * angle + rng.uniform(0.0, 2.0 * math.pi))
    return 1.0 + wobble


def _stain(image: np.ndarray, size: float, rng: np.random.Generator, other: np.ndarray) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    """A faint irregular discolouration: small brightness shift and flattened texture, soft edges."""
    radius0 = 8.0 + 45.0 * size
    centre = _centre(rng, radius0)
    dy, dx = _GRID[0] - centre[0], _GRID[1] - centre[1]
    angle = np.arctan2(dy, dx)
    radius = np.hypot(dy, dx) / (radius0 * _wobbly_radius(rng, angle, 0.5))
    alpha = np.clip((1.0 - radius) / 0.4, 0.0, 1.0)
    alpha = alpha * alpha * (3.0 - 2.0 * alpha)
    local_mean = ndimage.uniform_filter(image, 9)
    flattened = local_mean + (image - local_mean) * rng.uniform(0.6, 0.85)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.07)
    out = image * (1.0 - alpha) + (flattened + shift) * alpha
    return out, alpha > 0.2


def _foreign(image: np.ndarray, size: float, rng: np.random.Generator, other: np.ndarray) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """A patch of another material inside an irregular polygon with a hard edge, matched to the local mean and
    contrast."""
    radius0 = 6.0 + 38.0 * size
    centre = _centre(rng, radius0)
    n_vertices = int(rng.integers(5, 11))
    angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, n_vertices))
    radii = radius0 * rng.uniform(0.5, 1.0, n_vertices)
    rows = centre[0] + radii * np.sin(angles)
    cols = centre[1] + radii * np.cos(angles)
    mask = np.zeros(image.shape, dtype=bool)
    rr, cc = fill_polygon(rows, cols, shape=image.shape)
    mask[rr, cc] = True
    top, left = rng.integers(0, other.shape[0] - IMAGE_SIDE, size=2)
    patch = other[top : top + IMAGE_SIDE, left : left + IMAGE_SIDE]
    if not mask.any():
        mask[int(centre[0]), int(centre[1])] = True
    region_mean, region_std = image[mask].mean(), image[mask].std()
    patch_std = max(float(patch[mask].std()), 1e-3)
    contrast = region_std / patch_std * rng.uniform(0.8, 1.2)
    patch_scaled = region_mean + (patch - patch[mask].mean()) * contrast + rng.uniform(-0.03, 0.03)
    return np.where(mask, patch_scaled, image), mask


def _cut(image: np.ndarray, size: float, rng: np.random.Generator, other: np.ndarray) -> tuple[np.ndarray,
                                                                                               np.ndarray]:
    """A slightly wavy strip whose content is displaced across it, with dark cut edges."""
    length = 20.0 + 140.0 * size
    width = rng.uniform(2.0, 4.0) + 5.0 * size
    centre = _centre(rng, length / 2.0)
    theta = rng.uniform(0.0, math.pi)
    dy, dx = _GRID[0] - centre[0], _GRID[1] - centre[1]
    along = dx * math.cos(theta) + dy * math.sin(theta)
    across = -dx * math.sin(theta) + dy * math.cos(theta)
    across = across - rng.uniform(0.0, 3.0) * np.sin(along / rng.uniform(8.0, 20.0))
    strip = (np.abs(across) <= width / 2.0) & (np.abs(along) <= length / 2.0)
    edge = (np.abs(np.abs(across) - width / 2.0) < 0.9) & (np.abs(along) <= length / 2.0 + 0.9)
    shift = rng.uniform(3.0, 8.0) * rng.choice([-1.0, 1.0])
    normal = np.array([math.cos(theta), -math.sin(theta)])
    displaced = ndimage.map_coordinates(
        image, [_GRID[0] + shift * normal[0], _GRID[1] + shift * normal[1]], order=1, mode="mirror"
    )
    out = np.where(strip, displaced * rng.uniform(0.85, 0.97), image)
    out = np.where(edge, out * rng.uniform(0.6, 0.8), out)
    return out, strip | edge


DefectFn = Callable[[np.ndarray, float, np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]
_DEFECTS: dict[str, DefectFn] = {"scratch": _scratch, "hole": _hole, "stain": _stain, "foreign": _foreign, "cut": _cut}


# --- writing -----------------------------------------------------------------------------------------------------
def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _generate_category(category_index: int, category: str, folder: Path, bar: tqdm) -> None:
    """Write one category's train, test and ground-truth PNGs under ``folder``."""
    cropper = _Cropper(_source_texture(category))
    foreign_source = _source_texture(_FOREIGN_MATERIAL[category])
    for i in range(N_TRAIN):
        rng = np.random.default_rng([_BASE_SEED, category_index, 0, i])
        _save_png(_photometric_jitter(cropper.crop(rng), rng), folder / "train" / "good" / f"{i:03d}.png")
        bar.update()
    for i in range(N_TEST_GOOD):
        rng = np.random.default_rng([_BASE_SEED, category_index, 1, i])
        _save_png(_photometric_jitter(cropper.crop(rng), rng), folder / "test" / "good" / f"{i:03d}.png")
        bar.update()
    for type_index, defect_type in enumerate(DEFECT_TYPES):
        for i in range(N_PER_DEFECT):
            rng = np.random.default_rng([_BASE_SEED, category_index, 2 + type_index, i])
            size = (i + rng.uniform(0.0, 1.0)) / N_PER_DEFECT
            normal = cropper.crop(rng)
            image, mask = _DEFECTS[defect_type](normal, size, rng, foreign_source)
            _save_png(_photometric_jitter(image, rng), folder / "test" / defect_type / f"{i:03d}.png")
            _save_png(mask.astype(np.uint8) * 255, folder / "ground_truth" / defect_type / f"{i:03d}_mask.png")
            bar.update()


def _is_complete(folder: Path) -> bool:
    marker = folder / MARKER_NAME
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == BUILTIN_VERSION
    except (OSError, ValueError):
        return False


def ensure_builtin_dataset(root: str | Path | None = None, *, force: bool = False) -> Path:
    """Path of the built-in dataset ``<root>/builtin_v<VERSION>``, generated on first use (a few seconds).

    ``root`` defaults to :func:`default_data_root` (``$DMDD_DATA`` or ``~/.cache/dmdd``). The dataset is generated
    in a temporary sibling folder and moved into place atomically, so an interrupted run leaves nothing half
    written; ``force=True`` regenerates it.
    """
    parent = Path(root).expanduser() if root is not None else default_data_root()
    target = parent / f"builtin_v{BUILTIN_VERSION}"
    if not force and _is_complete(target):
        return target
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        total = len(BUILTIN_CATEGORIES) * (N_TRAIN + N_TEST_GOOD + N_PER_DEFECT * len(DEFECT_TYPES))
        with tqdm(total=total, desc="built-in dataset", unit="img", disable=is_fast_mode() or not sys.stderr.isatty()) as bar:
            for index, category in enumerate(BUILTIN_CATEGORIES):
                _generate_category(index, category, staging / category, bar)
        marker = {"version": BUILTIN_VERSION, "categories": list(BUILTIN_CATEGORIES), "defects": list(DEFECT_TYPES)}
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2))
        if target.exists():
            if not force and _is_complete(target):
                return target
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.replace(target, retired / target.name)
            shutil.rmtree(retired, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
