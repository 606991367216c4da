"""Loading MVTec AD-layout datasets, the synthetic training stream and the built-in dataset."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from conftest import make_mvtec_tree
from dmdd_core.config import DMDDConfig
from dmdd_core.data import (
    BUILTIN_CATEGORIES,
    DEFECT_TYPES,
    CategoryData,
    Sample,
    SyntheticPairs,
    TestDataset,
    TrainPair,
    default_data_root,
    ensure_builtin_dataset,
    list_categories,
    list_test_images,
    list_train_images,
    load_image,
    load_mask,
)
from dmdd_core.data import builtin as builtin_module
from dmdd_core.synthesis import TextureSource


@pytest.fixture(scope="module")
def textures() -> TextureSource:
    return TextureSource.builtin()


# --- loading single files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "I;16"])
def test_load_image_any_mode_non_square(tmp_path: Path, mode: str) -> None:
    folder = make_mvtec_tree(tmp_path, "thing", n_train=1, defects={}, size=(50, 30), mode=mode)
    path = folder / "train" / "good" / "000.png"
    image = load_image(path, 32)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert 0.2 < image.mean() < 0.7
    if mode in ("L", "LA", "I;16"):
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_load_image_16_bit_scale(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    with Image.open(path) as written:
        assert written.mode.startswith("I")
    np.testing.assert_allclose(load_image(path, 8).numpy(), 32768 / 65535, atol=1e-3)


def test_load_image_error_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(broken, 16)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        load_image(tmp_path / "absent.png", 16)


def test_load_mask_nearest_and_binarised(tmp_path: Path) -> None:
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2, :2] = 1
    path = tmp_path / "m_mask.png"
    Image.fromarray(mask).save(path)
    loaded = load_mask(path, 8)
    assert loaded.shape == (1, 8, 8) and loaded.dtype == torch.float32
    assert set(loaded.unique().tolist()) == {0.0, 1.0}
    assert loaded[0, :4, :4].all() and loaded.sum() == 16


# --- listing -----------------------------------------------------------------------------------------------------
def test_listing_and_errors(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path, "alpha", n_train=3, defects={"good": 2, "crack": 2})
    make_mvtec_tree(tmp_path, "beta", n_train=2, defects={"good": 1})
    (tmp_path / "not_a_category").mkdir()
    assert list_categories(tmp_path) == ["alpha", "beta"]
    assert [p.name for p in list_train_images(tmp_path, "alpha")] == ["000.png", "001.png", "002.png"]
    items = list_test_images(tmp_path, "alpha")
    assert [(i.name, m.name if m else None, t) for i, m, t in items] == [
        ("000.png", "000_mask.png", "crack"),
        ("001.png", "001_mask.png", "crack"),
        ("000.png", None, "good"),
        ("001.png", None, "good"),
    ]
    with pytest.raises(FileNotFoundError, match=r"gamma.*alpha.*beta"):
        list_train_images(tmp_path, "gamma")
    make_mvtec_tree(tmp_path, "hollow", n_train=0, defects={})
    with pytest.raises(FileNotFoundError, match="no training images.*empty"):
        CategoryData.load(tmp_path, "hollow", 32)


# --- datasets ----------------------------------------------------------------------------------------------------
def test_test_dataset_pairs_images_labels_and_masks(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path, "alpha", n_train=1, defects={"good": 2, "crack": 3, "hole": 1}, size=(64, 48))
    dataset = TestDataset(tmp_path, "alpha", 32)
    assert len(dataset) == 6
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s.label for s in samples] == [1, 1, 1, 0, 0, 1]
    assert [s.defect_type for s in samples] == ["crack", "crack", "crack", "good", "good", "hole"]
    for sample in samples:
        assert isinstance(sample, Sample) and sample.category == "alpha"
        assert sample.image.shape == (3, 32, 32) and sample.mask.shape == (1, 32, 32)
        if sample.label == 0:
            assert sample.mask.sum() == 0
        else:
            inside = sample.image[:, sample.mask[0] > 0].mean()
            outside = sample.image[:, sample.mask[0] == 0].mean()
            assert inside > 0.9 and outside < 0.7
    batch = next(iter(DataLoader(dataset, batch_size=6)))
    assert isinstance(batch, Sample)
    assert batch.image.shape == (6, 3, 32, 32) and torch.as_tensor(batch.label).tolist() == [1, 1, 1, 0, 0, 1]
    assert batch.defect_type[3] == "good" and batch.path[0].endswith("000.png")


def _pairs(root: Path, category: str, textures: TextureSource, seed: int, batch_size: int = 4) -> SyntheticPairs:
    """Training batches of every training image of ``root/category`` at 32x32 (no validation split)."""
    images = CategoryData.load(root, category, 32, val_fraction=0.0).train_images
    return SyntheticPairs(images, textures, batch_size=batch_size, seed=seed)


def test_synthetic_pairs_are_a_function_of_seed_and_step(tmp_path: Path, textures: TextureSource) -> None:
    make_mvtec_tree(tmp_path, "bottle", n_train=4, defects={})
    pairs = _pairs(tmp_path, "bottle", textures, seed=5)
    assert len(pairs) == 4
    batch = pairs.batch(3)
    assert isinstance(batch, TrainPair)
    assert batch.original.shape == (4, 3, 32, 32) and batch.augmented.shape == (4, 3, 32, 32)
    assert batch.mask.shape == (4, 1, 32, 32) and set(batch.mask.unique().tolist()) <= {0.0, 1.0}
    assert 0.0 <= batch.augmented.min() and batch.augmented.max() <= 1.0
    outside = batch.mask.expand(-1, 3, -1, -1) == 0
    assert torch.equal(batch.augmented[outside], batch.original[outside])

    again = _pairs(tmp_path, "bottle", textures, seed=5).batch(3)
    for a, b in zip(batch, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(pairs.batch(4).augmented, batch.augmented)
    assert not torch.equal(_pairs(tmp_path, "bottle", textures, seed=6).batch(3).augmented, batch.augmented)
    assert any(pairs.batch(k).mask.sum() > 0 for k in range(3))
    with pytest.raises(IndexError):
        pairs.batch(-1)


def test_batches_resume_at_any_step(tmp_path: Path, textures: TextureSource) -> None:
    make_mvtec_tree(tmp_path, "wood", n_train=3, defects={})
    pairs = _pairs(tmp_path, "wood", textures, seed=1)
    batches = list(pairs.batches(0, 3))
    assert len(batches) == 3
    resumed = next(pairs.batches(2, 3))
    for a, b in zip(batches[2], resumed, strict=True):
        assert torch.equal(a, b)
    # every training image is drawn, each from the category's own images (rotated by wood's small policy)
    originals = torch.cat([b.original for b in pairs.batches(0, 10)])
    assert originals.shape == (40, 3, 32, 32)


def test_synthetic_pairs_from_config(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path, "brick", n_train=2, defects={})
    cfg = DMDDConfig.preset("smoke", seed=3, rotate=False)
    pairs = SyntheticPairs.from_config(tmp_path, "brick", cfg)
    assert pairs.image_size == cfg.image_size and pairs.seed == 3 and pairs.rotation == "none"
    assert pairs.batch_size == cfg.batch_size
    assert "skimage:brick" not in pairs.textures.names
    batch = pairs.batch(0)
    assert batch.original.shape == (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    # without rotation the originals are training images exactly
    train = torch.from_numpy(CategoryData.from_config(tmp_path, "brick", cfg).train_images).permute(0, 3, 1, 2)
    for image in batch.original:
        assert any(torch.equal((image * 255).round().to(torch.uint8), t) for t in train)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        SyntheticPairs.from_config(tmp_path, "brick", cfg.replace(texture_dir=str(tmp_path / "no_such_dir")))
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticPairs(np.zeros((1, 8, 8, 3), np.uint8), pairs.textures, batch_size=0)


# --- the built-in dataset ----------------------------------------------------------------------------------------
def test_builtin_dataset_layout_and_counts(builtin_root: Path) -> None:
    assert builtin_root.name == f"builtin_v{builtin_module.BUILTIN_VERSION}"
    assert list_categories(builtin_root) == sorted(BUILTIN_CATEGORIES)
    for category in BUILTIN_CATEGORIES:
        assert len(list_train_images(builtin_root, category)) == builtin_module.N_TRAIN
        items = list_test_images(builtin_root, category)
        counts = {t: sum(1 for _, _, d in items if d == t) for t in ("good", *DEFECT_TYPES)}
        expected = {"good": builtin_module.N_TEST_GOOD, **dict.fromkeys(DEFECT_TYPES, builtin_module.N_PER_DEFECT)}
        assert counts == expected
        for image_path, mask_path, defect_type in items:
            if defect_type == "good":
                assert mask_path is None
                continue
            assert mask_path is not None and mask_path.name == f"{image_path.stem}_mask.png"
            assert mask_path.parent.name == defect_type == image_path.parent.name
            with Image.open(mask_path) as mask_image:
                mask = np.asarray(mask_image)
            assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255}
            assert 0.0 < (mask > 0).mean() < 0.35


def test_builtin_test_dataset_labels(builtin_root: Path) -> None:
    dataset = TestDataset(builtin_root, "grass", 64)
    labels = [dataset[i].label for i in range(0, len(dataset), 7)]
    assert set(labels) == {0, 1}
    with Image.open(list_train_images(builtin_root, "grass")[0]) as image:
        assert image.mode == "L" and image.size == (256, 256)


def test_builtin_defect_sizes_range_from_small_to_large(builtin_root: Path) -> None:
    for defect_type in DEFECT_TYPES:
        masks = sorted((builtin_root / "gravel" / "ground_truth" / defect_type).glob("*_mask.png"))
        areas = []
        for mask_path in masks:
            with Image.open(mask_path) as mask:
                areas.append(int((np.asarray(mask) > 0).sum()))
        assert min(areas) < 400 and max(areas) > 3 * min(areas), (defect_type, areas)


def test_builtin_regeneration_is_skipped_when_present(builtin_root: Path) -> None:
    probe = builtin_root / "brick" / "train" / "good" / "000.png"
    before = probe.stat().st_mtime_ns
    assert ensure_builtin_dataset(builtin_root.parent) == builtin_root
    assert probe.stat().st_mtime_ns == before
    assert not [p for p in builtin_root.parent.iterdir() if p.name.startswith(".")]


def test_builtin_generation_is_deterministic(builtin_root: Path, tmp_path: Path) -> None:
    with tqdm(disable=True) as bar:
        builtin_module._generate_category(1, "grass", tmp_path / "grass", bar)
    for relative in ("train/good/007.png", "test/good/003.png", "test/scratch/005.png", "test/cut/002.png",
                     "ground_truth/foreign/006_mask.png"):
        first = hashlib.sha256((builtin_root / "grass" / relative).read_bytes()).hexdigest()
        second = hashlib.sha256((tmp_path / "grass" / relative).read_bytes()).hexdigest()
        assert first == second, relative


def test_builtin_force_regenerates_and_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMDD_DATA", str(tmp_path / "data"))
    assert default_data_root() == tmp_path / "data"
    monkeypatch.setattr(builtin_module, "BUILTIN_CATEGORIES", ("brick",))
    monkeypatch.setattr(builtin_module, "N_TRAIN", 2)
    monkeypatch.setattr(builtin_module, "N_TEST_GOOD", 1)
    monkeypatch.setattr(builtin_module, "N_PER_DEFECT", 1)
    root = ensure_builtin_dataset()
    assert root == tmp_path / "data" / f"builtin_v{builtin_module.BUILTIN_VERSION}"
    stale = root / "brick" / "train" / "good" / "stale.png"
    stale.write_bytes(b"")
    assert ensure_builtin_dataset() == root and stale.exists()
    ensure_builtin_dataset(force=True)
    assert not stale.exists()
    assert len(list_train_images(root, "brick")) == 2
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [root.name]
