"""Datasets in MVTec AD layout: training pairs with synthetic anomalies, and the labelled test set.

Layout (MVTec AD, MPDD, the built-in dataset)::

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/<defect_type>/*.png          (defect_type "good" for normal test images)
    ROOT/<category>/ground_truth/<defect_type>/<stem>_mask.png

Images come out as (3,S,S) float tensors in [0,1]; the model normalises them with its teacher's mean/std.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from dmdd_core.imageio import is_image_file, read_binary_mask, read_rgb
from dmdd_core.synthesis import TextureSource, rotate_for_category, synthesize_anomaly

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dmdd_core.config import DMDDConfig

GOOD = "good"


class TrainPair(NamedTuple):
    """One training triple (I_orig, I_aug, M); batches through ``default_collate`` field by field. [paper]"""

    original: Tensor
    """(3,S,S) float [0,1], the normal image (after the category's rotation)."""
    augmented: Tensor
    """(3,S,S) float [0,1], the same image with a synthetic anomaly."""
    mask: Tensor
    """(1,S,S) float {0,1}, where the anomaly was pasted (may be empty)."""


class TestSample(NamedTuple):
    """One labelled test image."""

    image: Tensor
    """(3,S,S) float [0,1]."""
    mask: Tensor
    """(1,S,S) float {0,1}; all zeros for good images."""
    label: int
    """0 good, 1 defective."""
    defect_type: str
    path: str
    category: str


TestSample.__test__ = False  # type: ignore[attr-defined]  # not a pytest test class despite its name


# --- listing -----------------------------------------------------------------------------------------------------
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the folders of ``root`` that have ``train/good``."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"dataset root not found: {base}")
    return sorted(p.name for p in base.iterdir() if (p / "train" / GOOD).is_dir())


def _category_dir(root: str | Path, category: str) -> Path:
    folder = Path(root).expanduser() / category
    if not (folder / "train" / GOOD).is_dir():
        found = list_categories(root)
        raise FileNotFoundError(
            f"category {category!r} not found in {Path(root).expanduser()} (no {folder / 'train' / GOOD}); "
            f"categories found: {found or 'none'}"
        )
    return folder


def list_train_images(root: str | Path, category: str) -> list[Path]:
    """Sorted image files of ``root/category/train/good``; error if there are none."""
    folder = _category_dir(root, category) / "train" / GOOD
    files = _image_files(folder)
    if not files:
        raise FileNotFoundError(f"no training images in {folder}")
    return files


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (gt_dir / name).is_file():
            return gt_dir / name
    candidates = sorted(gt_dir.glob(f"{stem}_mask.*")) if gt_dir.is_dir() else []
    return candidates[0] if candidates else None


def list_test_images(root: str | Path, category: str) -> list[tuple[Path, Path | None, str]]:
    """(image, mask or None for good, defect_type) for every test image, sorted by defect type then name.

    A defective image without ``ground_truth/<type>/<stem>_mask.png`` is an error (its pixel labels are unknown).
    """
    folder = _category_dir(root, category)
    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"no test folder {test_dir}")
    items: list[tuple[Path, Path | None, str]] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect_type = type_dir.name
        for image_path in _image_files(type_dir):
            if defect_type == GOOD:
                items.append((image_path, None, GOOD))
                continue
            mask_path = _find_mask(folder / "ground_truth" / defect_type, image_path.stem)
            if mask_path is None:
                expected = folder / "ground_truth" / defect_type / f"{image_path.stem}_mask.png"
                raise FileNotFoundError(f"no mask for defective test image {image_path}: expected {expected}")
            items.append((image_path, mask_path, defect_type))
    if not items:
        raise FileNotFoundError(f"no test images under {test_dir}")
    return items


# --- loading -----------------------------------------------------------------------------------------------------
def load_image(path: str | Path, size: int) -> Tensor:
    """Image file in any mode -> (3,size,size) float32 in [0,1], antialiased bicubic resize. No mean/std."""
    return torch.from_numpy(read_rgb(path, (size, size)).transpose(2, 0, 1).copy())


def load_mask(path: str | Path, size: int) -> Tensor:
    """Mask file -> (1,size,size) float32 in {0,1}: nearest resize, non-zero is anomalous."""
    return torch.from_numpy(read_binary_mask(path, (size, size))[None].copy())


