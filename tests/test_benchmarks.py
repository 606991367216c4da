"""The speed benchmark runs end to end on the smoke preset and writes positive throughputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def _load_speed():
    spec = importlib.util.spec_from_file_location("dmdd_benchmark_speed", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
