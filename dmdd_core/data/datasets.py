"""The three datasets of a run: synthetic training pairs, the validation split, the labelled test split.

- **train**: the category's normal training images minus the validation share, each turned into a pair
  (I_orig, I_aug, M) with a synthetic anomaly. [paper: normal-anomaly pairs; construction: DeSTSeg]
- **val**: a fixed, seeded share of the normal training images (``val_fraction``, 10 % by default), never trained
  on. Each held-out image appears twice: as it is (label 0) and with a synthetic anomaly whose mask is not empty
  (label 1). Anything tuned (thresholds, checks during training) uses this split, never the test set. [ours]
  Its anomalies come from the training recipe, so it measures how well the model finds *that* kind of anomaly:
  a check and a source of thresholds, not an estimate of test performance.
- **test**: the dataset's own labelled test images, used only to report.

Images are decoded, checked and resized once (:mod:`dmdd_core.data.loading`) and served from memory.
Images come out as (3,S,S) float tensors in [0,1]; the model normalises them with its teacher's mean/std.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dmdd_core.catalog import Policy
from dmdd_core.data.loading import InputReport, load_images, load_test_items
from dmdd_core.data.sources import GOOD, DataSource, as_source
from dmdd_core.synthesis import (
    TRAIN_STREAM,
    VALIDATION_STREAM,
    SourceMix,
    TextureSource,
    step_generator,
    synthesize_anomalies,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from dmdd_core.config import DMDDConfig

SYNTHETIC = "synthetic"
"""Defect type of the validation split's synthetic anomalies."""


class TrainPair(NamedTuple):
    """A batch of training triples (I_orig, I_aug, M). [paper]"""

    original: Tensor
    """(B,3,S,S) float [0,1], the normal images (after the category's rotation)."""
    augmented: Tensor
    """(B,3,S,S) float [0,1], the same images with a synthetic anomaly."""
    mask: Tensor
    """(B,1,S,S) float {0,1}, where the anomaly was pasted (may be empty)."""


class Sample(NamedTuple):
    """One labelled image of any dataset and split: the one sample type of evaluation."""

    image: Tensor
    """(3,S,S) float [0,1]."""
    mask: Tensor
    """(1,S,S) float {0,1}; all zeros for good images."""
    label: int
    """0 good, 1 defective."""
    defect_type: str
    path: str
    category: str




def _to_chw(image: np.ndarray) -> Tensor:
    """(H,W,C) float32 or uint8 numpy -> (C,H,W) float32 tensor in [0,1]."""
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


def images_to_tensor(images: np.ndarray) -> Tensor:
    """(N,S,S,3) uint8 images -> one (N,3,S,S) float tensor in [0,1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)


# --- the validation split ----------------------------------------------------------------------------------------
def split_train_val(paths: Sequence[Path], val_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Split sorted training paths into (train, val): round(val_fraction * N) images, at least one when
    ``val_fraction > 0``, chosen by a permutation seeded with ``seed`` alone. Both lists stay sorted. [ours]

    The split depends only on the file list, the fraction and the seed, so it is the same for every run,
    training seed and ``skip_bad`` setting. A category with fewer than two images has no validation split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    paths = sorted(paths)
    n = len(paths)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(val_fraction * n)))
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return [p for i, p in enumerate(paths) if i not in chosen], [p for i, p in enumerate(paths) if i in chosen]


@dataclass
class CategoryData:
    """A category's normal images, decoded once: the training share and the validation share."""

    source: DataSource
    category: str
    image_size: int
    train_paths: list[Path]
    train_images: np.ndarray
    """(N,S,S,3) uint8."""
    val_paths: list[Path]
    val_images: np.ndarray
    """(V,S,S,3) uint8."""
    report: InputReport = field(default_factory=InputReport)

    @classmethod
    def load(
        cls,
        data: str | Path | DataSource,
        category: str,
        image_size: int,
        *,
        val_fraction: float = 0.1,
        val_seed: int = 0,
        skip_bad: bool = False,
        progress: bool | None = None,
    ) -> CategoryData:
        """List, split and decode a category's normal images; bad files raise, or are skipped and counted."""
        source = as_source(data)
        train_listed, val_listed = split_train_val(source.train_images(category), val_fraction, val_seed)
        report = InputReport()
        train_images, train_paths = load_images(
            train_listed, image_size, skip_bad=skip_bad, report=report, progress=progress, desc=f"decode {category}"
        )
        if not train_paths:
            raise FileNotFoundError(f"no usable training images of {category!r} in {source.root}: all were skipped")
        val_images, val_paths = load_images(
            val_listed, image_size, skip_bad=skip_bad, report=report, progress=progress, desc=f"decode {category} val"
        )
        return cls(source, category, image_size, train_paths, train_images, val_paths, val_images, report)

    @classmethod
    def from_config(
        cls, data: str | Path | DataSource, category: str, cfg: DMDDConfig, *, skip_bad: bool = False,
        progress: bool | None = None,
    ) -> CategoryData:
        return cls.load(
            data, category, cfg.image_size, val_fraction=cfg.val_fraction, val_seed=cfg.val_seed,
            skip_bad=skip_bad, progress=progress,
        )