def _to_chw(image: np.ndarray) -> Tensor:
    """(H,W,C) float32 numpy -> (C,H,W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


# --- datasets ----------------------------------------------------------------------------------------------------
class SyntheticPairDataset(Dataset[TrainPair]):
    """Training pairs, indexed by a stream index k >= 0 rather than by image. [DeSTSeg recipe; indexing ours]

    ``self[k]`` draws everything from ``np.random.default_rng([seed, k])``: which training image, its rotation
    (if ``rotate``), the mask, the texture and beta. The batch of training step s (indices
    :func:`stream_indices`) is therefore a pure function of (seed, s), which makes resuming exact.
    ``len()`` is the number of training images. Decoded, resized images are cached in memory as uint8.
    """

    def __init__(
        self,
        root: str | Path,
        category: str,
        image_size: int,
        textures: TextureSource,
        seed: int = 0,
        rotate: bool = True,
        beta_max: float = 0.8,
        max_scale_exp: int = 5,
        threshold: float = 0.5,
        match_grayscale: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        self.category = category
        self.image_size = image_size
        self.textures = textures
        self.seed = seed
        self.rotate = rotate
        self.beta_max = beta_max
        self.max_scale_exp = max_scale_exp
        self.threshold = threshold
        self.match_grayscale = match_grayscale
        self.paths = list_train_images(self.root, category)
        self._cache: dict[int, np.ndarray] = {}

    @classmethod
    def from_config(
        cls, root: str | Path, category: str, cfg: DMDDConfig, textures: TextureSource | None = None
    ) -> SyntheticPairDataset:
        """Dataset honouring ``cfg``. Textures: ``cfg.texture_dir`` if set, else the built-in ones without the
        category's own material (a built-in category would otherwise paste itself). [ours]"""
        if textures is None:
            textures = (
                TextureSource.from_folder(cfg.texture_dir)
                if cfg.texture_dir
                else TextureSource.builtin(exclude=(category,))
            )
        return cls(
            root,
            category,
            cfg.image_size,
            textures,
            seed=cfg.seed,
            rotate=cfg.rotate,
            beta_max=cfg.beta_max,
            max_scale_exp=cfg.perlin_max_scale_exp,
            threshold=cfg.perlin_threshold,
            match_grayscale=cfg.match_grayscale,
        )

    def __len__(self) -> int:
        return len(self.paths)

    def normal_image(self, index: int) -> np.ndarray:
        """Training image ``index`` as (S,S,3) float32 [0,1], decoded once and cached."""
        cached = self._cache.get(index)
        if cached is None:
            image = read_rgb(self.paths[index], (self.image_size, self.image_size))
            cached = np.round(image * 255.0).astype(np.uint8)
            self._cache[index] = cached
        return cached.astype(np.float32) / 255.0

    def __getitem__(self, k: int) -> TrainPair:
        k = int(k)
        if k < 0:
            raise IndexError(f"stream index must be >= 0, got {k}")
        rng = np.random.default_rng([self.seed, k])
        image = self.normal_image(int(rng.integers(len(self.paths))))
        if self.rotate:
            image = rotate_for_category(image, self.category, rng)
        augmented, mask = synthesize_anomaly(
            image,
            self.textures,
            rng,
            beta_max=self.beta_max,
            max_scale_exp=self.max_scale_exp,
            threshold=self.threshold,
            match_grayscale=self.match_grayscale,
        )
        return TrainPair(_to_chw(image), _to_chw(augmented), torch.from_numpy(mask[None].copy()))


def stream_indices(step: int, batch_size: int) -> list[int]:
    """Stream indices of training step ``step`` (0-based): step*B .. step*B + B - 1. [ours]"""
    return list(range(step * batch_size, (step + 1) * batch_size))


class StreamBatchSampler(Sampler[list[int]]):
    """Batch sampler over steps ``start_step .. start_step + num_steps - 1`` of a :class:`SyntheticPairDataset`
    stream: ``DataLoader(ds, batch_sampler=StreamBatchSampler(...))``; resuming at step s gives the same batches."""

    def __init__(self, batch_size: int, num_steps: int, start_step: int = 0) -> None:
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.start_step = start_step

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.start_step + self.num_steps):
            yield stream_indices(step, self.batch_size)


class TestDataset(Dataset[TestSample]):
    """Every test image of a category with its mask (zeros for good images), resized to image_size."""

    __test__ = False

    def __init__(self, root: str | Path, category: str, image_size: int) -> None:
        self.root = Path(root).expanduser()
        self.category = category
        self.image_size = image_size
        self.items = list_test_images(self.root, category)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TestSample:
        image_path, mask_path, defect_type = self.items[index]
        image = load_image(image_path, self.image_size)
        if mask_path is None:
            mask = torch.zeros(1, self.image_size, self.image_size)
        else:
            mask = load_mask(mask_path, self.image_size)
        label = 0 if defect_type == GOOD else 1
        return TestSample(image, mask, label, defect_type, str(image_path), self.category)
