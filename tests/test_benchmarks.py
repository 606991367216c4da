"""The speed benchmark runs end to end on the smoke preset and writes positive throughputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
    argv = "--images 6 --source-size 96 --size 64 --pairs 8 --workers 1 --batch-size 4"
    figure = tmp_path / "data.png"
    report = bench.main([*argv.split(), "--speed-json", str(speed_json), "--json", str(out), "--figure", str(figure)])
    assert figure.stat().st_size > 10_000
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["num_images"] == 6 and report["first_image_size"] == [96, 96] and report["input_size"] == 64
    rates_measured = {k: v for k, v in report["data"].items() if k.endswith("_img_s")}
    assert set(rates_measured) >= {"decode_warm_img_s", "decode_1_thread_img_s", "pairs_decoding_each_img_s",
                                   "pairs_cached_img_s", "pairs_cached_1_workers_img_s"}
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