def default_textures(category: str, cfg: DMDDConfig) -> TextureSource:
    """``cfg.texture_dir`` if set, else the built-in textures without the category's own material (a built-in
    category would otherwise paste itself). [ours] The same source is returned again for the same arguments
    within a process, so its decoded textures serve every run (the benchmark's tasks, a notebook's models)."""
    return _textures(cfg.texture_dir, category)


@functools.lru_cache(maxsize=2)
def _textures(texture_dir: str | None, category: str) -> TextureSource:
    if texture_dir:
        return TextureSource.from_folder(texture_dir)
    return TextureSource.builtin(exclude=(category,))


# --- training pairs ----------------------------------------------------------------------------------------------
class SyntheticPairs:
    """The training batches of a run: batch s is a pure function of (seed, s). [DeSTSeg recipe; batching ours]

    ``batch(s)`` draws everything from :func:`~dmdd_core.synthesis.step_generator` ``(TRAIN_STREAM, seed, s)``: which training
    images (uniformly, with replacement), their rotation (``rotation``, the category's policy in its data source), the masks, the textures and beta, then
    runs :func:`~dmdd_core.synthesis.synthesize_anomalies` on ``device``. Resuming at step s therefore gives
    the batches an uninterrupted run would have seen. The training images are held on ``device`` as one
    (N,3,S,S) uint8 tensor, the textures as uint8 tensors decoded once.
    """

    def __init__(
        self,
        images: np.ndarray,
        textures: TextureSource,
        *,
        batch_size: int,
        seed: int = 0,
        rotation: Policy = "none",
        beta_max: float = 0.8,
        max_scale_exp: int = 5,
        threshold: float = 0.5,
        match_grayscale: bool = True,
        mix: SourceMix | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or len(images) == 0:
            raise ValueError(f"images must be a non-empty (N,S,S,3) uint8 array, got {images.dtype} {images.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
        self.device = self.images.device
        self.image_size = int(images.shape[1])
        self.textures = textures
        self.batch_size = batch_size
        self.seed = seed
        self.rotation: Policy = rotation
        self.beta_max = beta_max
        self.max_scale_exp = max_scale_exp
        self.threshold = threshold
        self.match_grayscale = match_grayscale
        self.mix = mix

    @classmethod
    def from_config(
        cls,
        data: str | Path | DataSource | CategoryData,
        category: str,
        cfg: DMDDConfig,
        textures: TextureSource | None = None,
        device: torch.device | str = "cpu",
    ) -> SyntheticPairs:
        """The training share of ``data`` (a dataset root, a source, or already loaded), honouring ``cfg``."""
        if not isinstance(data, CategoryData):
            data = CategoryData.from_config(data, category, cfg)
        return cls(
            data.train_images,
            textures if textures is not None else default_textures(category, cfg),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            rotation=data.source.rotation_policy(category) if cfg.rotate else "none",
            beta_max=cfg.beta_max,
            max_scale_exp=cfg.perlin_max_scale_exp,
            threshold=cfg.perlin_threshold,
            match_grayscale=cfg.match_grayscale,
            mix=SourceMix(cfg.synth_texture, cfg.synth_patch, cfg.synth_stroke, cfg.synth_brightness),
            device=device,
        )

    def __len__(self) -> int:
        """The number of training images."""
        return len(self.images)

    def load_textures(self, progress: bool | None = None) -> SyntheticPairs:
        """Decode every texture onto the device now, in a thread pool, rather than in the first training steps;
        returns self."""
        self.textures.load_all(self.image_size, self.device, progress)
        return self

    def batch(self, step: int) -> TrainPair:
        """The batch of training step ``step`` (0-based): (B,3,S,S), (B,3,S,S), (B,1,S,S) on the device."""
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}")
        generator = step_generator(TRAIN_STREAM, self.seed, step)
        picks = torch.randint(len(self.images), (self.batch_size,), generator=generator)
        normal = self.images[picks.to(self.device)].float().div_(255.0)
        original, augmented, mask = synthesize_anomalies(
            normal,
            self.textures,
            generator,
            rotation=self.rotation,
            beta_max=self.beta_max,
            max_scale_exp=self.max_scale_exp,
            threshold=self.threshold,
            match_grayscale=self.match_grayscale,
            mix=self.mix,
        )
        return TrainPair(original, augmented, mask)

    def batches(self, start_step: int, stop_step: int) -> Iterator[TrainPair]:
        """The batches of steps ``start_step .. stop_step - 1``."""
        for step in range(start_step, stop_step):
            yield self.batch(step)


# --- evaluation splits -------------------------------------------------------------------------------------------
class LabelledDataset(Dataset[Sample]):
    """Samples held in memory: (N,S,S,3) uint8 images and (N,S,S) uint8 masks."""

    split = ""

    def __init__(self, images: np.ndarray, masks: np.ndarray, labels: list[int], types: list[str], paths: list[str],
                 category: str) -> None:
        self.images, self.masks = images, masks
        self.labels, self.defect_types, self.paths = labels, types, paths
        self.category = category
        self.image_size = int(images.shape[1]) if len(images) else 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return Sample(
            _to_chw(self.images[index]),
            torch.from_numpy(self.masks[index][None].astype(np.float32)),
            self.labels[index],
            self.defect_types[index],
            self.paths[index],
            self.category,
        )

    def image_tensor(self) -> Tensor:
        """Every image as one (N,3,S,S) float tensor in [0,1]."""
        return images_to_tensor(self.images)


class TestDataset(LabelledDataset):
    """Every test image of a category with its mask (zeros for good images), resized to ``image_size`` and held
    in memory. Bad files raise :class:`~dmdd_core.data.loading.BadInputError`, or with ``skip_bad`` are left out
    and counted in ``self.report``."""

    __test__ = False
    split = "test"

    def __init__(
        self,
        data: str | Path | DataSource,
        category: str,
        image_size: int,
        *,
        skip_bad: bool = False,
        report: InputReport | None = None,
        progress: bool | None = None,
    ) -> None:
        self.source = as_source(data)
        self.root = self.source.root
        self.report = report if report is not None else InputReport()
        items = self.source.test_items(category)
        images, masks, kept = load_test_items(items, image_size, skip_bad=skip_bad, report=self.report,
                                              progress=progress)
        if not kept:
            raise FileNotFoundError(f"no usable test images of {category!r} in {self.root}: all were skipped")
        self.items = kept
        super().__init__(images, masks, [it.label for it in kept], [it.defect_type for it in kept],
                         [str(it.image) for it in kept], category)


class ValidationDataset(LabelledDataset):
    """The validation split: each held-out normal image as it is (label 0), then each with a synthetic anomaly
    (label 1, defect type "synthetic", a mask that is never empty). Generated once, from ``seed`` only. [ours]"""

    split = "val"

    def __init__(
        self,
        images: np.ndarray,
        paths: Sequence[Path],
        category: str,
        textures: TextureSource,
        *,
        seed: int = 0,
        beta_max: float = 0.8,
        max_scale_exp: int = 5,
        threshold: float = 0.5,
        match_grayscale: bool = True,
    ) -> None:
        if len(images) == 0:
            raise ValueError(f"the validation split of {category!r} is empty (val_fraction = 0, or too few images)")
        normal = images_to_tensor(images)
        anomalous = torch.empty_like(normal)
        masks = torch.zeros(len(images), 1, *normal.shape[-2:])
        for i in range(len(images)):  # image i's anomaly depends on (seed, i) alone
            for attempt in range(100):  # redrawn while its mask covers under 0.5 % of the image
                _, augmented, mask = synthesize_anomalies(
                    normal[i : i + 1], textures, step_generator(VALIDATION_STREAM, seed, i, attempt),
                    beta_max=beta_max, max_scale_exp=max_scale_exp, threshold=threshold,
                    match_grayscale=match_grayscale,
                )
                if mask.mean() >= 0.005:
                    break
            anomalous[i], masks[i] = augmented[0], mask[0]
        anomalous_u8 = anomalous.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        size = images.shape[1]
        n = len(images)
        super().__init__(
            np.concatenate([images, anomalous_u8]),
            np.concatenate([np.zeros((n, size, size), np.uint8), masks[:, 0].numpy().astype(np.uint8)]),
            [0] * n + [1] * n,
            [GOOD] * n + [SYNTHETIC] * n,
            [str(p) for p in paths] + [f"{p}#synthetic" for p in paths],
            category,
        )

    @classmethod
    def from_config(
        cls, data: CategoryData, cfg: DMDDConfig, textures: TextureSource | None = None
    ) -> ValidationDataset:
        return cls(
            data.val_images,
            data.val_paths,
            data.category,
            textures if textures is not None else default_textures(data.category, cfg),
            seed=cfg.val_seed,
            beta_max=cfg.beta_max,
            max_scale_exp=cfg.perlin_max_scale_exp,
            threshold=cfg.perlin_threshold,
            match_grayscale=cfg.match_grayscale,
        )
