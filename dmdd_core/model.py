"""DMDD, every module of the method in reading order.

    image x in [0, 1] ──► Teacher (frozen, pretrained) ──────────────► T^1, T^2, T^3      (strides 4, 8, 16)
                     └──► Student: encoder ─► decoder ─► S^1, S^2, S^3
                                   DecoupleHeads ─► normality F_n^l, abnormality F_a^l      [paper]
    seg input = concat_l  -(T̂^l ⊙ F̂_n^l), -(T̂^l ⊙ F̂_a^l)   (hat: L2-normalised over channels)
              ─► MultiPerceptionSegNet ─► anomaly logits at stride 4 ─► sigmoid, upsample ─► anomaly map

Provenance tags follow the method card: [paper] DMDD (ACM MM 2024), [DeSTSeg] (CVPR 2023), [ours].
Shapes are given for a ResNet18 teacher at 256^2 input; B is the batch size.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.segmentation.deeplabv3 import ASPP

from .config import DMDDConfig
from .weights import OFFLINE_TEACHER, TeacherWeightsUnavailable, architecture, load_classifier

#: The three teacher levels, as strides relative to the input. [DeSTSeg: ResNet layer1..layer3]
LEVEL_STRIDES = (4, 8, 16)


# ---------------------------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------------------------
class Teacher(nn.Module):
    """A frozen ImageNet backbone from timm giving features at strides 4, 8, 16. [DeSTSeg]

    resnet18 at 256^2: 64@64^2, 128@32^2, 256@16^2. The input is in [0, 1]; the teacher normalises it with its
    own pretrained mean and std (ImageNet's for ResNets, 0.5/0.5 for EfficientNet-Lite). It is always in eval
    mode: its BatchNorm statistics are ImageNet's and must never adapt to the training images.
    """

    def __init__(self, name: str, weights: str | None = None, pretrained: bool = True) -> None:
        super().__init__()
        arch = architecture(name)
        probe = timm.create_model(arch, pretrained=False, features_only=True)
        reductions = list(probe.feature_info.reduction())  # type: ignore[union-attr,operator]
        missing = [s for s in LEVEL_STRIDES if s not in reductions]
        if missing:
            raise ValueError(f"teacher {name!r} has no feature level at stride(s) {missing}; it has {reductions}")
        out_indices = tuple(reductions.index(s) for s in LEVEL_STRIDES)
        self.backbone = timm.create_model(arch, pretrained=False, features_only=True, out_indices=out_indices)
        self.name = name
        self.source = "random initialisation (test only)"
        if pretrained:
            classifier, self.source = load_classifier(name, weights)
            state = classifier.state_dict()
            missing_keys = [k for k in self.backbone.state_dict() if k not in state]
            if missing_keys:
                raise TeacherWeightsUnavailable(f"weights for {name!r} lack {missing_keys[:5]}")
            self.backbone.load_state_dict({k: state[k] for k in self.backbone.state_dict()})
        cfg = timm.models.get_pretrained_cfg(arch)
        mean = cfg.mean if cfg is not None else (0.485, 0.456, 0.406)
        std = cfg.std if cfg is not None else (0.229, 0.224, 0.225)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.channels: list[int] = list(self.backbone.feature_info.channels())  # type: ignore[union-attr,operator]
        self.mean: Tensor
        self.std: Tensor
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """Stays in eval mode whatever is asked: the teacher never adapts."""
        return super().train(False)

    def normalize(self, x: Tensor) -> Tensor:
        """(B,3,H,W) in [0,1] -> the teacher's input normalisation (also used for the student)."""
        return (x - self.mean) / self.std

    def forward(self, x_normalized: Tensor) -> list[Tensor]:
        """(B,3,H,W) normalised -> [T^1 (B,C1,H/4,W/4), T^2 (B,C2,H/8,W/8), T^3 (B,C3,H/16,W/16)]."""
        return list(self.backbone(x_normalized))


def build_teacher(cfg: DMDDConfig) -> Teacher:
    """The teacher named by the config; ``auto`` tries resnet18, then the offline teacher, and says which."""
    if not cfg.teacher_pretrained:
        name = "resnet18" if cfg.teacher == "auto" else cfg.teacher
        return Teacher(name, pretrained=False)
    if cfg.teacher != "auto":
        return Teacher(cfg.teacher, weights=cfg.teacher_weights)
    try:
        return Teacher("resnet18", weights=cfg.teacher_weights)
    except TeacherWeightsUnavailable as err:
        if cfg.teacher_weights is not None:
            raise
        warnings.warn(
            f"teacher='auto': resnet18 ImageNet weights are not available here ({str(err).splitlines()[-1]}); "
            f"using the offline teacher {OFFLINE_TEACHER}. Pass --teacher resnet18 online for the paper's setting.",
            stacklevel=2,
        )
        return Teacher(OFFLINE_TEACHER)


# ---------------------------------------------------------------------------------------------------------------
# Student
# ---------------------------------------------------------------------------------------------------------------
def residual_stage(in_channels: int, out_channels: int, blocks: int = 2) -> nn.Sequential:
    """``blocks`` torchvision BasicBlocks, the first with a 1x1 conv + BN shortcut when the width changes."""
    shortcut = None
    if in_channels != out_channels:
        shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
    layers = [BasicBlock(in_channels, out_channels, downsample=shortcut)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Student(nn.Module):
    """Randomly initialised ResNet encoder, then a decoder back to the teacher's three levels. [DeSTSeg]

    The encoder's last stage (512@8^2 at 256^2) is decoded by four stages of two BasicBlocks, each preceded by
    bilinear upsampling to the next teacher level; the encoder's skip features are not used, so the student
    must rebuild normal features from a compressed code (which is what fails on anomalies).
    """

    def __init__(self, teacher_channels: list[int], encoder: str = "resnet18", pretrained: bool = False) -> None:
        super().__init__()
        self.encoder = timm.create_model(architecture(encoder), pretrained=False, features_only=True)
        if pretrained:  # [ours] the encoder starts from ImageNet weights, the decoder stays random
            state = load_classifier(encoder)[0].state_dict()
            self.encoder.load_state_dict({k: state[k] for k in self.encoder.state_dict()})
        bottleneck = self.encoder.feature_info.channels()[-1]  # type: ignore[union-attr,operator]
        c1, c2, c3 = teacher_channels
        self.decoder4 = residual_stage(bottleneck, bottleneck)
        self.decoder3 = residual_stage(bottleneck, c3)
        self.decoder2 = residual_stage(c3, c2)
        self.decoder1 = residual_stage(c2, c1)

    def forward(self, x_normalized: Tensor) -> list[Tensor]:
        """(B,3,H,W) -> [S^1 (B,C1,H/4,W/4), S^2 (B,C2,H/8,W/8), S^3 (B,C3,H/16,W/16)]."""
        code = self.encoder(x_normalized)[-1]  # (B,512,H/32,W/32)
        h, w = x_normalized.shape[-2:]

        def up(t: Tensor, stride: int) -> Tensor:
            return F.interpolate(t, size=(h // stride, w // stride), mode="bilinear", align_corners=False)

        s3 = self.decoder3(up(self.decoder4(code), 16))  # (B,C3,H/16,W/16)
        s2 = self.decoder2(up(s3, 8))  # (B,C2,H/8,W/8)
        s1 = self.decoder1(up(s2, 4))  # (B,C1,H/4,W/4)
        return [s1, s2, s3]


class DecoupleHead(nn.Module):
    """Split one student level into normality and abnormality features of equal capacity. [paper + ours]

    [paper]: the student's features are decoupled into normality and abnormality features.
    [ours]: 1x1 conv C -> mult*C, BN, ReLU, 1x1 conv -> 2C, then the two halves: (B,C,h,w) each.
    """

    def __init__(self, channels: int, hidden_mult: int = 2) -> None:
        super().__init__()
        hidden = hidden_mult * channels
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2 * channels, 1),
        )

    def forward(self, s: Tensor) -> tuple[Tensor, Tensor]:
        normality, abnormality = self.net(s).chunk(2, dim=1)  # (B,2C,h,w) -> 2 x (B,C,h,w)
        return normality, abnormality


class DecoupledStudent(nn.Module):
    """The plain student plus one DecoupleHead per level. [paper]

    With ``decouple`` it returns the normality features F_n^l and the abnormality features F_a^l. With
    ``decouple=False`` it is DeSTSeg's student: there is no split, its features S^l take the normality
    branch's place (NGM is then DeSTSeg's denoising loss) and the abnormality features are None."""

    def __init__(self, teacher_channels: list[int], cfg: DMDDConfig) -> None:
        super().__init__()
        self.plain = Student(teacher_channels, cfg.student, cfg.student_pretrained)
        self.decouple_heads = (
            nn.ModuleList(DecoupleHead(c, cfg.decouple_hidden_mult) for c in teacher_channels)
            if cfg.decouple
            else None
        )

    def forward(self, x_normalized: Tensor) -> tuple[list[Tensor], list[Tensor] | None]:
        """-> ([F_n^1, F_n^2, F_n^3], [F_a^1, F_a^2, F_a^3]) with decoupling; ([S^1, S^2, S^3], None) without."""
        features = self.plain(x_normalized)
        if self.decouple_heads is None:
            return features, None
        pairs = [head(f) for head, f in zip(self.decouple_heads, features)]
        return [n for n, _ in pairs], [a for _, a in pairs]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Checkpoints written before the plain student was named ``plain`` called it ``student``.
        for key in [k for k in state_dict if k.startswith(prefix + "student.")]:
            state_dict[prefix + "plain." + key[len(prefix + "student."):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)


# ---------------------------------------------------------------------------------------------------------------
# Segmentation networks
# ---------------------------------------------------------------------------------------------------------------
def segmentation_input(teacher: list[Tensor], branches: list[list[Tensor]]) -> Tensor:
    """concat over branches and levels of -(T̂^l ⊙ F̂^l), upsampled to level 1. [DeSTSeg, both branches: ours]

    Each term is the per-channel contribution to minus the cosine similarity: summed over channels it is
    -cos(T, F). resnet18, two branches: (B, 2*(64+128+256)=896, H/4, W/4).
    """
    size = teacher[0].shape[-2:]
    parts = []
    for branch in branches:
        for t, f in zip(teacher, branch):
            product = -(F.normalize(t, dim=1) * F.normalize(f, dim=1))
            parts.append(F.interpolate(product, size=size, mode="bilinear", align_corners=False))
    return torch.cat(parts, dim=1)


def segmentation_tail(channels: int, rates: tuple[int, ...], *middle: type[nn.Module]) -> nn.Sequential:
    """ASPP (rates + pooling), then the ``middle`` modules (spatial attention in the multi-perception network),
    then 3x3 conv-BN-ReLU and a 1x1 conv to one logit: the part both segmentation networks share. [DeSTSeg]
    The modules are built in their order in the network, so a seed gives the same weights as writing it out."""
    aspp = ASPP(channels, list(rates), channels)
    return nn.Sequential(
        aspp,
        *(module() for module in middle),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, 1, 1),
    )


class DeSTSegHead(nn.Module):
    """DeSTSeg's segmentation network: 2 residual blocks to 256 ch, ASPP (6, 12, 18 + pooling), 3x3 conv-BN-ReLU,
    1x1 conv to one logit. [DeSTSeg] ``body`` and ``head`` have separate learning rates."""

    def __init__(self, in_channels: int, channels: int = 256, rates: tuple[int, ...] = (6, 12, 18)) -> None:
        super().__init__()
        self.body = residual_stage(in_channels, channels)
        self.head = segmentation_tail(channels, rates)

    def forward(self, x: Tensor) -> Tensor:
        """(B,Cin,h,w) -> logits (B,1,h,w)."""
        return self.head(self.body(x))


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation over channels from average- and max-pooled descriptors (CBAM style). [ours]"""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))  # (B,C,1,1)
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """A 7x7 conv over the channel mean and max gives a per-pixel weight (CBAM style). [ours]"""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        descriptor = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)  # (B,2,h,w)
        return x * torch.sigmoid(self.conv(descriptor))


class MultiPerceptionSegNet(nn.Module):
    """Multi-perception segmentation network: fuses both branches' discrepancies with attention. [paper + ours]

    [paper]: trained on the synthetic masks, fuses the anomaly information of the normality and abnormality
    branches with multiple attention; its output is the anomaly map.
    [ours]: channel attention on the 2x(sum C) input -> DeSTSeg's residual body -> ASPP (multi receptive field)
    -> spatial attention -> 3x3 conv-BN-ReLU -> 1x1 conv to one logit.
    """

    def __init__(self, in_channels: int, channels: int = 256, rates: tuple[int, ...] = (6, 12, 18)) -> None:
        super().__init__()
        self.body = nn.Sequential(ChannelAttention(in_channels), residual_stage(in_channels, channels))
        self.head = segmentation_tail(channels, rates, SpatialAttention)

    def forward(self, x: Tensor) -> Tensor:
        """(B,2*sum C,h,w) -> logits (B,1,h,w)."""
        return self.head(self.body(x))


# ---------------------------------------------------------------------------------------------------------------
# The composed model
# ---------------------------------------------------------------------------------------------------------------
class DMDDOutput(NamedTuple):
    """What :meth:`DMDD.forward` returns for a batch of B images of H x W."""

    anomaly_map: Tensor
    """(B,1,H,W) in [0,1]: the segmentation output upsampled to the input. [DeSTSeg]"""
    score: Tensor
    """(B,) image score: mean of the top-k pixels of the anomaly map. [DeSTSeg]"""
    seg_logits: Tensor
    """(B,1,H/4,W/4) segmentation logits."""
    normality_discrepancy: Tensor
    """(B,1,H,W) mean over levels of 1 - cos(T^l, F_n^l): what the normality branch finds (without decoupling,
    the plain student's discrepancy, 1 - cos(T^l, S^l): DeSTSeg's map)."""
    abnormality_discrepancy: Tensor | None
    """(B,1,H,W) mean over levels of 1 - cos(T^l, F_a^l); None without decoupling."""


def discrepancy_map(teacher: list[Tensor], features: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Mean over levels of 1 - cos(T^l, F^l), each upsampled to ``size``: (B,1,*size)."""
    maps = [
        F.interpolate((1 - F.cosine_similarity(t, f, dim=1)).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        for t, f in zip(teacher, features)
    ]
    return torch.stack(maps).mean(0)


def anomaly_map_from_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Segmentation logits (B,1,h,w) -> anomaly map (B,1,*size) in [0,1]: sigmoid, then bilinear upsampling."""
    return F.interpolate(torch.sigmoid(logits.float()), size=size, mode="bilinear", align_corners=False)


def top_k_score(anomaly_map: Tensor, k: int) -> Tensor:
    """(B,1,H,W) -> (B,) mean of the k largest pixels of each map. [DeSTSeg: k=100 at 256^2]"""
    flat = anomaly_map.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1)


class DMDD(nn.Module):
    """Teacher, decoupled student and segmentation network. With ``decouple``, ``aim`` and ``msn`` off it is
    DeSTSeg. Inputs are images in [0, 1]; normalisation is the teacher's own."""

    training_precision: str = "unrecorded"
    """The precision its weights were trained in ("fp32", "bf16", "fp16"), set by training and checkpoints."""

    def __init__(self, cfg: DMDDConfig, teacher: Teacher | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher = teacher if teacher is not None else build_teacher(cfg)
        channels = self.teacher.channels
        self.student = DecoupledStudent(channels, cfg)
        self.segmentation: MultiPerceptionSegNet | DeSTSegHead
        if cfg.msn:
            branches = 2 if cfg.seg_branches == "both" else 1
            self.segmentation = MultiPerceptionSegNet(branches * sum(channels), cfg.seg_channels, cfg.aspp_rates)
        else:
            self.segmentation = DeSTSegHead(sum(channels), cfg.seg_channels, cfg.aspp_rates)

    def teacher_features(self, x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return self.teacher(self.teacher.normalize(x))

    def student_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor] | None]:
        return self.student(self.teacher.normalize(x))

    def segment(
        self, teacher: list[Tensor], normality: list[Tensor], abnormality: list[Tensor] | None
    ) -> Tensor:
        """Segmentation logits (B,1,H/4,W/4) from the teacher and student features."""
        both = self.cfg.msn and self.cfg.seg_branches == "both"
        branches = [normality] if abnormality is None or not both else [normality, abnormality]
        return self.segmentation(segmentation_input(teacher, branches))

    def forward(self, x: Tensor) -> DMDDOutput:
        """(B,3,H,W) in [0,1] -> :class:`DMDDOutput`."""
        size = (x.shape[-2], x.shape[-1])
        teacher = self.teacher_features(x)
        normality, abnormality = self.student_features(x)
        logits = self.segment(teacher, normality, abnormality)
        anomaly_map = anomaly_map_from_logits(logits, size)
        return DMDDOutput(
            anomaly_map=anomaly_map,
            score=top_k_score(anomaly_map, self.top_k(size)),
            seg_logits=logits,
            normality_discrepancy=discrepancy_map(teacher, normality, size),
            abnormality_discrepancy=None if abnormality is None else discrepancy_map(teacher, abnormality, size),
        )

    def top_k(self, size: tuple[int, int]) -> int:
        """How many pixels the image score averages at input ``size``: ``cfg.top_k`` at 256^2, in proportion to
        the area otherwise."""
        return max(1, round(self.cfg.top_k * size[0] * size[1] / 256**2))

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups: ``student`` (encoder, decoder, decouple heads), ``seg_body``, ``seg_head``."""
        return {
            "student": list(self.student.parameters()),
            "seg_body": list(self.segmentation.body.parameters()),
            "seg_head": list(self.segmentation.head.parameters()),
        }
