"""Every dataset layout, the validation split, and what happens to each kind of bad input."""

from __future__ import annotations

import json
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_mvtec_tree, make_visa_tree
from dmdd_core.catalog import DATASETS, MPDD_CATEGORIES, MVTEC_CATEGORIES, VISA_CATEGORIES
from dmdd_core.cli import main
from dmdd_core.config import DMDDConfig
from dmdd_core.data import (
    SYNTHETIC,
    BadInputError,
    CategoryData,
    FolderLayout,
    InputReport,
    MVTecLayout,
    TestDataset,
    ValidationDataset,
    VisALayout,
    detect_kind,
    open_source,
    source_from_description,
    split_train_val,
)
from dmdd_core.synthesis import TextureSource


def _check_pairing(dataset: TestDataset) -> None:
    """Defective fixture images are bright exactly where their mask is set; good ones have empty masks."""
    for sample in dataset:
        assert sample.image.shape[0] == 3 and sample.mask.shape[0] == 1
        assert set(sample.mask.unique().tolist()) <= {0.0, 1.0}
        if sample.label == 0:
            assert sample.mask.sum() == 0
        else:
            inside = sample.image[:, sample.mask[0] > 0].mean()
            outside = sample.image[:, sample.mask[0] == 0].mean()
            assert inside > 0.85 and outside < 0.7, sample.path


# --- the catalog -------------------------------------------------------------------------------------------------
def test_catalog_lists_and_rotation_policy() -> None:
    assert len(MVTEC_CATEGORIES) == 15 and len(MPDD_CATEGORIES) == 6 and len(VISA_CATEGORIES) == 12
    all_names = [c for info in DATASETS.values() for c in info.categories]
    assert len(all_names) == len(set(all_names)), "category names must not collide across datasets"
    mvtec = DATASETS["mvtec"]
    assert mvtec.rotation_policy("screw") == "right_angle_small" and mvtec.rotation_policy("zipper") == "small"
    assert mvtec.rotation_policy("transistor") == "none" and DATASETS["visa"].rotation_policy("pcb1") == "none"
    assert DATASETS["mpdd"].rotation_policy("tubes") == "none"
    assert DATASETS["builtin"].rotation_policy("brick") == "right_angle_small"
    assert set(mvtec.rotation) == set(MVTEC_CATEGORIES)


def test_the_rotation_policy_belongs_to_the_data_source_not_the_category_name(tmp_path: Path) -> None:
    mvtec, mine, single = tmp_path / "mvtec", tmp_path / "mine", tmp_path / "single"
    make_mvtec_tree(mvtec, "grid", n_train=2, defects={})
    make_mvtec_tree(mvtec, "wood", n_train=2, defects={})
    make_mvtec_tree(mine, "grid", n_train=2, defects={})
    make_mvtec_tree(mine, "widget", n_train=2, defects={})
    folder = make_mvtec_tree(single, "grid", n_train=2, defects={})
    assert open_source(mvtec).rotation_policy("grid") == "right_angle_small"
    assert open_source(mvtec).rotation_policy("wood") == "small"
    assert open_source(mvtec, "mvtec").rotation_policy("grid") == "right_angle_small"
    assert open_source(mine).rotation_policy("grid") == "none"  # a dataset of one's own that has a "grid"
    assert open_source(folder).rotation_policy("grid") == "none"  # one folder named grid
    reopened = source_from_description(open_source(mine).describe())
    assert reopened.kind == "mvtec" and reopened.rotation_policy("grid") == "none"


