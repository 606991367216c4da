"""Synthetic anomalies, a whole batch at once in torch on the training device -> (original, augmented, mask).

The one synthesis code path of the package (METHOD.md section 1), used by training, the validation split, the
notebooks and the tests. For a batch of normal images I (B,3,H,W) in [0,1]: [DeSTSeg recipe; batched: ours]

1. rotate each I by its category's policy, grey 114 filling the corners (:func:`rotate_by_policy`);
2. M = threshold(rotate(Perlin noise at 2^ky x 2^kx cells)), k in 0..5 per axis and per sample
   (:func:`perlin_masks`);
3. T = a random crop of a random texture, resized to I (:meth:`TextureSource.values_at`);
4. I_aug = I*(1-M) + (1-beta)*T*M + beta*I*M with beta ~ U(0, beta_max) (:func:`synthesize_anomalies`).

Every random number is drawn up front, on the CPU, from the ``torch.Generator`` passed in (:class:`SynthesisDraws`),
then the work runs on the images' device; the same generator state gives the same batch on the same device.
Rotations are ``grid_sample`` with bilinear interpolation, so one call rotates every image of the batch by its
own angle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import Tensor

from dmdd_core.catalog import Policy
from dmdd_core.imageio import IMAGE_EXTENSIONS, is_image_file, read_rgb

FILL_VALUE: float = 114.0 / 255.0
"""Fill grey (114,114,114) for pixels a rotation brings in from outside the image. [DeSTSeg]"""
SMALL_ANGLE: float = 5.0
"""Half-width in degrees of the small random rotation of the normal image. [DeSTSeg]"""
TEXTURE_OVERSAMPLE: float = 1.5
"""Textures are kept with their shorter side at most this many times the image side. [ours]"""
GRAYSCALE_TOLERANCE: float = 1e-6
"""An image whose channels differ by at most this everywhere is grayscale."""


TRAIN_STREAM: int = 1
"""Purpose key of the training batches' generators (:func:`step_generator`)."""
VALIDATION_STREAM: int = 2
"""Purpose key of the validation split's anomalies."""


