"""The lab preset (one T4, minutes per category), the notebooks' choice of preset on a GPU, and the estimate they
print before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dmdd_core.estimate as estimate
from dmdd_core.config import DMDDConfig, gpu_preset, tutorial_config

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LAB_CHANGES = {"batch_size", "seg_channels", "stage2_steps", "checkpoint_every"}  # 1000 stage-1 steps, as the paper


def test_lab_preset_keeps_every_component_at_the_papers_input_size() -> None:
    paper, lab = DMDDConfig.preset("paper").to_dict(), DMDDConfig.preset("lab").to_dict()
    assert {k for k in paper if paper[k] != lab[k]} - {"preset_name"} == LAB_CHANGES
    assert lab["image_size"] == 256 and lab["decouple"] and lab["aim"] and lab["msn"] and lab["amp"] == "auto"
    assert lab["stage2_steps"] < paper["stage2_steps"] and lab["batch_size"] < paper["batch_size"]


def test_notebooks_train_lab_on_a_gpu_and_paper_behind_one_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMDD_FAST", raising=False)
    monkeypatch.delenv("DMDD_PAPER", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_preset() == "lab" and tutorial_config().preset_name == "lab"
    monkeypatch.setenv("DMDD_PAPER", "1")
    assert gpu_preset() == "paper" and tutorial_config().preset_name == "paper"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tutorial_config().preset_name == "fast"


def test_train_minutes_by_hand_and_the_assumed_throughput_of_a_gpu() -> None:
    cfg = DMDDConfig.preset("lab")
    flops = {"stage1": 0.5e12, "stage2": 1.0e12, "inference_per_image": 1e10}
    # per step: 5 ms synthesis + 15 ms overhead + operations at 10 TFLOPS (50 and 100 ms)
    expected = (1000 * (0.020 + 0.050) + 2000 * (0.020 + 0.100)) / 60
    assert estimate.train_minutes(cfg, flops, 10.0) == pytest.approx(expected)
    assert estimate.assumed_tflops("Tesla T4") == ("T4", 8.0)
    assert estimate.assumed_tflops("NVIDIA A100-SXM4-40GB") == ("A100", 40.0)
    assert estimate.assumed_tflops("Some Future GPU") == ("T4", 8.0)  # unknown: planned like the smallest


def test_the_plan_names_device_precision_setting_and_time(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DMDDConfig.preset("lab", device="cpu")
    on_cpu = estimate.describe_plan(cfg)
    assert on_cpu.startswith("device: CPU") and "precision fp32" in on_cpu and "lab preset: 256², 1000 + 2000" in on_cpu
    # a T4, faked: fp16 (no bf16 arithmetic below compute capability 8.0) and the counted operations' time
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    counted = {"stage1": 0.65e12, "stage2": 1.13e12, "inference_per_image": 3e10}
    monkeypatch.setattr(estimate, "step_flops", lambda cfg, batch=1, device="cpu": counted)
    on_t4 = estimate.describe_plan(cfg.replace(device="cuda"))
    minutes = estimate.train_minutes(cfg, counted, 8.0)
    assert "Tesla T4 (compute capability 7.5), precision fp16" in on_t4
    assert f"about {minutes:.0f} min" in on_t4 and "8 TFLOPS" in on_t4 and 5 < minutes < 10


@pytest.mark.parametrize("name", ["00_quickstart", "04_dual_modeling_distillation", "05_multi_perception_segmentation",
                                  "07_ablations", "08_benchmark_reproduction"])
def test_notebooks_that_train_ask_colab_for_a_gpu_and_print_the_plan(name: str) -> None:
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    assert nb["metadata"]["accelerator"] == "GPU" and nb["metadata"]["colab"]["gpuType"] == "T4"
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "describe_plan(" in code


def test_operations_are_counted_for_real_at_the_default_batch() -> None:
    """The count describe_plan makes on a GPU, here on the CPU: train-mode BatchNorm after the segmentation
    network's pooled branch needs a batch of at least two."""
    cfg = DMDDConfig.preset("smoke", teacher="tf_efficientnet_lite0", teacher_pretrained=False)
    counted = estimate.step_flops(cfg)
    assert counted["stage1"] > 0 and counted["stage2"] > 0 and counted["inference_per_image"] > 0
