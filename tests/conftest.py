"""Shared fixtures: a small dataset tree in MVTec AD layout, and the built-in dataset generated once per session."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _pil_image(array: np.ndarray, mode: str) -> Image.Image:
    """(H,W,3) uint8 -> a PIL image of ``mode`` (RGB, L, LA, RGBA, P or I;16)."""
    rgb = Image.fromarray(array)
    if mode == "RGB":
        return rgb
    if mode == "L":
        return rgb.convert("L")
    if mode == "LA":
        return rgb.convert("LA")
    if mode == "RGBA":
        return rgb.convert("RGBA")
    if mode == "P":
        return rgb.quantize(colors=64)
    if mode == "I;16":
        gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(gray)
    raise ValueError(f"unsupported mode {mode!r}")


def make_mvtec_tree(
    root: str | Path,
    category: str,
    n_train: int,
    defects: dict[str, int],
    size: tuple[int, int] = (48, 40),
    mode: str = "RGB",
    mask_suffix: str = "_mask",
) -> Path:
    """Write a tiny dataset in MVTec AD layout under ``root/category`` and return that category folder.

    ``defects`` maps a test folder to its number of images; the key "good" gives normal test images, every other
    key a defect type with one ``ground_truth/<type>/<stem>_mask.png`` per image. Images are ``size`` = (W,H) noise
    around mid-grey in ``mode``; a defective image is bright (value 250) exactly where its mask is set, so tests can
    check that images and masks are paired.
    """
    width, height = size
    folder = Path(root) / category
    rng = np.random.default_rng(zlib.crc32(category.encode()))

    def normal() -> np.ndarray:
        return rng.integers(60, 160, size=(height, width, 3), dtype=np.uint8)

    train_dir = folder / "train" / "good"
    train_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        _pil_image(normal(), mode).save(train_dir / f"{i:03d}.png")
    for defect_type, count in defects.items():
        test_dir = folder / "test" / defect_type
        test_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = normal()
            if defect_type != "good":
                mask = np.zeros((height, width), dtype=np.uint8)
                top, left = (i * 3) % (height // 2), (i * 5) % (width // 2)
                mask[top : top + height // 3, left : left + width // 3] = 255
                image[mask > 0] = 250
                gt_dir = folder / "ground_truth" / defect_type
                gt_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(gt_dir / f"{i:03d}{mask_suffix}.png")
            _pil_image(image, mode).save(test_dir / f"{i:03d}.png")
    return folder


def make_visa_tree(root: str | Path, category: str, n_train: int, n_good: int, n_anomaly: int,
                   size: tuple[int, int] = (60, 40)) -> Path:
    """A tiny dataset in VisA's layout under ``root``: ``<category>/Data/Images/{Normal,Anomaly}/*.JPG``,
    ``<category>/Data/Masks/Anomaly/*.png`` (values 0/1, as VisA's) and rows appended to
    ``split_csv/1cls.csv``. Anomalous images are bright exactly where their mask is set. Returns ``root``."""
    import csv

    width, height = size
    root = Path(root)
    rng = np.random.default_rng(zlib.crc32(category.encode()))
    images = root / category / "Data" / "Images"
    masks = root / category / "Data" / "Masks" / "Anomaly"
    for folder in (images / "Normal", images / "Anomaly", masks, root / "split_csv"):
        folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train + n_good):
        name = f"{i:04d}.JPG"
        Image.fromarray(rng.integers(60, 160, size=(height, width, 3), dtype=np.uint8)).save(images / "Normal" / name, quality=95)
        split = "train" if i < n_train else "test"
        rows.append([category, split, "normal", f"{category}/Data/Images/Normal/{name}", ""])
    for i in range(n_anomaly):
        image = rng.integers(60, 160, size=(height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[5 + i : 20 + i, 10 : 30] = 1
        image[mask > 0] = 250
        Image.fromarray(image).save(images / "Anomaly" / f"{i:03d}.JPG", quality=95)
        Image.fromarray(mask).save(masks / f"{i:03d}.png")
        rows.append([category, "test", "anomaly", f"{category}/Data/Images/Anomaly/{i:03d}.JPG",
                     f"{category}/Data/Masks/Anomaly/{i:03d}.png"])
    csv_path = root / "split_csv" / "1cls.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def builtin_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in dataset, generated once per test session into a temporary folder."""
    from dmdd_core.data.builtin import ensure_builtin_dataset

    return ensure_builtin_dataset(tmp_path_factory.mktemp("dmdd_data"))


@pytest.fixture(scope="session", autouse=True)
def hub_offline() -> None:
    """Every test runs with the Hugging Face hub offline: weights come from files and installed packages only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smoke_run(builtin_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A ``smoke`` model trained once per session on the built-in ``brick`` category with the offline teacher."""
    from dmdd_core.config import DMDDConfig
    from dmdd_core.fit import fit

    cfg = DMDDConfig.preset("smoke", teacher="tf_efficientnet_lite0")
    return fit(cfg, builtin_root, "brick", tmp_path_factory.mktemp("smoke_run"), progress=False)


@pytest.fixture(scope="session")
def tutorial_run(builtin_root: Path):
    """The tutorial's model (:func:`~dmdd_core.config.tutorial_config`: in fast mode the fast preset at 100 + 60
    steps of batch 4) on the built-in brick, trained once per session into ``$DMDD_RUNS``, where the notebooks
    that only need *a* trained model load it instead of training their own."""
    from dmdd_core.config import runs_dir, tutorial_config, tutorial_run_name
    from dmdd_core.fit import fit

    cfg = tutorial_config()
    return fit(cfg, builtin_root, "brick", runs_dir("tutorial", tutorial_run_name(cfg, "brick")), progress=False)
