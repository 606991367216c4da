"""The modules of DMDD: teacher (weights, normalisation, freezing), decoupled student, DeSTSeg equivalence."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.segmentation.deeplabv3 import ASPP

from dmdd_core.config import DMDDConfig
from dmdd_core.model import DMDD, DecoupledStudent, Teacher, build_teacher, segmentation_input
from dmdd_core.weights import TeacherWeightsUnavailable, load_classifier, map_by_order, timm_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_CHANNELS = {
    "resnet18": [64, 128, 256],
    "wide_resnet50_2": [256, 512, 1024],
    "tf_efficientnet_lite0": [24, 40, 112],
}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def teachers() -> dict[str, Teacher]:
    """resnet18 and wide_resnet50_2 randomly initialised (their weights need a download); lite0 pretrained."""
    return {
        "resnet18": Teacher("resnet18", pretrained=False),
        "wide_resnet50_2": Teacher("wide_resnet50_2", pretrained=False),
        "tf_efficientnet_lite0": Teacher("tf_efficientnet_lite0"),
    }


@pytest.fixture(scope="module")
def lite0_classifier() -> nn.Module:
    model, source = load_classifier("tf_efficientnet_lite0")
    assert "offline" in source
    return model


@pytest.fixture
def empty_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline, with an empty Hugging Face cache: no source has resnet18's ImageNet weights."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


# --- feature shapes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [128, 256])
@pytest.mark.parametrize("name", list(TEACHER_CHANNELS))
def test_feature_shapes_of_teacher_student_and_decoupled_branches(
    teachers: dict[str, Teacher], name: str, size: int
) -> None:
    teacher = teachers[name]
    assert teacher.channels == TEACHER_CHANNELS[name]
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        t_feats = teacher(teacher.normalize(x))
    expected = [(1, c, size // s, size // s) for c, s in zip(TEACHER_CHANNELS[name], (4, 8, 16))]
    assert [tuple(t.shape) for t in t_feats] == expected

    torch.manual_seed(0)
    student = DecoupledStudent(teacher.channels, DMDDConfig.preset("smoke", teacher_pretrained=False)).eval()
    with torch.no_grad():
        normality, abnormality = student(teacher.normalize(x))
    assert abnormality is not None
    assert [tuple(f.shape) for f in normality] == expected
    assert [tuple(f.shape) for f in abnormality] == expected
    assert not torch.equal(normality[0], abnormality[0])


def test_destseg_student_returns_one_branch_of_teacher_shapes(teachers: dict[str, Teacher]) -> None:
    teacher = teachers["resnet18"]
    student = DecoupledStudent(teacher.channels, DMDDConfig.preset("destseg")).eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        normality, abnormality = student(teacher.normalize(x))
        t_feats = teacher(teacher.normalize(x))
    assert abnormality is None
    assert [f.shape for f in normality] == [t.shape for t in t_feats]


def test_segmentation_input_is_minus_cosine_when_summed_over_channels() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(2, c, s, s) for c, s in ((8, 16), (12, 8), (16, 4))]
    branch = [torch.randn_like(t) for t in teacher]
    seg_in = segmentation_input(teacher, [branch, branch])
    assert seg_in.shape == (2, 2 * (8 + 12 + 16), 16, 16)
    level1 = seg_in[:, :8].sum(1)
    torch.testing.assert_close(level1, -F.cosine_similarity(teacher[0], branch[0], dim=1), atol=1e-5, rtol=1e-5)


# --- normalisation and pretrained weights -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TEACHER_CHANNELS))
def test_teacher_normalisation_is_the_pretrained_weights_own(teachers: dict[str, Teacher], name: str) -> None:
    cfg = timm.models.get_pretrained_cfg(timm_name(name))
    teacher = teachers[name]
    torch.testing.assert_close(teacher.mean.flatten(), torch.tensor(cfg.mean, dtype=torch.float32))
    torch.testing.assert_close(teacher.std.flatten(), torch.tensor(cfg.std, dtype=torch.float32))
    is_imagenet = torch.allclose(teacher.mean.flatten(), torch.tensor(IMAGENET_MEAN)) and torch.allclose(
        teacher.std.flatten(), torch.tensor(IMAGENET_STD)
    )
    if name == "tf_efficientnet_lite0":
        assert not is_imagenet
        torch.testing.assert_close(teacher.mean.flatten(), torch.full((3,), 0.5))
        torch.testing.assert_close(teacher.std.flatten(), torch.full((3,), 0.5))
    else:
        assert is_imagenet


def _classify(classifier: nn.Module, teacher: Teacher, image: np.ndarray) -> int:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return int(classifier(teacher.normalize(x)).argmax(1))


def test_offline_teacher_recognises_photographs(teachers: dict[str, Teacher], lite0_classifier: nn.Module) -> None:
    from skimage import data

    teacher = teachers["tf_efficientnet_lite0"]
    assert _classify(lite0_classifier, teacher, data.chelsea()) in range(281, 286)
    assert _classify(lite0_classifier, teacher, data.coffee()) == 967


def test_offline_teacher_backbone_holds_the_classifier_weights(
    teachers: dict[str, Teacher], lite0_classifier: nn.Module
) -> None:
    teacher = teachers["tf_efficientnet_lite0"]
    assert "offline" in teacher.source
    classifier_state = lite0_classifier.state_dict()
    backbone_state = teacher.backbone.state_dict()
    assert len(backbone_state) > 100
    for key, value in backbone_state.items():
        assert torch.equal(value, classifier_state[key]), key


# --- frozen teacher ---------------------------------------------------------------------------------------------
def test_teacher_is_frozen_and_stays_in_eval_mode() -> None:
    model = DMDD(DMDDConfig.preset("smoke", teacher_pretrained=False, teacher="resnet18"))
    model.train()
    assert model.student.training and model.segmentation.training
    assert not any(m.training for m in model.teacher.modules())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.student.parameters())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    out = model(torch.rand(2, 3, 64, 64))
    out.seg_logits.sum().backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- where the weights come from ----------------------------------------------------------------------------------
@pytest.mark.usefixtures("empty_hub_cache")
def test_resnet18_offline_without_weights_raises_with_instructions() -> None:
    started = time.perf_counter()
    with pytest.raises(TeacherWeightsUnavailable) as info:
        build_teacher(DMDDConfig.preset("smoke", teacher="resnet18"))
    assert time.perf_counter() - started < 10
    message = str(info.value)
    assert "--teacher-weights" in message
    assert "tf_efficientnet_lite0" in message


@pytest.mark.usefixtures("empty_hub_cache")
def test_auto_teacher_offline_falls_back_to_lite0_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="tf_efficientnet_lite0"):
        teacher = build_teacher(DMDDConfig.preset("smoke", teacher="auto"))
    assert teacher.name == "tf_efficientnet_lite0"
    assert teacher.channels == TEACHER_CHANNELS["tf_efficientnet_lite0"]


@pytest.mark.usefixtures("empty_hub_cache")
def test_explicit_weight_file_is_loaded(tmp_path: Path) -> None:
    torch.manual_seed(123)
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18_weights.pth"
    torch.save(reference.state_dict(), path)
    saved = torch.load(path, weights_only=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher = build_teacher(DMDDConfig.preset("smoke", teacher="resnet18", teacher_weights=str(path)))
    assert teacher.name == "resnet18"
    assert str(path) in teacher.source
    backbone_state = teacher.backbone.state_dict()
    assert {"conv1.weight", "layer3.1.bn2.running_var"} <= set(backbone_state)
    for key, value in backbone_state.items():
        assert torch.equal(value, saved[key]), key

    auto = build_teacher(DMDDConfig.preset("smoke", teacher="auto", teacher_weights=str(path)))
    assert auto.name == "resnet18"
    assert torch.equal(auto.backbone.state_dict()["conv1.weight"], saved["conv1.weight"])


@pytest.mark.usefixtures("empty_hub_cache")
def test_missing_weight_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(TeacherWeightsUnavailable, match="nowhere.pth"):
        Teacher("resnet18", weights=str(missing))


def test_map_by_order_renames_matching_tensors_and_rejects_mismatches() -> None:
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    source = {f"foreign.{i}": v.clone() + 1 for i, v in enumerate(target.state_dict().values())}
    mapped = map_by_order(source, target)
    assert list(mapped) == list(target.state_dict())
    for (key, value), src in zip(mapped.items(), source.values()):
        assert value is src, key

    wrong_shape = dict(source)
    wrong_shape["foreign.0"] = torch.randn(4, 3, 5, 5)
    with pytest.raises(ValueError, match=r"foreign\.0"):
        map_by_order(wrong_shape, target)

    too_few = dict(list(source.items())[:-1])
    with pytest.raises(ValueError, match="tensors"):
        map_by_order(too_few, target)


# --- DeSTSeg equivalence ------------------------------------------------------------------------------------------
def _reference_stage(in_ch: int, out_ch: int) -> nn.Sequential:
    shortcut = None
    if in_ch != out_ch:
        shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False), nn.BatchNorm2d(out_ch))
    return nn.Sequential(BasicBlock(in_ch, out_ch, downsample=shortcut), BasicBlock(out_ch, out_ch))


def destseg_reference() -> tuple[nn.Module, nn.Module]:
    """DeSTSeg's student and segmentation network for a resnet18 teacher, built from their description."""
    encoder = timm.create_model("resnet18", pretrained=False, features_only=True)
    decoder = nn.ModuleList(_reference_stage(a, b) for a, b in ((512, 512), (512, 256), (256, 128), (128, 64)))
    student = nn.ModuleList([encoder, decoder])
    segmentation = nn.Sequential(
        _reference_stage(64 + 128 + 256, 256),
        ASPP(256, [6, 12, 18], 256),
        nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(256),
        nn.ReLU(),
        nn.Conv2d(256, 1, kernel_size=1),
    )
    return student, segmentation


