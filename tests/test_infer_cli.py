"""Inference (maps, scores, folders), evaluation, metrics and the command line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dmdd_core.cli import main
from dmdd_core.config import DMDDConfig
from dmdd_core.data import load_image
from dmdd_core.fit import TrainResult
from dmdd_core.infer import METRIC_KEYS, evaluate, predict_folder
from dmdd_core.metrics import image_auroc, pixel_auroc
from dmdd_core.protocol import AUPRO_DEFINITION, CHECKPOINT_RULE
from dmdd_core.train import load_checkpoint

CATEGORY = "brick"


def noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A folder of images of different sizes and modes: ``root``, and ``sizes`` (relative path -> (H, W))."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "sub dir").mkdir()
    images = {
        "gray.png": Image.fromarray(noise(40, 60, 0)).convert("L"),
        "rgba.png": Image.fromarray(noise(30, 50, 1)).convert("RGBA"),
        "wide.jpg": Image.fromarray(noise(45, 130, 2)),
        "café photo 1.png": Image.fromarray(noise(77, 33, 3)),
        "sub dir/tall.bmp": Image.fromarray(noise(96, 64, 4)),
    }
    for name, image in images.items():
        image.save(root / name)
    (root / "notes.txt").write_text("not an image")
    sizes = {name: (image.height, image.width) for name, image in images.items()}
    return {"root": root, "sizes": sizes}


@pytest.fixture(scope="module")
def folder_predictions(
    smoke_run: TrainResult, mixed_folder: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("predictions")
    csv_path = predict_folder(smoke_run.model, mixed_folder["root"], out, batch_size=2, progress=False)
    return out, csv_path


# --- predicting a folder ------------------------------------------------------------------------------------------
def test_predict_folder_writes_a_map_per_image_at_its_own_size(
    folder_predictions: tuple[Path, Path], mixed_folder: dict[str, Any]
) -> None:
    out, _ = folder_predictions
    sizes = mixed_folder["sizes"]
    maps = sorted(p.relative_to(out / "maps").as_posix() for p in (out / "maps").rglob("*.npy"))
    assert maps == sorted(str(Path(name).with_suffix(".npy").as_posix()) for name in sizes)
    for name, (height, width) in sizes.items():
        anomaly_map = np.load(out / "maps" / Path(name).with_suffix(".npy"))
        assert anomaly_map.dtype == np.float32
        assert anomaly_map.shape == (height, width)
        assert 0.0 <= anomaly_map.min() and anomaly_map.max() <= 1.0
        with Image.open(out / "overlays" / Path(name).with_suffix(".png")) as overlay:
            assert overlay.size == (width, height)
            assert overlay.mode == "RGB"


def test_predict_folder_scores_csv(
    folder_predictions: tuple[Path, Path], mixed_folder: dict[str, Any], smoke_run: TrainResult
) -> None:
    _, csv_path = folder_predictions
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    sizes = mixed_folder["sizes"]
    assert sorted(row["path"] for row in rows) == sorted(sizes)
    assert not list(csv_path.parent.glob("*.tmp"))
    model = smoke_run.model
    for row in rows:
        height, width = sizes[row["path"]]
        assert (int(row["height"]), int(row["width"])) == (height, width)
        image = load_image(mixed_folder["root"] / row["path"], model.cfg.image_size)
        with torch.no_grad():
            expected = float(model(image[None]).score)
        assert float(row["score"]) == pytest.approx(expected, abs=1e-5)


def test_predict_folder_never_overwrites_images_with_the_same_stem(smoke_run: TrainResult, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(40, 40, 5)).save(folder / "a.png")
    Image.fromarray(noise(50, 70, 6)).save(folder / "a.jpg")
    out = tmp_path / "out"
    try:
        predict_folder(smoke_run.model, folder, out, progress=False)
    except ValueError as err:
        assert "a.png" in str(err) and "a.jpg" in str(err)
        return
    shapes = sorted(np.load(p).shape for p in (out / "maps").rglob("*.npy"))
    assert shapes == [(40, 40), (50, 70)]
    assert len(list((out / "overlays").rglob("*.png"))) == 2


def test_predict_folder_csv_paths_name_the_input_files(smoke_run: TrainResult, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(40, 40, 7)).save(folder / "scan.2024.01.png")
    csv_path = predict_folder(smoke_run.model, folder, tmp_path / "out", progress=False)
    with csv_path.open(newline="") as fh:
        paths = [row["path"] for row in csv.DictReader(fh)]
    assert (tmp_path / "out" / "maps" / "scan.2024.01.npy").is_file()
    assert paths == ["scan.2024.01.png"]


def test_predict_folder_errors_name_the_folder(smoke_run: TrainResult, tmp_path: Path) -> None:
    missing = tmp_path / "missing_folder"
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        predict_folder(smoke_run.model, missing, tmp_path / "out")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="empty_folder"):
        predict_folder(smoke_run.model, empty, tmp_path / "out")


# --- evaluation and metrics ---------------------------------------------------------------------------------------
def test_evaluate_reports_metrics_with_their_setting(smoke_run: TrainResult, builtin_root: Path) -> None:
    result = evaluate(smoke_run.model, builtin_root, CATEGORY, batch_size=32, progress=False)
    for metrics in (result.metrics, result.baseline):
        assert set(metrics) == set(METRIC_KEYS)
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert result.resolution == smoke_run.model.cfg.image_size == 64
    assert result.seed == smoke_run.model.cfg.seed
    preds = result.predictions
    assert preds is not None
    assert result.num_images == len(preds.labels) == preds.maps.shape[0]
    assert result.num_defective == int(preds.labels.sum()) and 0 < result.num_defective < result.num_images
    assert preds.maps.shape[1:] == (64, 64) and preds.maps.dtype == np.float32
    assert result.metrics["image_auroc"] == pytest.approx(image_auroc(preds.labels, preds.scores))
    record = json.loads(json.dumps(result.to_dict()))
    assert record["resolution"] == 64 and record["checkpoint_rule"] == CHECKPOINT_RULE
    assert record["aupro_definition"] == AUPRO_DEFINITION and set(record["metric_keys"]) == set(METRIC_KEYS)
    assert record["dmdd"] == result.metrics and record["naive_baseline"] == result.baseline


def test_image_auroc_perfect_and_inverted() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert image_auroc(labels, scores) == pytest.approx(1.0)
    assert image_auroc(labels, -scores) == pytest.approx(0.0)
    assert image_auroc(labels, np.array([0.1, 0.9, 0.3, 0.8, 0.4])) == pytest.approx(4 / 6)


def test_pixel_auroc_over_all_pixels() -> None:
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[0, :2, :2] = 1
    assert pixel_auroc(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert pixel_auroc(masks, 1.0 - masks) == pytest.approx(0.0)


def test_metrics_reject_single_class_and_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="normal and anomalous"):
        image_auroc(np.zeros(4), np.arange(4.0))
    with pytest.raises(ValueError, match="normal and anomalous"):
        image_auroc(np.ones(4), np.arange(4.0))
    with pytest.raises(ValueError, match="4 targets but 5 scores"):
        image_auroc(np.array([0, 1, 0, 1]), np.arange(5.0))
    with pytest.raises(ValueError, match="normal and anomalous"):
        pixel_auroc(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_auroc(np.eye(4)[None], np.eye(4))


# --- command line -------------------------------------------------------------------------------------------------
def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for command in ("quickstart", "train", "evaluate", "predict"):
        assert command in text


def test_python_m_dmdd_core_help() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dmdd_core", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "quickstart" in done.stdout and "predict" in done.stdout


def test_cli_train_evaluate_predict(builtin_root: Path, mixed_folder: dict[str, Any], tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--preset",
            "smoke",
            "--data",
            str(builtin_root),
            "--category",
            CATEGORY,
            "--out",
            str(run),
            "--teacher",
            "tf_efficientnet_lite0",
        ]
    )
    assert code == 0
    assert (run / "checkpoint.pt").is_file() and (run / "log.json").is_file()
    model, state = load_checkpoint(run)
    assert model.teacher.name == "tf_efficientnet_lite0"
    assert state["step"] == DMDDConfig.preset("smoke").total_steps
    assert state["config"]["image_size"] == 64

    metrics_file = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(run), "--json", str(metrics_file)]) == 0
    record = json.loads(metrics_file.read_text())
    assert record["category"] == CATEGORY and record["resolution"] == 64
    assert all(0.0 <= v <= 1.0 for v in record["dmdd"].values())
    assert record["metric_resolution"] == "the model's input, 64x64"
    assert main(["evaluate", "--checkpoint", str(run), "--resolution", "original", "--json", str(metrics_file)]) == 0
    original = json.loads(metrics_file.read_text())
    assert original["metric_resolution_setting"] == "original" and "64x64" not in original["metric_sizes"]
    assert original["metric_resolution"].startswith("each image's original size")

    predictions = tmp_path / "predictions"
    assert (
        main(["predict", "--checkpoint", str(run), "--input", str(mixed_folder["root"]), "--out", str(predictions)])
        == 0
    )
    with (predictions / "scores.csv").open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(mixed_folder["sizes"])
    assert len(list((predictions / "maps").rglob("*.npy"))) == len(mixed_folder["sizes"])


def test_cli_bad_data_path_exits_with_a_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "smoke", "--data", str(missing), "--out", str(tmp_path / "run")])
    assert info.value.code not in (0, None)
    assert str(missing) in str(info.value.code) and "folder not found" in str(info.value.code)
    assert not (tmp_path / "run").exists()


def test_cli_missing_checkpoint_returns_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", "--checkpoint", str(tmp_path / "nothing_here")])
    assert code != 0
    assert "nothing_here" in capsys.readouterr().err


# --- the tutorial's model reaches its quality bar -------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:teacher='auto'")
def test_the_tutorial_model_detects_brick_defects(tutorial_run: TrainResult, builtin_root: Path) -> None:
    """The model the notebooks study (in fast mode the fast preset at 100 + 60 steps of batch 4) has learned
    something real: far above the naive baseline on the built-in brick's test split. The full fast preset's
    figures are the quickstart's (README)."""
    result = tutorial_run
    assert result.model.cfg.teacher == "auto" and result.model.teacher.name == "tf_efficientnet_lite0"
    evaluation = evaluate(result.model, builtin_root, CATEGORY, progress=False)
    # Seed 0 on two CPU cores gave image AUROC 0.905, pixel AUROC 0.949, AUPRO 0.827 on one machine and 0.820, 0.870,
    # 0.761 on another (a 160-step run follows the CPU's arithmetic); the naive baseline gets 0.458, 0.565 and 0.184.
    # The bars sit below both runs and far above the naive baseline.
    m, naive = evaluation.metrics, evaluation.baseline
    assert m["image_auroc"] >= 0.75 and m["pixel_auroc"] >= 0.82 and m["aupro"] >= 0.65, evaluation.summary()
    assert m["image_auroc"] - naive["image_auroc"] >= 0.25, evaluation.summary()
    assert m["pixel_auroc"] - naive["pixel_auroc"] >= 0.25, evaluation.summary()
    # PaDiM is reported beside it, fitted on the same teacher and training images.
    assert set(evaluation.padim) == set(m) and evaluation.padim_fit_seconds is not None


