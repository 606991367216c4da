"""The CPU setting: what the cpu preset changes from the paper's, the command line's choice of preset, and the
student that starts from ImageNet weights."""

from __future__ import annotations

import pytest
import torch

from dmdd_core.cli import _config, build_parser
from dmdd_core.config import PRESETS, DMDDConfig
from dmdd_core.model import DMDD, Teacher

CPU_CHANGES = {"stage1_steps", "stage2_steps", "batch_size", "seg_channels", "checkpoint_every", "student",
               "student_pretrained"}
"""The only fields the cpu preset changes: budget, width and the student's start, never a component of the method."""


def test_cpu_preset_keeps_every_component_at_the_papers_input_size() -> None:
    paper, cpu = DMDDConfig.preset("paper").to_dict(), DMDDConfig.preset("cpu").to_dict()
    changed = {k for k in paper if paper[k] != cpu[k]} - {"preset_name"}
    assert changed == CPU_CHANGES
    assert cpu["image_size"] == 256 and cpu["decouple"] and cpu["aim"] and cpu["msn"]
    assert cpu["synth_texture"] == 1.0 and cpu["student_pretrained"]


def test_the_paper_preset_is_still_the_method_card() -> None:
    assert PRESETS["paper"] == {}
    paper = DMDDConfig.preset("paper")
    assert (paper.synth_texture, paper.synth_patch, paper.synth_stroke, paper.synth_brightness) == (1.0, 0, 0, 0)
    assert not paper.student_pretrained and paper.student == "resnet18" and paper.seg_channels == 256


def test_cli_chooses_the_cpu_preset_without_a_gpu_and_paper_with_one(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for command in ("train", "benchmark", "ablate"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert _config(parser.parse_args([command])).preset_name == "cpu"
        assert "preset: cpu (no GPU found or chosen" in capsys.readouterr().err
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert _config(parser.parse_args([command])).preset_name == "paper"
        assert _config(parser.parse_args([command, "--device", "cpu"])).preset_name == "cpu"
    assert _config(parser.parse_args(["quickstart"])).preset_name == "fast"  # a first look stays short
    assert _config(parser.parse_args(["train", "--preset", "fast"])).preset_name == "fast"


def test_a_pretrained_student_encoder_starts_from_the_teachers_weights() -> None:
    teacher = Teacher("tf_efficientnet_lite0")
    cfg = DMDDConfig.preset("smoke", teacher="tf_efficientnet_lite0", student="tf_efficientnet_lite0")
    pretrained = DMDD(cfg.replace(student_pretrained=True), teacher).student.plain
    random = DMDD(cfg, teacher).student.plain
    classifier = teacher.backbone.state_dict()
    encoder = pretrained.encoder.state_dict()
    shared = [k for k in classifier if k in encoder]
    assert len(shared) > 50
    assert all(torch.equal(encoder[k], classifier[k]) for k in shared)
    assert not torch.equal(random.encoder.state_dict()["conv_stem.weight"], classifier["conv_stem.weight"])


def test_a_pretrained_students_checkpoint_loads_without_its_weight_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import dmdd_core.model as model_module
    from dmdd_core.train import model_from_state
    from dmdd_core.weights import TeacherWeightsUnavailable

    teacher = Teacher("tf_efficientnet_lite0")
    cfg = DMDDConfig.preset("smoke", teacher="tf_efficientnet_lite0", student="tf_efficientnet_lite0",
                            student_pretrained=True)
    model = DMDD(cfg, teacher)
    state = {"teacher": {"name": teacher.name, "source": teacher.source}, "config": cfg.to_dict(),
             "model": model.state_dict()}

    def unavailable(*args: object, **kwargs: object) -> None:
        raise TeacherWeightsUnavailable("offline")

    monkeypatch.setattr(model_module, "load_classifier", unavailable)
    loaded = model_from_state(state)
    assert loaded.cfg.student_pretrained  # the run's config, as trained
    saved = model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