# --- layouts -----------------------------------------------------------------------------------------------------
def test_mvtec_and_mpdd_layouts(tmp_path: Path) -> None:
    mvtec, mpdd, other = tmp_path / "mvtec", tmp_path / "mpdd", tmp_path / "mine"
    make_mvtec_tree(mvtec, "screw", n_train=5, defects={"good": 2, "scratch_head": 2, "thread_side": 1})
    make_mvtec_tree(mvtec, "wood", n_train=3, defects={"good": 1, "hole": 1})
    make_mvtec_tree(mpdd, "tubes", n_train=4, defects={"good": 2, "anomalous": 3})
    make_mvtec_tree(other, "widget", n_train=2, defects={"good": 1, "dent": 1})
    assert (detect_kind(mvtec), detect_kind(mpdd), detect_kind(other)) == ("mvtec", "mpdd", "mvtec")
    source = open_source(mvtec)
    assert isinstance(source, MVTecLayout) and source.categories() == ["screw", "wood"]
    assert len(source.train_images("screw")) == 5
    items = source.test_items("screw")
    assert [(it.image.name, it.mask.name if it.mask else None, it.defect_type, it.label) for it in items] == [
        ("000.png", None, "good", 0),
        ("001.png", None, "good", 0),
        ("000.png", "000_mask.png", "scratch_head", 1),
        ("001.png", "001_mask.png", "scratch_head", 1),
        ("000.png", "000_mask.png", "thread_side", 1),
    ]
    dataset = TestDataset(open_source(mpdd), "tubes", 32)
    assert len(dataset) == 5 and dataset.labels == [1, 1, 1, 0, 0] and dataset.split == "test"
    _check_pairing(dataset)
    reopened = source_from_description(open_source(mpdd).describe())
    assert reopened.kind == "mpdd" and reopened.root == mpdd


def test_visa_layout_through_its_split_csv(tmp_path: Path) -> None:
    make_visa_tree(tmp_path, "pcb1", n_train=6, n_good=2, n_anomaly=3)
    make_visa_tree(tmp_path, "candle", n_train=2, n_good=1, n_anomaly=1)
    assert detect_kind(tmp_path) == "visa"
    source = open_source(tmp_path)
    assert isinstance(source, VisALayout) and source.categories() == ["candle", "pcb1"]
    train = source.train_images("pcb1")
    assert len(train) == 6 and all(p.suffix == ".JPG" and "Normal" in p.parts for p in train)
    dataset = TestDataset(source, "pcb1", 32)
    assert len(dataset) == 5 and sorted(dataset.labels) == [0, 0, 1, 1, 1]
    assert set(dataset.defect_types) == {"good", "anomaly"}
    _check_pairing(dataset)  # VisA masks hold 0/1, not 0/255: binarised as non-zero
    data = CategoryData.load(source, "pcb1", 32, val_fraction=0.2)
    assert len(data.train_paths) + len(data.val_paths) == 6 and len(data.val_paths) == 1
    with pytest.raises(FileNotFoundError, match=r"'capsule' not found.*categories found: \['candle', 'pcb1'\].*VisA"):
        source.train_images("capsule")
    (tmp_path / "split_csv" / "1cls.csv").rename(tmp_path / "split_csv" / "renamed.csv")
    with pytest.raises(FileNotFoundError, match="1cls.csv"):
        source.categories()


def test_folder_layout_with_its_own_mask_suffix(tmp_path: Path) -> None:
    folder = make_mvtec_tree(tmp_path, "my part", n_train=4, defects={"good": 1, "dent": 2}, mask_suffix="_gt")
    assert detect_kind(folder) == "folder"
    source = open_source(folder, mask_suffix="_gt")
    assert isinstance(source, FolderLayout) and source.categories() == ["my part"]
    dataset = TestDataset(source, "my part", 32)
    assert dataset.labels == [1, 1, 0]
    _check_pairing(dataset)
    with pytest.raises(BadInputError, match=r"000_mask\.png"):
        TestDataset(open_source(folder), "my part", 32)  # the default suffix finds no masks, and says where it looked
    with pytest.raises(FileNotFoundError, match="one category, named after its folder"):
        source.train_images("other")