def test_cli_quickstart_writes_results_for_every_category(builtin_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "quick start"
    args = ["quickstart", "--preset", "smoke", "--data", str(builtin_root), "--teacher", "tf_efficientnet_lite0"]
    assert main([*args, "--categories", "brick", "grass", "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert [r["category"] for r in records] == ["brick", "grass"]
    for record in records:
        r = record["evaluation"]
        for who in ("dmdd", "naive_baseline"):
            assert set(r[who]) == {k for k in METRIC_KEYS if not k.startswith("aupro_")}
            assert all(0.0 <= v <= 1.0 for v in r[who].values())
        assert r["resolution"] == 64 and r["seed"] == 0 and r["split"] == "test"
        assert (out / "runs" / r["category"] / "seed0" / "checkpoint.pt").is_file()
        for figure in ("examples", "losses"):
            assert (out / "figures" / f"{r['category']}_seed0_{figure}.png").is_file()
    table = (out / "quickstart.md").read_text()
    assert "| brick |" in table and "| grass |" in table and "**mean**" in table and "val image AUROC" in table
    assert "| brick |" in (out / "results.md").read_text()


def test_cli_amp_chooses_or_forces_the_precision(capsys: pytest.CaptureFixture[str]) -> None:
    from dmdd_core.cli import _config, build_parser

    parser = build_parser()
    assert _config(parser.parse_args(["train", "--preset", "smoke"])).amp == "auto"
    for mode in ("bf16", "fp16", "off"):
        assert _config(parser.parse_args(["train", "--preset", "smoke", "--amp", mode])).amp == mode
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--amp", "fp8"])
    assert "fp8" in capsys.readouterr().err