@pytest.fixture(scope="module")
def resnet18_teacher(teachers: dict[str, Teacher]) -> Teacher:
    return teachers["resnet18"]


def test_all_switches_off_is_destseg(resnet18_teacher: Teacher) -> None:
    ref_student, ref_seg = destseg_reference()
    for cfg in (
        DMDDConfig.preset("destseg", teacher_pretrained=False),
        DMDDConfig.preset("smoke", decouple=False, aim=False, msn=False, seg_channels=256, teacher_pretrained=False),
    ):
        model = DMDD(cfg, teacher=resnet18_teacher)
        assert count(model.student) == count(ref_student)
        assert count(model.segmentation) == count(ref_seg)
        assert model.student.decouple_heads is None
    out = DMDD(DMDDConfig.preset("destseg", image_size=64, teacher_pretrained=False), teacher=resnet18_teacher).eval()(
        torch.rand(1, 3, 64, 64)
    )
    assert out.abnormality_discrepancy is None
    assert out.seg_logits.shape == (1, 1, 16, 16)


def test_dmdd_adds_exactly_the_decouple_heads(resnet18_teacher: Teacher) -> None:
    ref_student, ref_seg = destseg_reference()
    mult = 2
    heads = sum(c * mult * c + 2 * mult * c + mult * c * 2 * c + 2 * c for c in (64, 128, 256))

    decoupled = DMDD(
        DMDDConfig.preset("paper", aim=False, msn=False, decouple_hidden_mult=mult, teacher_pretrained=False),
        teacher=resnet18_teacher,
    )
    assert count(decoupled.student) == count(ref_student) + heads
    assert decoupled.student.decouple_heads is not None
    assert count(decoupled.student.decouple_heads) == heads
    assert count(decoupled.segmentation) == count(ref_seg)

    full = DMDD(DMDDConfig.preset("paper", teacher_pretrained=False), teacher=resnet18_teacher)
    assert count(full.student) == count(ref_student) + heads
    assert count(full.segmentation) > count(ref_seg)
    assert count(full) - count(full.teacher) > count(ref_student) + count(ref_seg)


