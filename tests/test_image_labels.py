"""Datasets with image labels only: a test split without any ground truth trains, evaluates and predicts, its pixel
metrics absent (not zero, not an error); and the ELPV reader on a copy of the package's layout."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_mvtec_tree
from dmdd_core.cli import main
from dmdd_core.data import ELPVLayout, TestDataset, elpv_root, open_source
from dmdd_core.infer import ABSENT_PIXEL_METRICS

IMAGE_METRICS = {"image_auroc", "image_f1_max"}


@pytest.fixture()
def image_labelled(tmp_path: Path) -> Path:
    """A category in MVTec AD layout whose ground_truth folder is gone: image labels only."""
    folder = make_mvtec_tree(tmp_path / "data", "part", n_train=8, defects={"good": 3, "scratch": 3}, size=(40, 40))
    shutil.rmtree(folder / "ground_truth")
    return tmp_path / "data"


def test_a_split_without_ground_truth_has_image_labels_only(image_labelled: Path) -> None:
    source = open_source(image_labelled)
    assert not source.has_pixel_labels("part")
    items = source.test_items("part")
    assert [it.label for it in items] == [0, 0, 0, 1, 1, 1] and all(it.mask is None for it in items)
    assert TestDataset(source, "part", 32).masks.sum() == 0


def test_example_figure_has_no_ground_truth_row_without_masks(image_labelled: Path) -> None:
    """The best/worst example figure leaves the ground-truth row out for a split with image labels only, and
    keeps it for one with masks."""
    import matplotlib.pyplot as plt
    import torch

    from dmdd_core.config import DMDDConfig
    from dmdd_core.infer import evaluate
    from dmdd_core.model import DMDD
    from dmdd_core.plots import example_figure

    torch.manual_seed(0)
    model = DMDD(DMDDConfig.preset("smoke", teacher="resnet18", teacher_pretrained=False)).eval()
    with_masks = image_labelled.parent / "with_masks"
    make_mvtec_tree(with_masks, "part", n_train=8, defects={"good": 3, "scratch": 3}, size=(40, 40))
    for root, rows in ((image_labelled, ["image", "anomaly map"]), (with_masks, ["image", "ground truth", "anomaly map"])):
        fig = example_figure(evaluate(model, root, "part", progress=False, padim=False), per_kind=1)
        assert [ax.get_ylabel() for ax in fig.axes[: 3 * len(rows) : 3]] == rows
        assert len(fig.axes) == 3 * len(rows) + 1  # and the colour bar of the maps' shared scale
        plt.close(fig)


def test_a_ground_truth_folder_with_a_missing_mask_stays_an_error(tmp_path: Path) -> None:
    folder = make_mvtec_tree(tmp_path, "part", n_train=3, defects={"good": 1, "scratch": 2}, size=(40, 40))
    (folder / "ground_truth" / "scratch" / "001_mask.png").unlink()
    assert open_source(tmp_path).has_pixel_labels("part")
    with pytest.raises(Exception, match=r"without a mask: expected .*001_mask\.png"):
        TestDataset(tmp_path, "part", 32)


def test_cli_trains_evaluates_and_predicts_with_image_labels_only(
    image_labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["--preset", "smoke", "--data", str(image_labelled), "--teacher", "tf_efficientnet_lite0"]
    assert main(["train", *args, "--category", "part", "--out", str(run), "--evaluate"]) == 0
    assert "pixel AUROC absent" in capsys.readouterr().out
    metrics_file = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(run), "--json", str(metrics_file)]) == 0
    record = json.loads(metrics_file.read_text())
    for who in ("dmdd", "naive_baseline", "padim"):
        assert set(record[who]) == IMAGE_METRICS, who  # absent, neither zero nor None
        assert all(0.0 <= v <= 1.0 for v in record[who].values())
    assert record["pixel_metrics"] == ABSENT_PIXEL_METRICS and record["num_defective"] == 3
    assert record["padim_fit_seconds"] > 0
    # The validation split has synthetic masks: its pixel metrics are there.
    assert main(["evaluate", "--checkpoint", str(run), "--split", "val", "--json", str(metrics_file)]) == 0
    assert "pixel_auroc" in json.loads(metrics_file.read_text())["dmdd"]
    out = tmp_path / "predictions"
    assert main(["predict", "--checkpoint", str(run), "--input", str(image_labelled / "part" / "test"),
                 "--out", str(out)]) == 0
    with (out / "scores.csv").open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 6


# --- ELPV ----------------------------------------------------------------------------------------------------------
def make_elpv_tree(root: Path) -> Path:
    """labels.csv and images/ as the elpv-dataset package installs them: four blocks of 60 cells (two modules of
    mono cells, then two of poly), in each block every fifth cell rated 1, the next 1/3, the others 0."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = []
    for line in range(240):
        probability = {0: 1.0, 1: 1 / 3}.get(line % 5, 0.0)
        name = f"images/cell{line + 1:04d}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / name)
        lines.append(f"{name}  {probability!r:<20} {'mono' if line < 120 else 'poly'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_elpv_reader_gives_a_fixed_split_per_cell_type_from_separate_modules(tmp_path: Path) -> None:
    root = make_elpv_tree(tmp_path / "elpv")
    source = open_source(root)
    assert isinstance(source, ELPVLayout) and source.kind == "elpv" and source.dataset == "elpv"
    assert source.categories() == ["mono", "poly"] and not source.has_pixel_labels("mono")

    def cells(lines: range, rated: float) -> list[str]:
        return [f"cell{i + 1:04d}.png" for i in lines if {0: 1.0, 1: 1 / 3}.get(i % 5, 0.0) == rated]

    for category, train_block, test_block in (("mono", range(0, 60), range(60, 120)),
                                              ("poly", range(120, 180), range(180, 240))):
        train, items = source.train_images(category), source.test_items(category)
        assert [p.name for p in train] == cells(train_block, 0.0)  # normal cells of the training module only
        assert [it.image.name for it in items if it.label == 0] == cells(test_block, 0.0)
        assert [it.image.name for it in items if it.label == 1] == cells(test_block, 1.0)  # never 1/3
        assert all(it.mask is None for it in items) and all(it.defect_type == "defective" for it in items if it.label)
    test = TestDataset(source, "mono", 32)
    assert test.images.shape == (len(cells(range(60, 120), 0.0)) + len(cells(range(60, 120), 1.0)), 32, 32, 3)


def test_elpv_without_the_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)  # import fails as if not installed
    with pytest.raises(FileNotFoundError, match="pip install elpv-dataset"):
        elpv_root()
    with pytest.raises(SystemExit, match="--data elpv: .*pip install elpv-dataset"):
        main(["train", "--preset", "smoke", "--dataset", "elpv"])