def step_generator(purpose: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from a purpose (:data:`TRAIN_STREAM`, :data:`VALIDATION_STREAM`) and
    integers, e.g. (seed, step): the draws of a training step are a function of the keys alone, whatever was
    drawn before, and streams of different purposes or key counts never coincide. [ours]"""
    entropy = [int(purpose), len(keys), *(int(k) for k in keys)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _device_key(device: torch.device | str) -> str:
    """``cuda`` and ``cuda:0`` (the current GPU) are the same device: one cache key for both."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _uniform(n: int | tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    shape = (n,) if isinstance(n, int) else n
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


# --- the random draws of a batch ---------------------------------------------------------------------------------
@dataclass
class TextureDraws:
    """Which texture each sample takes, and where it is cropped; (B,) CPU tensors."""

    index: Tensor
    """Texture index into :attr:`TextureSource.names`."""
    scale: Tensor
    """In [0,1): the crop is 30 % + 70 % * scale of the largest window of the image's aspect ratio."""
    top: Tensor
    """In [0,1): the crop's top as a share of the free room above it."""
    left: Tensor
    """In [0,1): the same for its left side."""

    @classmethod
    def draw(cls, n: int, num_textures: int, generator: torch.Generator) -> TextureDraws:
        index = torch.randint(num_textures, (n,), generator=generator)
        return cls(index, *(torch.rand(n, generator=generator, dtype=torch.float64) for _ in range(3)))


@dataclass
class MaskDraws:
    """The random part of the Perlin masks of a batch; CPU tensors."""

    scale_exp: Tensor
    """(B,2) int: k per axis (rows, columns); the noise has min(2^k, side) cells along that axis."""
    gradient_angle: Tensor
    """(B,L,L) float: the angle of the random unit gradient at each lattice corner (L = 2^max_scale_exp + 1)."""
    rotation: Tensor
    """(B,) float: the rotation of the noise in degrees, U(-90, 90)."""

    @classmethod
    def draw(cls, n: int, max_scale_exp: int, generator: torch.Generator) -> MaskDraws:
        lattice = 2**max_scale_exp + 1
        return cls(
            torch.randint(max_scale_exp + 1, (n, 2), generator=generator),
            _uniform((n, lattice, lattice), 0.0, 2.0 * math.pi, generator),
            _uniform(n, -90.0, 90.0, generator),
        )


@dataclass
class SynthesisDraws:
    """Every random number of one synthetic batch, drawn in this order: normal-image rotation (quarter turns,
    small angle), mask, texture, beta. The arithmetic that follows is deterministic."""

    quarter_turns: Tensor
    """(B,) int in 0..3 (used by the "right_angle_small" policy)."""
    small_angle: Tensor
    """(B,) float degrees in [-SMALL_ANGLE, SMALL_ANGLE] (used by "small" and "right_angle_small")."""
    mask: MaskDraws
    texture: TextureDraws
    beta: Tensor
    """(B,) float in [0, beta_max)."""

    @classmethod
    def draw(cls, n: int, num_textures: int, generator: torch.Generator, *, beta_max: float = 0.8,
             max_scale_exp: int = 5) -> SynthesisDraws:
        return cls(
            torch.randint(4, (n,), generator=generator),
            _uniform(n, -SMALL_ANGLE, SMALL_ANGLE, generator),
            MaskDraws.draw(n, max_scale_exp, generator),
            TextureDraws.draw(n, num_textures, generator),
            _uniform(n, 0.0, beta_max, generator),
        )


# --- rotation ----------------------------------------------------------------------------------------------------
def affine_grid(theta: Tensor, shape: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """``F.affine_grid(theta, (B,1,H,W), align_corners=False)`` as two broadcast sums, (B,H,W,2) float32 on
    ``device``; theta (B,2,3) maps output to input coordinates in [-1,1]. About 7x faster than the matrix product
    on a CPU, and equal to it within float32 rounding (tested)."""
    h, w = shape
    theta = theta.to(device, torch.float32)
    xs = (torch.arange(w, device=device, dtype=torch.float32) * 2.0 + 1.0) / w - 1.0  # pixel centres
    ys = (torch.arange(h, device=device, dtype=torch.float32) * 2.0 + 1.0) / h - 1.0
    grid = torch.empty(theta.shape[0], h, w, 2, device=device)
    for k in range(2):  # x, then y
        a, b, c = (theta[:, k, j, None, None] for j in range(3))
        grid[..., k] = a * xs + (b * ys[:, None] + c)
    return grid


def rotate(images: Tensor, degrees: Tensor, fill: float | None = None) -> Tensor:
    """Rotate each image of (B,C,H,W) by its own angle (degrees, (B,)) about its centre, size kept; bilinear.

    Pixels brought in from outside the image take ``fill``, or mirror the image when ``fill`` is None (scipy's
    "reflect"). The angle is in pixel space, so non-square images rotate without shearing. [ours]
    """
    b, _, h, w = images.shape
    rad = torch.deg2rad(degrees.double().cpu())
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w  # x_in = cos*x - sin*y, in normalised coordinates
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos  # y_in = sin*x + cos*y
    grid = affine_grid(theta, (h, w), images.device).to(images.dtype)
    if fill is None:
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    out = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.add_(fill)


def rotation_angles(policy: Policy, draws: SynthesisDraws) -> Tensor | None:
    """The angle in degrees of each normal image under ``policy`` ((B,) CPU tensor), or None for "none"."""
    if policy == "none":
        return None
    if policy == "small":
        return draws.small_angle
    if policy == "right_angle_small":
        return 90.0 * draws.quarter_turns + draws.small_angle
    raise ValueError(f"unknown rotation policy {policy!r}; choose none, small or right_angle_small")


def rotate_by_policy(images: Tensor, policy: Policy, draws: SynthesisDraws) -> Tensor:
    """Rotate normal images (B,3,H,W) in [0,1] by a category's rotation policy (its data source's
    :meth:`~dmdd_core.data.DataSource.rotation_policy`); uncovered pixels get grey 114.

    "small": U(-5, 5) degrees; "right_angle_small": a random multiple of 90 degrees plus U(-5, 5); "none":
    ``images`` itself. [DeSTSeg policies; one rotation for both parts: ours]
    """
    angles = rotation_angles(policy, draws)
    if angles is None:
        return images
    return rotate(images, angles, fill=FILL_VALUE).clamp_(0.0, 1.0)


# --- Perlin noise ------------------------------------------------------------------------------------------------
def _fade(t: Tensor) -> Tensor:
    """Perlin's quintic interpolant 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _lattice_weights(side: int, cells: Tensor, lattice: int, offset_weighted: bool) -> Tensor:
    """(B,side,L): how much each pixel along one axis takes from each lattice line, for :func:`perlin_noise`.

    A pixel at position p (in cells) lies between lines floor(p) and floor(p)+1 with fraction f; it takes
    1 - fade(f) from the first and fade(f) from the second, times its offset to that line (f, then f - 1) when
    ``offset_weighted``.
    """
    b = cells.shape[0]
    cell = torch.div(side + cells - 1, cells, rounding_mode="floor")  # (B,) pixels per cell
    pos = torch.arange(side, device=cells.device)[None, :] / cell[:, None]  # (B,side) position in cells
    line = pos.floor().long()
    f = pos - line
    weights = torch.zeros(b, side, lattice, device=cells.device)
    for d, w in ((0, 1.0 - _fade(f)), (1, _fade(f))):
        weights.scatter_(2, (line + d)[:, :, None], (w * (f - d) if offset_weighted else w)[:, :, None])
    return weights


def perlin_noise(cells: Tensor, gradient_angle: Tensor, shape: tuple[int, int],
                 device: torch.device | str = "cpu") -> Tensor:
    """2D gradient (Perlin) noise for a batch, (B,H,W) float32 roughly in [-1,1]. [DRAEM/DeSTSeg; batched: ours]

    ``cells`` (B,2): cells along H and W for each sample (any mix in one batch); ``gradient_angle`` (B,L,L): the
    unit gradient (sin a, cos a) of each lattice corner (L > every cell count). A cell spans ceil(side/cells)
    pixels, so the side need not be divisible by the cell count; the noise is the top-left (H,W) of that grid.

    Perlin's noise at a pixel with fractions (fy, fx) inside its cell blends the four corners' dot products
    g . (fy - dy, fx - dx) with the weights (1 - fade or fade) of each axis. Both the weights and the offsets
    split into a row part and a column part, so the whole map is two matrix products per image:
    noise = sqrt(2) * (Wy_off @ Gy @ Wx + Wy @ Gx @ Wx_off), with Gy, Gx the (L,L) gradient components and W
    the (side,L) weights of :func:`_lattice_weights`. Equal to the per-pixel formula (tested). [ours]
    """
    h, w = shape
    lattice = gradient_angle.shape[1]
    if cells.ndim != 2 or cells.shape[1] != 2 or int(cells.min()) < 1 or int(cells.max()) >= lattice:
        raise ValueError(f"cells must be (B,2) in 1..{lattice - 1}, got {tuple(cells.shape)} "
                         f"with values {int(cells.min())}..{int(cells.max())}")
    cells = cells.to(device)
    angle = gradient_angle.to(device, torch.float32)  # (B,L,L)
    grad_y, grad_x = torch.sin(angle), torch.cos(angle)
    rows_off = _lattice_weights(h, cells[:, 0], lattice, True)  # (B,H,L)
    rows = _lattice_weights(h, cells[:, 0], lattice, False)
    cols = _lattice_weights(w, cells[:, 1], lattice, False).transpose(1, 2)  # (B,L,W)
    cols_off = _lattice_weights(w, cells[:, 1], lattice, True).transpose(1, 2)
    noise = torch.bmm(torch.bmm(rows_off, grad_y), cols)  # (B,H,W)
    noise = torch.baddbmm(noise, torch.bmm(rows, grad_x), cols_off)
    return noise.mul_(math.sqrt(2.0))


def perlin_masks(draws: MaskDraws, shape: tuple[int, int], threshold: float = 0.5,
                 device: torch.device | str = "cpu") -> Tensor:
    """Binary anomaly masks M, (B,1,H,W) float32 in {0,1}; a mask may be empty. [DeSTSeg]

    Perlin noise with min(2^k, side) cells per axis, rotated by its angle in [-90, 90] degrees (mirrored at the
    border), thresholded at ``threshold``.
    """
    h, w = shape
    sides = torch.tensor([h, w])
    cells = torch.minimum(2 ** draws.scale_exp, sides)  # (B,2)
    noise = perlin_noise(cells, draws.gradient_angle, shape, device)[:, None]  # (B,1,H,W)
    noise = rotate(noise, draws.rotation, fill=None)
    return (noise > threshold).float()


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


class TextureSource:
    """A set of texture images T for the synthesis, decoded lazily, once, and kept as uint8. [ours]

    Build with :meth:`builtin` (offline: real photographs shipped by scikit-image and scikit-learn, plus procedural
    textures) or :meth:`from_folder` (DTD, the paper's setting [DeSTSeg]).
    """

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]]) -> None:
        if not loaders:
            raise ValueError("a TextureSource needs at least one texture")
        self._loaders = dict(loaders)
        self._names = tuple(self._loaders)
        self._tensors: dict[tuple[str, int, str], Tensor] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """Texture names, e.g. ``skimage:coffee``, ``sklearn:china``, ``procedural:stripes_0`` or a file path."""
        return self._names

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"TextureSource({len(self)} textures, {len(self._tensors)} loaded)"

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

    def tensor(self, name: str, short_side: int, device: torch.device | str = "cpu") -> Tensor:
        """Texture ``name`` as a (3,h,w) uint8 tensor on ``device``, its shorter side shrunk (antialiased) to at
        most ``short_side``; decoded and moved once, then served from the cache. [ours]"""
        key = (name, int(short_side), _device_key(device))
        cached = self._tensors.get(key)
        if cached is None:
            cached = self._decode(name, short_side).to(device)
            self._tensors[key] = cached
        return cached

    def _decode(self, name: str, short_side: int) -> Tensor:
        """Read texture ``name`` and shrink it: (3,h,w) uint8 on the CPU."""
        pil = Image.fromarray(np.round(np.clip(self._loaders[name](), 0.0, 1.0) * 255.0).astype(np.uint8))
        shorter = min(pil.size)
        if shorter > short_side:
            scale = short_side / shorter
            size = (max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale)))
            pil = pil.resize(size, Image.Resampling.BICUBIC)
        return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()

    def load_all(self, image_side: int, device: torch.device | str = "cpu", progress: bool | None = None) -> None:
        """Decode every texture now, in a thread pool, for images of side ``image_side`` (otherwise each is decoded
        on first use, in the training loop, which then waits)."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        from dmdd_core.config import progress_disabled

        short_side = math.ceil(TEXTURE_OVERSAMPLE * image_side)
        missing = [n for n in self._names if (n, short_side, _device_key(device)) not in self._tensors]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            decoded = pool.map(lambda name: (name, self._decode(name, short_side)), missing)
            for name, texture in tqdm(decoded, total=len(missing), desc="decode textures",
                                      disable=progress_disabled(progress) or len(missing) < 100):
                self._tensors[(name, short_side, _device_key(device))] = texture.to(device)

    def values_at(self, draws: TextureDraws, where: Tensor) -> tuple[Tensor, Tensor]:
        """Texture values at the pixels ``where`` (B,H,W) bool is True: (points (P,3) long as (sample, row,
        column), values (P,3) float in [0,1]), on ``where``'s device. [ours]

        Sample b takes texture ``draws.index[b]`` and a crop of ``30 % + 70 % * draws.scale[b]`` of the largest
        window of the image's aspect ratio, placed at ``draws.top``/``draws.left`` (shares of the free room),
        stretched over the image and read bilinearly. Only the asked pixels are computed: a synthetic anomaly
        covers a few percent of an image, so this is most of the synthesis' speed on a CPU. Textures are kept
        with their shorter side at most :data:`TEXTURE_OVERSAMPLE` times the image side, so a crop is never
        shrunk by more than that factor (no aliasing) and large texture sets fit on a GPU.
        """
        batch, out_h, out_w = where.shape
        device = where.device
        short_side = math.ceil(TEXTURE_OVERSAMPLE * max(out_h, out_w))
        index = draws.index.numpy()
        order = np.argsort(index, kind="stable")  # samples grouped by texture
        # Per sample: texture pixel coordinate = a * (pixel + 0.5) + b along each axis, in the [-1,1] coordinates
        # of the texture region its group turns to float (grid_sample, align_corners=False).
        coef = np.zeros((batch, 4))  # ax, bx, ay, by
        groups = []
        for t in np.unique(index):
            rows = np.flatnonzero(index == t)
            texture = self.tensor(self._names[int(t)], short_side, device)
            tex_h, tex_w = texture.shape[1:]
            scale = 0.3 + 0.7 * draws.scale.numpy()[rows]
            crop_h = scale * min(tex_h, tex_w * out_h / out_w)
            crop_w = crop_h * out_w / out_h
            top = draws.top.numpy()[rows] * (tex_h - crop_h)
            left = draws.left.numpy()[rows] * (tex_w - crop_w)
            # Only the rows and columns the group's crops cover are turned to float.
            # (bilinear reads reach half a texel beyond the crop: one more row and column on each side)
            y0, y1 = max(0, int(np.floor(top.min() - 0.5))), min(tex_h, int(np.ceil((top + crop_h).max())) + 1)
            x0, x1 = max(0, int(np.floor(left.min() - 0.5))), min(tex_w, int(np.ceil((left + crop_w).max())) + 1)
            coef[rows, 0] = 2.0 * crop_w / (out_w * (x1 - x0))
            coef[rows, 1] = 2.0 * (left - x0) / (x1 - x0) - 1.0
            coef[rows, 2] = 2.0 * crop_h / (out_h * (y1 - y0))
            coef[rows, 3] = 2.0 * (top - y0) / (y1 - y0) - 1.0
            groups.append((len(rows), texture[:, y0:y1, x0:x1]))
        order_t = torch.from_numpy(order).to(device)
        grouped = where[order_t]  # (B,H,W), samples in texture order
        counts = grouped.flatten(1).sum(dim=1).tolist()  # points per sample
        k, iy, ix = grouped.nonzero(as_tuple=True)  # P points, grouped by texture
        k = order_t[k]  # back to the batch's own order
        c = torch.from_numpy(coef).float().to(device)[k]  # (P,4)
        grid = torch.stack((c[:, 0] * (ix + 0.5) + c[:, 1], c[:, 2] * (iy + 0.5) + c[:, 3]), dim=-1)  # (P,2)
        values = torch.empty(len(k), 3, device=device)
        start = sample = 0
        for n_rows, region in groups:
            end = start + sum(counts[sample:sample + n_rows])
            sample += n_rows
            if end > start:
                values[start:end] = F.grid_sample(
                    region[None].float().div_(255.0), grid[None, None, start:end], mode="bilinear",
                    padding_mode="border", align_corners=False,
                )[0, :, 0].T  # (points, 3)
            start = end
        return torch.stack((k, iy, ix), dim=1), values.clamp_(0.0, 1.0)

    def crops(self, draws: TextureDraws, size: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
        """The whole texture crop of each sample (what :meth:`values_at` reads from): (B,3,H,W) float in [0,1]."""
        where = torch.ones(len(draws.index), *size, dtype=torch.bool, device=device)
        points, values = self.values_at(draws, where)
        out = torch.empty(len(draws.index), *size, 3, device=device)
        out[points[:, 0], points[:, 1], points[:, 2]] = values
        return out.permute(0, 3, 1, 2).contiguous()


# --- blending ----------------------------------------------------------------------------------------------------
def is_grayscale(images: Tensor, tolerance: float = GRAYSCALE_TOLERANCE) -> Tensor:
    """(B,) bool: True where the three channels of an image of (B,3,H,W) are equal."""
    return (images.amax(dim=1) - images.amin(dim=1)).flatten(1).amax(dim=1) <= tolerance


def blend(images: Tensor, textures: Tensor, masks: Tensor, beta: Tensor) -> Tensor:
    """I_aug = I*(1-M) + (1-beta)*T*M + beta*I*M for whole images: images and textures (B,3,H,W), masks (B,1,H,W),
    beta (B,). The formula as the papers write it; :func:`synthesize_anomalies` computes the same values only
    where M = 1. [DeSTSeg]"""
    beta = beta.to(images.device, images.dtype)[:, None, None, None]
    return images * (1.0 - masks) + (1.0 - beta) * textures * masks + beta * images * masks


# --- sources that resemble real defects [ours] -----------------------------------------------------------------
SOURCES: tuple[str, ...] = ("texture", "patch", "stroke", "brightness")
"""The kinds of synthetic anomaly (:class:`SourceMix`), in the order their shares are drawn from."""
PATCH_SCALE: tuple[float, float] = (0.5, 2.0)
"""Rescaling of a pasted patch of a normal image (log-uniform)."""
PATCH_GAIN: tuple[float, float] = (0.6, 1.4)
"""Brightness gain of a pasted patch; an offset U(-PATCH_OFFSET, PATCH_OFFSET) is added."""
PATCH_OFFSET: float = 0.15
STROKE_WIDTHS: tuple[int, ...] = (1, 3, 5)
"""Stroke widths in pixels at 256 x 256; scaled with the image side and rounded to an odd number (at least 1)."""
STROKE_CONTRAST: tuple[float, float] = (0.2, 0.6)
"""How much a stroke darkens or brightens the pixels it covers."""
BLOB_RADIUS: tuple[float, float] = (0.15, 0.45)
"""Radii of a brightness change along each axis, as shares of the image side."""
BLOB_AMPLITUDE: tuple[float, float] = (0.1, 0.35)
"""Peak brightness change (added or taken away)."""
BLOB_MASK_LEVEL: float = 0.25
"""A brightness change is labelled anomalous where it reaches this share of its peak."""


@dataclass(frozen=True)
class SourceMix:
    """Shares of the synthetic anomaly sources (normalised by their sum), one source per sample: [ours]

    - ``texture``: a texture pasted inside a Perlin mask (the paper's recipe);
    - ``patch``: inside a Perlin mask, a patch of another normal image of the batch, shifted, rescaled and with
      its brightness changed (:func:`patch_images`): a defect made of the product's own material;
    - ``stroke``: a thin dark or bright curve (:func:`stroke_masks`): scratches and cracks;
    - ``brightness``: a smooth low-frequency brightness change (:func:`brightness_fields`): uneven or dark areas.
    """

    texture: float = 1.0
    patch: float = 0.0
    stroke: float = 0.0
    brightness: float = 0.0

    def __post_init__(self) -> None:
        values = self.values()
        if min(values) < 0 or sum(values) <= 0:
            raise ValueError(f"synthesis shares must be >= 0 with a positive sum, got {dict(zip(SOURCES, values))}")

    def values(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, name)) for name in SOURCES)

    @property
    def texture_only(self) -> bool:
        """True for the paper's recipe: no other source is drawn (and no extra random number)."""
        return not any(self.values()[1:])


@dataclass
class SourceDraws:
    """The random part of the extra sources of a batch, drawn after :class:`SynthesisDraws`; (B,...) CPU tensors."""

    kind: Tensor
    """(B,) int index into :data:`SOURCES`."""
    patch_scale: Tensor
    patch_shift: Tensor
    """(B,2) in [-0.5, 0.5): shift of the patch (rows, columns) as shares of the side."""
    patch_gain: Tensor
    patch_offset: Tensor
    stroke_points: Tensor
    """(B,3,2) in [0,1): start, control and end point (row, column) of a quadratic Bezier curve."""
    stroke_width: Tensor
    """(B,) int, pixels at 256 x 256."""
    stroke_change: Tensor
    """(B,) signed: the brightness change inside the stroke (dark when negative)."""
    blob_centre: Tensor
    """(B,2) in [0.15, 0.85): centre (row, column) as shares of the side."""
    blob_radius: Tensor
    """(B,2): radii (rows, columns) as shares of the side."""
    blob_amplitude: Tensor
    """(B,) signed peak change."""

    @classmethod
    def draw(cls, n: int, mix: SourceMix, generator: torch.Generator) -> SourceDraws:
        shares = torch.tensor(mix.values(), dtype=torch.float64)
        sign = torch.randint(2, (2, n), generator=generator) * 2 - 1
        log_low, log_high = math.log(PATCH_SCALE[0]), math.log(PATCH_SCALE[1])
        return cls(
            kind=torch.multinomial(shares, n, replacement=True, generator=generator),
            patch_scale=_uniform(n, log_low, log_high, generator).exp(),
            patch_shift=_uniform((n, 2), -0.5, 0.5, generator),
            patch_gain=_uniform(n, *PATCH_GAIN, generator),
            patch_offset=_uniform(n, -PATCH_OFFSET, PATCH_OFFSET, generator),
            stroke_points=torch.rand(n, 3, 2, generator=generator, dtype=torch.float64),
            stroke_width=torch.tensor(STROKE_WIDTHS)[torch.randint(len(STROKE_WIDTHS), (n,), generator=generator)],
            stroke_change=sign[0] * _uniform(n, *STROKE_CONTRAST, generator),
            blob_centre=_uniform((n, 2), 0.15, 0.85, generator),
            blob_radius=_uniform((n, 2), *BLOB_RADIUS, generator),
            blob_amplitude=sign[1] * _uniform(n, *BLOB_AMPLITUDE, generator),
        )


def patch_images(images: Tensor, draws: SourceDraws) -> Tensor:
    """For each sample, the next normal image of the batch (itself in a batch of one) rescaled about its centre by
    ``patch_scale``, shifted by ``patch_shift`` (mirrored at the border), times ``patch_gain`` plus
    ``patch_offset``, clipped to [0,1]: (B,3,H,W), what :func:`synthesize_anomalies` pastes inside the mask."""
    b, _, h, w = images.shape
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / draws.patch_scale
    theta[:, 0, 2], theta[:, 1, 2] = 2.0 * draws.patch_shift[:, 1], 2.0 * draws.patch_shift[:, 0]
    grid = affine_grid(theta, (h, w), images.device).to(images.dtype)
    moved = F.grid_sample(images.roll(1, dims=0), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    gain = draws.patch_gain.to(images.device, images.dtype)[:, None, None, None]
    offset = draws.patch_offset.to(images.device, images.dtype)[:, None, None, None]
    return (moved * gain + offset).clamp_(0.0, 1.0)


def stroke_masks(draws: SourceDraws, shape: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """(B,1,H,W) {0,1}: a quadratic Bezier curve through each sample's three points, sampled densely (two points
    per pixel of the longer side, times three), widened to ``stroke_width`` pixels (scaled from 256) by a max
    filter."""
    b = draws.kind.shape[0]
    h, w = shape
    t = torch.linspace(0.0, 1.0, 6 * max(h, w), dtype=torch.float64)[None, :, None]
    p0, p1, p2 = (draws.stroke_points[:, i, None, :] for i in range(3))
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (B,T,2) in [0,1)
    rows = (curve[..., 0] * h).long().clamp_(0, h - 1)
    cols = (curve[..., 1] * w).long().clamp_(0, w - 1)
    masks = torch.zeros(b, h * w)
    masks.scatter_(1, rows * w + cols, 1.0)
    masks = masks.view(b, 1, h, w)
    widths = (draws.stroke_width.double() * max(h, w) / 256).round().clamp_(min=1).long()
    widths += 1 - widths % 2  # odd, so the max filter is centred on the curve
    for width in widths.unique().tolist():
        if width > 1:
            chosen = widths == width
            masks[chosen] = F.max_pool2d(masks[chosen], width, stride=1, padding=width // 2)
    return masks.to(device)


def brightness_fields(draws: SourceDraws, shape: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """(B,1,H,W): a smooth brightness change A * (1 - r^2)^2 inside the ellipse r < 1 (centre ``blob_centre``,
    radii ``blob_radius``), zero outside; A = ``blob_amplitude``."""
    h, w = shape
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    dy = (ys[None, :, None] - draws.blob_centre[:, 0, None, None]) / draws.blob_radius[:, 0, None, None]
    dx = (xs[None, None, :] - draws.blob_centre[:, 1, None, None]) / draws.blob_radius[:, 1, None, None]
    bump = (1.0 - (dy**2 + dx**2)).clamp(min=0.0) ** 2
    return (draws.blob_amplitude[:, None, None] * bump)[:, None].float().to(device)


def apply_sources(images: Tensor, augmented: Tensor, masks: Tensor, beta: Tensor,
                  draws: SourceDraws) -> tuple[Tensor, Tensor]:
    """Replace the texture anomaly of every sample whose ``kind`` is another source: a patch blended like a
    texture inside the same Perlin mask, a stroke (its own mask), or a brightness change (mask: where it reaches
    :data:`BLOB_MASK_LEVEL` of its peak). Returns (augmented, masks), new tensors."""
    augmented, masks = augmented.clone(), masks.clone()
    kind = draws.kind.to(images.device)
    shape = (images.shape[-2], images.shape[-1])
    if (kind == 1).any():
        chosen = kind == 1
        patched = blend(images, patch_images(images, draws), masks, beta)
        augmented[chosen] = patched[chosen]
    if (kind == 2).any():
        chosen = kind == 2
        stroke = stroke_masks(draws, shape, images.device)
        change = draws.stroke_change.to(images.device, images.dtype)[:, None, None, None]
        augmented[chosen] = (images + change * stroke).clamp(0.0, 1.0)[chosen]
        masks[chosen] = stroke[chosen]
    if (kind == 3).any():
        chosen = kind == 3
        field = brightness_fields(draws, shape, images.device)
        augmented[chosen] = (images + field).clamp(0.0, 1.0)[chosen]
        peak = draws.blob_amplitude.abs().to(images.device, images.dtype)[:, None, None, None]
        masks[chosen] = (field.abs() >= BLOB_MASK_LEVEL * peak).float()[chosen]
    return augmented, masks


def synthesize_anomalies(
    images: Tensor,
    textures: TextureSource,
    generator: torch.Generator,
    *,
    rotation: Policy = "none",
    beta_max: float = 0.8,
    max_scale_exp: int = 5,
    threshold: float = 0.5,
    match_grayscale: bool = True,
    mix: SourceMix | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Paste a texture into each normal image of a batch inside a Perlin mask. [DeSTSeg recipe; batched: ours]

    images (B,3,H,W) float in [0,1], on any device -> (I_orig, I_aug, M) on that device: I_orig (B,3,H,W) the
    normal images after the rotation policy ``rotation`` (the category's), I_aug (B,3,H,W) with
    I_aug = I_orig*(1-M) + (1-beta)*T*M + beta*I_orig*M and beta ~ U(0, beta_max), M (B,1,H,W) in {0,1}.
    Applied to every sample; a mask may be empty. All draws come from ``generator`` (:class:`SynthesisDraws`).
    M is binary, so I_aug equals I_orig outside M and (1-beta)*T + beta*I_orig inside; only the inside is
    computed.

    ``match_grayscale``: textures pasted into a grayscale image are turned to grayscale too, so that colour alone
    never gives a synthetic anomaly away; real defects on a grayscale product are grayscale.
    [ours; DeSTSeg pastes colour textures everywhere]

    ``mix`` (:class:`SourceMix`): the share of each anomaly source; None or texture only is the paper's recipe
    above, with no further draw. Otherwise each sample's source is drawn after everything else
    (:class:`SourceDraws`) and :func:`apply_sources` replaces the texture anomaly of the samples given another
    source. [ours]
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"synthesize_anomalies expects (B,3,H,W) images, got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    draws = SynthesisDraws.draw(b, len(textures), generator, beta_max=beta_max, max_scale_exp=max_scale_exp)
    images = rotate_by_policy(images, rotation, draws)
    masks = perlin_masks(draws.mask, (h, w), threshold, images.device)
    points, texture = textures.values_at(draws.texture, masks[:, 0] > 0)  # (P,3) each
    k, iy, ix = points.unbind(dim=1)
    normal = images[k, :, iy, ix]  # (P,3)
    if match_grayscale:
        gray = is_grayscale(images)[k, None]
        texture = torch.where(gray, texture.mean(dim=1, keepdim=True).expand_as(texture), texture)
    beta = draws.beta.to(images.device, images.dtype)[k, None]
    augmented = images.clone()
    augmented[k, :, iy, ix] = (1.0 - beta) * texture + beta * normal
    if mix is not None and not mix.texture_only:
        augmented, masks = apply_sources(images, augmented, masks, draws.beta, SourceDraws.draw(b, mix, generator))
    return images, augmented, masks