# --- the validation split ----------------------------------------------------------------------------------------
def test_validation_split_is_fixed_seeded_and_disjoint(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i:03d}.png" for i in range(40)]
    train, val = split_train_val(list(reversed(paths)), 0.1, seed=0)
    assert len(val) == 4 and len(train) == 36 and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    assert split_train_val(paths, 0.1, seed=0) == (train, val)
    assert split_train_val(paths, 0.1, seed=1)[1] != val
    assert split_train_val(paths[:3], 0.1)[1].__len__() == 1  # at least one image
    assert split_train_val(paths[:1], 0.5) == ([paths[0]], [])  # one image: nothing to hold out
    assert split_train_val(paths, 0.0) == (paths, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(paths, 1.0)
    with pytest.raises(ValueError, match="val_fraction"):
        DMDDConfig(val_fraction=-0.1)


def test_validation_dataset_has_normal_and_synthetic_anomalies(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path, "tile", n_train=20, defects={})
    data = CategoryData.load(tmp_path, "tile", 32, val_fraction=0.2, val_seed=3)
    assert len(data.val_paths) == 4 and not set(data.val_paths) & set(data.train_paths)
    val = ValidationDataset(data.val_images, data.val_paths, "tile", TextureSource.builtin(), seed=3)
    assert len(val) == 8 and val.labels == [0] * 4 + [1] * 4 and val.split == "val"
    assert val.defect_types[-1] == SYNTHETIC and val.paths[-1].endswith("#synthetic")
    for i in range(4):
        normal, anomalous = val[i], val[i + 4]
        assert normal.mask.sum() == 0
        assert anomalous.mask.sum() >= 0.005 * 32 * 32
        outside = anomalous.mask.expand(3, -1, -1) == 0
        assert torch.allclose(anomalous.image[outside], normal.image[outside], atol=1 / 255)
    again = ValidationDataset(data.val_images, data.val_paths, "tile", TextureSource.builtin(), seed=3)
    assert np.array_equal(again.images, val.images) and np.array_equal(again.masks, val.masks)


def test_training_records_validation_and_thresholds(smoke_run, builtin_root: Path, tmp_path: Path) -> None:
    cfg = smoke_run.model.cfg
    log = json.loads((smoke_run.checkpoint.parent / "log.json").read_text())
    assert log["validation"]["num_images"] == 6 and log["num_train_images"] == 54
    history = log["validation"]["history"]
    assert [h["step"] for h in history] == [cfg.total_steps]
    assert 0.0 <= history[-1]["pixel_auroc"] <= 1.0
    thresholds = log["validation"]["thresholds"]
    assert thresholds["rule"].startswith("F1-max on the validation split")
    state = torch.load(smoke_run.checkpoint, weights_only=True)
    assert len(state["split"]["val"]) == 6 and not set(state["split"]["val"]) & set(state["split"]["train"])
    assert state["data"]["kind"] == "builtin"

    from dmdd_core.infer import evaluate, predict_folder

    ev = evaluate(smoke_run.model, builtin_root, "brick", split="val")
    assert ev.split == "val" and ev.num_images == 12 and "[val split" in ev.summary()
    assert ev.to_dict()["split"] == "val"

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(BadInputError, match=r"broken\.png"):
        predict_folder(smoke_run.model, folder, tmp_path / "out", thresholds=thresholds)
    with pytest.warns(UserWarning, match="broken.png"):
        csv_path = predict_folder(smoke_run.model, folder, tmp_path / "out", thresholds=thresholds, skip_bad=True)
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "path,score,width,height,anomalous" and len(rows) == 3
    assert "broken.png" in (tmp_path / "out" / "skipped.csv").read_text()
    with Image.open(tmp_path / "out" / "masks" / "a.png") as mask:
        assert mask.size == (50, 40) and set(np.unique(np.asarray(mask))) <= {0, 255}


# --- bad input, one case at a time -------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A category "part" with 6 training images, 2 good and 3 defective test images, sizes 48x40."""
    make_mvtec_tree(tmp_path, "part", n_train=6, defects={"good": 2, "dent": 3})
    return tmp_path


def test_corrupt_training_image_is_named_or_skipped_and_counted(tree: Path) -> None:
    bad = tree / "part" / "train" / "good" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(BadInputError, match=r"(?s)1 bad images.*002\.png.*--skip-bad"):
        CategoryData.load(tree, "part", 32, val_fraction=0.0)
    with pytest.warns(UserWarning, match="skipped.*002.png"):
        data = CategoryData.load(tree, "part", 32, val_fraction=0.0, skip_bad=True)
    assert len(data.train_paths) == 5 and bad not in data.train_paths
    assert data.report.num_skipped == 1 and data.report.to_dict()["skipped"][0]["path"] == str(bad)
    assert data.report.summary() == "1 bad file skipped"


def test_truncated_test_image_is_named_or_skipped(tree: Path) -> None:
    path = tree / "part" / "test" / "good" / "001.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BadInputError, match=r"001\.png.*truncated"):
        TestDataset(tree, "part", 32)
    report = InputReport()
    with pytest.warns(UserWarning):
        dataset = TestDataset(tree, "part", 32, skip_bad=True, report=report)
    assert len(dataset) == 4 and report.num_skipped == 1


def test_defect_image_without_mask(tree: Path) -> None:
    (tree / "part" / "ground_truth" / "dent" / "001_mask.png").unlink()
    with pytest.raises(BadInputError, match=r"(?s)without a mask: expected .*dent.001_mask\.png"):
        TestDataset(tree, "part", 32)
    with pytest.warns(UserWarning, match="without a mask"):
        dataset = TestDataset(tree, "part", 32, skip_bad=True)
    assert dataset.labels == [1, 1, 0, 0] and dataset.report.num_skipped == 1


def test_mask_of_another_size(tree: Path) -> None:
    gt = tree / "part" / "ground_truth" / "dent"
    with Image.open(gt / "000_mask.png") as mask:  # 48x40 -> 96x80: same aspect ratio, resized and counted
        mask.resize((96, 80), Image.Resampling.NEAREST).save(gt / "000_mask.png")
    dataset = TestDataset(tree, "part", 32)
    assert len(dataset) == 5 and len(dataset.report.resized_masks) == 1
    assert "1 mask resized" in dataset.report.summary()
    _check_pairing(dataset)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(gt / "001_mask.png")  # square mask of a 48x40 image
    with pytest.raises(BadInputError, match=r"001_mask\.png: mask is 40x40 but its image 001\.png is 48x40"):
        TestDataset(tree, "part", 32)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_image_modes_become_three_channels(tmp_path: Path, mode: str) -> None:
    make_mvtec_tree(tmp_path, "part", n_train=3, defects={"good": 1, "dent": 2}, mode=mode)
    data = CategoryData.load(tmp_path, "part", 32, val_fraction=0.0)
    assert data.train_images.shape == (3, 32, 32, 3) and data.train_images.dtype == np.uint8
    if mode in ("L", "I;16"):
        assert (data.train_images[..., 0] == data.train_images[..., 2]).all()
    _check_pairing(TestDataset(tmp_path, "part", 32))


def test_non_square_images_of_varying_sizes(tmp_path: Path) -> None:
    for size in ((64, 30), (30, 64), (50, 50)):
        make_mvtec_tree(tmp_path / f"{size[0]}x{size[1]}", "part", n_train=2, defects={"good": 1, "dent": 1},
                        size=size)
    mixed = tmp_path / "mixed" / "part"
    for sub in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (mixed / sub).mkdir(parents=True)
    for i, size in enumerate(((64, 30), (30, 64), (50, 50))):
        src = tmp_path / f"{size[0]}x{size[1]}" / "part"
        for sub, name in (("train/good", "000.png"), ("test/good", "000.png"), ("test/dent", "000.png")):
            (mixed / sub / f"{i}{name}").write_bytes((src / sub / name).read_bytes())
        (mixed / "ground_truth/dent" / f"{i}000_mask.png").write_bytes((src / "ground_truth/dent/000_mask.png").read_bytes())
    data = CategoryData.load(tmp_path / "mixed", "part", 32, val_fraction=0.0)
    assert data.train_images.shape == (3, 32, 32, 3)
    dataset = TestDataset(tmp_path / "mixed", "part", 32)
    assert len(dataset) == 6
    _check_pairing(dataset)


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset root not found.*dmdd download"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "part" / "train" / "good").mkdir(parents=True)
    (tmp_path / "part" / "train" / "good" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no training images in .*notes\.txt"):
        CategoryData.load(tmp_path, "part", 32)
    make_mvtec_tree(tmp_path, "nodata", n_train=2, defects={})
    with pytest.raises(FileNotFoundError, match="no test folder"):
        TestDataset(tmp_path, "nodata", 32)
    (tmp_path / "nodata" / "test" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no test images"):
        TestDataset(tmp_path, "nodata", 32)
    with pytest.raises(ValueError, match="unknown dataset kind"):
        open_source(tmp_path, "imagenet")


def test_unknown_category(tmp_path: Path) -> None:
    make_mvtec_tree(tmp_path, "screw", n_train=2, defects={})
    make_mvtec_tree(tmp_path, "bottle", n_train=2, defects={})
    with pytest.raises(FileNotFoundError, match=r"'scerw' not found.*\['bottle', 'screw'\].*MVTec AD has no category"):
        CategoryData.load(tmp_path, "scerw", 32)


def test_paths_with_spaces_and_non_ascii(tmp_path: Path) -> None:
    root = tmp_path / "données d'essai"
    make_mvtec_tree(root, "pièce à contrôler", n_train=3, defects={"good": 1, "rayure fine": 2})
    data = CategoryData.load(root, "pièce à contrôler", 32, val_fraction=0.0)
    assert len(data.train_paths) == 3
    dataset = TestDataset(root, "pièce à contrôler", 32)
    assert dataset.defect_types == ["good", "rayure fine", "rayure fine"] and dataset.labels == [0, 1, 1]
    _check_pairing(dataset)


# --- the command line and downloads ------------------------------------------------------------------------------
def test_cli_skip_bad_is_counted_in_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_mvtec_tree(tmp_path / "data", "part", n_train=8, defects={"good": 2, "dent": 2})
    bad = tmp_path / "data" / "part" / "train" / "good" / "003.png"
    bad.write_bytes(b"broken")
    args = ["train", "--preset", "smoke", "--teacher", "tf_efficientnet_lite0", "--data", str(tmp_path / "data"),
            "--category", "part", "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "003.png" in err and "--skip-bad" in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--skip-bad", "--evaluate"]) == 0
    out = capsys.readouterr().out
    assert "1 bad file skipped" in out and "val split" in out and "[test split" in out
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["input_report"]["num_skipped"] == 1 and log["input_report"]["skipped"][0]["path"] == str(bad)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--split", "val", "--skip-bad"]) == 0
    assert "[val split, 2 images" in capsys.readouterr().out


def test_training_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("training must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    from dmdd_core.fit import fit

    with pytest.raises(FileNotFoundError, match="dmdd download"):
        fit(DMDDConfig.preset("smoke"), tmp_path / "mvtec_anomaly_detection", "bottle", tmp_path / "run")


@pytest.mark.parametrize("layout", ["visa", "folder"])
def test_cli_trains_and_evaluates_every_layout(layout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if layout == "visa":
        data, category = make_visa_tree(tmp_path / "VisA", "pcb1", n_train=8, n_good=2, n_anomaly=2), "pcb1"
        extra: list[str] = []
    else:
        data = make_mvtec_tree(tmp_path, "my part", n_train=8, defects={"good": 2, "dent": 2}, mask_suffix="_gt")
        category, extra = "my part", ["--mask-suffix", "_gt"]
    args = ["train", "--preset", "smoke", "--teacher", "tf_efficientnet_lite0", "--data", str(data), "--dataset",
            layout, *extra, "--out", str(tmp_path / "run"), "--evaluate"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"({layout}), category {category}" in out and "[test split, 4 images" in out
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["data"]["kind"] == layout and state["category"] == category
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run")]) == 0  # reopens the same layout from the checkpoint
    assert "[test split, 4 images" in capsys.readouterr().out