def test_elpv_reader_names_a_bad_label_line(tmp_path: Path) -> None:
    root = make_elpv_tree(tmp_path / "elpv")
    (root / "labels.csv").write_text("images/cell0001.png  not-a-number  mono\n")
    with pytest.raises(ValueError, match=r"labels\.csv, line 1"):
        open_source(root).categories()


def test_quickstart_and_benchmark_tables_say_pixel_metrics_are_absent(
    image_labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "quick"
    args = ["--preset", "smoke", "--data", str(image_labelled), "--teacher", "tf_efficientnet_lite0", "--out", str(out)]
    assert main(["quickstart", *args]) == 0
    printed = capsys.readouterr().out
    progress = next(line for line in printed.splitlines() if "[1/1]" in line)
    assert "image AUROC" in progress and "PaDiM" in progress and "pixel AUROC" not in progress
    table = (out / "quickstart.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| part |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] != ["–"] * 3 and cells[4:7] == ["–"] * 3  # image AUROC of all three; pixel AUROC absent
    results = (out / "results.md").read_text()
    assert "absent, the test split has image labels only" in results
    per_seed = (out / "results_per_seed.csv").read_text().splitlines()
    assert per_seed[0].split(",")[:3] == ["category", "seed", "image_auroc"] and ",," in per_seed[1]