def test_config_rejects_switch_combinations_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="decouple"):
        DMDDConfig.preset("paper", aim=True, decouple=False, msn=False)
    with pytest.raises(ValueError, match="decouple"):
        DMDDConfig.preset("paper", aim=False, decouple=False, msn=True)
    with pytest.raises(ValueError, match="image_size"):
        DMDDConfig.preset("smoke", image_size=100)
    with pytest.raises(ValueError, match="unknown preset"):
        DMDDConfig.preset("nonexistent")


def test_a_state_dict_from_before_the_plain_student_was_renamed_still_loads() -> None:
    cfg = DMDDConfig.preset("smoke", teacher="tf_efficientnet_lite0", teacher_pretrained=False)
    torch.manual_seed(0)
    saved = DMDD(cfg).state_dict()
    old = {k.replace("student.plain.", "student.student.", 1): v for k, v in saved.items()}
    assert any(k.startswith("student.student.encoder") for k in old)
    torch.manual_seed(1)
    model = DMDD(cfg)
    model.load_state_dict(old)  # strict: no key missing, none unexpected
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.values()))


def test_the_segmentation_tail_builds_its_modules_in_network_order() -> None:
    """A seed gives the weights of the network written out module by module: ASPP first, then the middle
    (spatial attention), then the 3x3 conv, so runs started before the tail was shared start the same."""
    from dmdd_core.model import SpatialAttention, segmentation_tail

    torch.manual_seed(0)
    tail = segmentation_tail(32, (2, 4, 6), SpatialAttention)
    torch.manual_seed(0)
    written_out = [ASPP(32, [2, 4, 6], 32), SpatialAttention(), nn.Conv2d(32, 32, 3, padding=1, bias=False)]
    for built, expected in zip(tail, written_out):
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), expected.state_dict().values()))
