"""The speed benchmark runs end to end on the smoke preset and writes positive throughputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def _load_script(path: Path):  # noqa: ANN202 - the benchmark script as a module
    spec = importlib.util.spec_from_file_location(f"dmdd_benchmark_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_speed():  # noqa: ANN202
    return _load_script(SCRIPT)


def test_speed_smoke(builtin_root: Path, tmp_path: Path) -> None:
    speed = _load_speed()
    out = tmp_path / "speed.json"
    argv = "--presets smoke --steps 1 --warmup 1 --prebuilt 1 --device cpu --threads 1 --teacher tf_efficientnet_lite0"
    report = speed.main([*argv.split(), "--data", str(builtin_root), "--json", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report))
    assert written["environment"]["torch"]
    assert written["environment"]["teacher"] == "tf_efficientnet_lite0"
    (result,) = written["results"]
    assert result["preset"] == "smoke" and result["device"] == "cpu"
    assert result["image_size"] == 64 and result["batch_size"] == 2 and result["steps"] == 1
    for key in ("stage1_img_s", "stage2_img_s", "inference_img_s", "data_img_s"):
        assert result[key] > 0, key
    assert result["peak_memory_mib"]["process"] > 0
    assert result["precision"] == "fp32"
    for stage in ("stage1", "stage2"):
        parts = result["breakdown_ms_per_step"][stage]
        assert set(parts) == {"synthesis", "teacher", "student", "segmentation", "backward", "optimizer", "total"}
        assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"], rel=1e-6)
        assert parts["synthesis"] > 0 and parts["teacher"] > 0 and parts["student"] > 0 and parts["optimizer"] > 0
        assert sum(result["breakdown_share"][stage].values()) == pytest.approx(1.0)
    # the student is frozen in stage 2 and the segmentation network untouched in stage 1
    assert result["breakdown_ms_per_step"]["stage1"]["segmentation"] == 0
    assert result["breakdown_ms_per_step"]["stage2"]["segmentation"] > 0


def test_data_loading_benchmark(tmp_path: Path) -> None:
    bench = _load_script(SCRIPT.parent / "data_loading.py")
    speed_json = tmp_path / "speed.json"
    rates = {"preset": "fast", "device": "cpu", "image_size": 128, "batch_size": 8, "stage1_img_s": 20.0,
             "stage2_img_s": 8.0, "inference_img_s": 30.0}
    speed_json.write_text(json.dumps({"results": [rates]}))
    out = tmp_path / "data.json"
    argv = "--images 6 --source-size 96 --size 64 --pairs 8 --batch-size 4"
    figure = tmp_path / "data.png"
    report = bench.main([*argv.split(), "--speed-json", str(speed_json), "--json", str(out), "--figure", str(figure)])
    assert figure.stat().st_size > 10_000
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["num_images"] == 6 and report["first_image_size"] == [96, 96] and report["input_size"] == 64
    rates_measured = {k: v for k, v in report["data"].items() if k.endswith("_img_s")}
    assert set(rates_measured) >= {"decode_warm_img_s", "decode_1_thread_img_s", "pairs_decoding_each_img_s",
                                   "pairs_cached_img_s", "pairs_cached_unrotated_img_s"}
    assert all(v > 0 for v in rates_measured.values())
    assert report["training"] == [{k: rates[k] for k in ("preset", "device", "image_size", "batch_size",
                                                          "stage1_img_s", "stage2_img_s")}]
    table = bench.format_table(report["data"], report["training"])
    assert "training step, stage 1, fast preset" in table and "in-memory cache" in table


def test_metrics_speed_benchmark(tmp_path: Path) -> None:
    bench = _load_script(SCRIPT.parent / "metrics_speed.py")
    out = tmp_path / "m.json"
    report = bench.main(["--images", "6", "--size", "32", "--repeat", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["metrics"]
    assert set(rows) >= {"aupro (reference)", "aupro per image (variant)", "aupro 200 linear thresholds (variant)"}
    assert all(r["seconds"] > 0 and 0.0 <= r["value"] <= 1.0 for r in rows.values())


def test_gpu_estimate_arithmetic_and_flop_counts() -> None:
    import argparse

    import torch

    from dmdd_core.config import DMDDConfig

    est = _load_script(SCRIPT.parent / "gpu_estimate.py")
    linear = torch.nn.Linear(8, 4, bias=False)
    assert est.count_flops(lambda: linear(torch.rand(3, 8))) == 2 * 3 * 8 * 4

    cfg = DMDDConfig.preset("paper")
    args = argparse.Namespace(tflops=(10.0, 100.0), synthesis_ms=5.0, step_overhead=15.0, seeds=3)
    flops = {"stage1": 1e12, "stage2": 2e12, "inference_per_image": 1e10}
    result = est.estimate(flops, args, cfg)
    slow, fast = result["slow GPU"], result["fast GPU"]
    assert slow["data_ms_per_step"] == pytest.approx(5.0)
    assert (slow["stage1_step_ms"], slow["stage2_step_ms"]) == pytest.approx((120.0, 220.0))  # 5 + compute + 15
    assert (fast["stage1_step_ms"], fast["stage2_step_ms"]) == pytest.approx((30.0, 40.0))
    assert slow["train_minutes_per_task"] == pytest.approx((1000 * 0.120 + 4000 * 0.220) / 60)
    mvtec = slow["datasets"]["MVTec AD"]
    assert mvtec["tasks"] == 45 and mvtec["hours"] == pytest.approx(mvtec["task_minutes"] * 45 / 60)
    assert mvtec["task_minutes"] > slow["train_minutes_per_task"]


def test_gpu_estimate_counts_scale_linearly_with_the_batch() -> None:
    from dmdd_core.config import DMDDConfig

    est = _load_script(SCRIPT.parent / "gpu_estimate.py")
    cfg = DMDDConfig.preset("smoke", teacher="tf_efficientnet_lite0", batch_size=4)
    counted_small, counted_full = est.step_flops(cfg, 2), est.step_flops(cfg, 4)
    for key in ("stage1", "stage2", "inference_per_image"):
        assert counted_small[key] > 0
        assert abs(counted_small[key] - counted_full[key]) <= 1e-6 * counted_full[key], key
    assert counted_full["stage2"] > counted_full["inference_per_image"] * cfg.batch_size


def test_gpu_check_runs_its_two_step_version_on_a_cpu(builtin_root: Path, tmp_path: Path) -> None:
    check = _load_script(SCRIPT.parent / "gpu_check.py")
    out = tmp_path / "check.json"
    report = check.main(["--device", "cpu", "--presets", "paper", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["cpu_figures"] and "CPU figures" in report["note"] and report["auto_precision"] == "fp32"
    (row,) = report["training"]
    assert row["preset"] == "paper" and row["precision"] == "fp32" and row["batch_size"] == 2
    for stage in (1, 2):
        assert row[f"stage{stage}_step_ms"] > row[f"stage{stage}_synthesis_wait_ms"] > 0
        assert 0 < row[f"stage{stage}_synthesis_share"] < 1
    assert report["synthesis"]["batch_size"] == 32 and report["synthesis"]["rotated_batches_per_s"] > 0
    assert set(report["inference"]) == {"precision", "batch_1_img_per_s", "batch_2_img_per_s"}
    prediction = report["prediction"]
    assert prediction["minutes_per_category"] > prediction["train_minutes_per_category"] > 0
    assert "lower bound" in prediction["note"]
    assert check.default_out(report).name.startswith("cpu_")


def test_gpu_check_prediction_arithmetic_and_precisions(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from dmdd_core.config import DMDDConfig

    check = _load_script(SCRIPT.parent / "gpu_check.py")
    cfg = DMDDConfig.preset("paper")  # 1000 + 4000 steps, checks at 16 stage-2 checkpoints
    p = check.predict_minutes(cfg, stage1_ms=60.0, stage2_ms=30.0, inference_img_s=100.0)
    assert p["train_minutes_per_category"] == pytest.approx((1000 * 0.06 + 4000 * 0.03) / 60)
    val_images = 2 * round(0.1 * 3629 / 15)
    infer_s = (1725 / 15 + 16 * val_images) / 100.0
    expected = (1000 * 0.06 + 4000 * 0.03 + infer_s + 1725 / 15 * check.METRIC_SECONDS_PER_TEST_IMAGE) / 60
    assert p["minutes_per_category"] == pytest.approx(expected)
    assert p["mvtec_3_seeds_hours"] == pytest.approx(expected * 45 / 60)
    assert check.default_precisions(torch.device("cpu")) == ["fp32"]
    for capability, expected_precisions in (((7, 5), ["fp32", "fp16"]), ((9, 0), ["fp32", "bf16", "fp16"])):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert check.default_precisions(torch.device("cuda")) == expected_precisions


def test_real_data_benchmark_tables_dmdd_beside_padim_and_the_mean_image(
    builtin_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _load_script(SCRIPT.parent / "real_data.py")
    monkeypatch.setenv("DMDD_DATA", str(builtin_root.parent))
    out = tmp_path / "real"
    argv = ["--preset", "smoke", "--datasets", "builtin", "--categories", "brick", "--seeds", "0",
            "--teacher", "tf_efficientnet_lite0", "--out", str(out)]
    assert real.main(argv) == 0
    written = json.loads((out / "real_data.json").read_text())
    rows = {r["method"]: r for r in written["rows"]}
    assert set(rows) == {"DMDD", "PaDiM (training-free, same teacher)", "mean image"}
    record = json.loads((out / "builtin" / "results" / "brick__seed0.json").read_text())
    for who, method in (("dmdd", "DMDD"), ("padim", "PaDiM (training-free, same teacher)")):
        assert rows[method]["image_auroc"][0] == pytest.approx(100 * record["evaluation"][who]["image_auroc"])
    assert rows["DMDD"]["seconds"] == pytest.approx(record["train_seconds"])
    assert rows["PaDiM (training-free, same teacher)"]["seconds"] == pytest.approx(record["evaluation"]["padim_fit_seconds"])
    assert "ELPV poly never" in (out / "real_data.md").read_text()
    # A dataset with image labels only: its pixel metrics are absent from the table, not zero.
    image_only = {**record, "dataset": "elpv",
                  "evaluation": {**record["evaluation"], **{who: {"image_auroc": 0.7} for who in
                                                            ("dmdd", "padim", "naive_baseline")}}}
    (row, *_) = real.table_rows([image_only])
    assert row["image_auroc"] == (70.0, 0.0) and row["pixel_auroc"] is None and row["aupro"] is None
    # What limits DMDD: the raw maps' image AUROC beside the output's, over the seeds that scored them.
    assert record["evaluation"]["branch_image_auroc"].keys() == {"normality", "abnormality"}
    (diag,) = written["diagnosis"]
    assert diag["normality"][0][0] == pytest.approx(100 * record["evaluation"]["branch_image_auroc"]["normality"])
    assert diag["dmdd"][0][0] == pytest.approx(100 * record["evaluation"]["dmdd"]["image_auroc"])
    older = {**record, "seed": 1, "evaluation": {**record["evaluation"], "branch_image_auroc": {},
                                                 "dmdd": {"image_auroc": 0.1}}}
    (paired,) = real.diagnosis_rows([{**record, "dataset": "builtin"}, {**older, "dataset": "builtin"}])
    assert paired["seeds"] == [0] and paired["dmdd"][1] == 1  # the older seed is left out of every column
    (unscored,) = real.diagnosis_rows([{**older, "dataset": "builtin"}])
    assert unscored["dmdd"] == ((10.0, 0.0), 1) and unscored["normality"] is None
    # --report tabulates what is there without training; the header comes from the results.
    (out / "real_data.md").unlink()
    assert real.main(["--report", "--datasets", "builtin", "elpv", "--out", str(out)]) == 0
    text = (out / "real_data.md").read_text()
    assert "## What limits DMDD" in text and "- preset: smoke\n" in text and "- seeds: 0\n" in text
    changed = {**older, "config": {**record["config"], "synth_patch": 0.2}}
    assert real.settings_text([{**record, "config": changed["config"]}]) == "smoke, synth_patch=0.2"
    with pytest.raises(ValueError, match="synth_patch"):
        real.settings_text([record, changed])
    assert real.main(["--report", "--out", str(tmp_path / "empty")]) == 1
