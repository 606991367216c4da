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
    args = argparse.Namespace(tflops=(10.0, 100.0), workers=4, step_overhead=15.0, seeds=3)
    flops = {"stage1": 1e12, "stage2": 2e12, "inference_per_image": 1e10}
    result = est.estimate(flops, 100.0, args, cfg)
    slow, fast = result["slow GPU"], result["fast GPU"]
    assert slow["data_ms_per_step"] == pytest.approx(80.0)  # 32 pairs / (100 pairs/s x 4 workers)
    assert (slow["stage1_step_ms"], slow["stage2_step_ms"]) == pytest.approx((115.0, 215.0))  # compute-bound
    assert (fast["stage1_step_ms"], fast["stage2_step_ms"]) == pytest.approx((95.0, 95.0))  # data-bound: 80 ms
    assert slow["train_minutes_per_task"] == pytest.approx((1000 * 0.115 + 4000 * 0.215) / 60)
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
