"""The losses of DMDD: the two distillation losses (NGM, AIM) and the segmentation losses (focal, L1).

Features are compared by per-pixel cosine similarity over channels, i.e. after L2 normalisation. Following
DeSTSeg, distillation losses are summed over the batch and averaged over pixels (the learning rate 0.4 of the
paper preset assumes that scale). [DeSTSeg]
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss


def cosine_map(a: Tensor, b: Tensor) -> Tensor:
    """(B,C,h,w) x (B,C,h,w) -> (B,h,w) per-pixel cosine similarity over channels."""
    return F.cosine_similarity(a, b, dim=1)


def mask_at(mask: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """(B,1,H,W) binary mask -> (B,h,w) binary mask at a feature level: bilinear resize, threshold 0.5. [ours]"""
    resized = F.interpolate(mask.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return (resized[:, 0] > 0.5).float()


def _masked_mean(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample mean of (B,h,w) values over pixels where weights are 1, and whether any pixel counted: (B,)."""
    count = weights.flatten(1).sum(1)
    total = (values * weights).flatten(1).sum(1)
    return total / count.clamp_min(1), count > 0


def ngm_loss(
    normality: list[Tensor],
    teacher_normal: list[Tensor],
    mask: Tensor | None = None,
    region: Literal["all", "normal"] = "all",
) -> Tensor:
    """Normality Guidance Modeling. [paper]

    [paper]: fit the normality features of the *anomalous* image to the teacher's features of the
    *corresponding normal* image, by cosine distance.
    [ours, = DeSTSeg's denoising loss]: L_NGM = sum_l sum_b mean_pixels (1 - cos(F_n^l(I_aug), T^l(I_orig))).
    ``region="normal"`` averages over pixels outside the anomaly mask instead (needs ``mask``).
    """
    total = normality[0].new_zeros(())
    for f, t in zip(normality, teacher_normal):
        distance = 1 - cosine_map(f, t)  # (B,h,w)
        if region == "all":
            total = total + distance.flatten(1).mean(1).sum()
        else:
            if mask is None:
                raise ValueError("ngm_loss(region='normal') needs the anomaly mask")
            mean, _ = _masked_mean(distance, 1 - mask_at(mask, distance.shape[-2:]))
            total = total + mean.sum()
    return total


def aim_loss(
    abnormality: list[Tensor],
    teacher: list[Tensor],
    mask: Tensor,
    margin: float = 0.0,
    normal_term: bool = True,
) -> Tensor:
    """Abnormality Inverse Mimicking. [paper]

    [paper]: widen the distance between the abnormality features and the teacher features in anomalous regions.
    [ours]: L_AIM = sum_l sum_b [ mean_{M_l=1} max(0, cos(F_a^l, T^l) - m) + mean_{M_l=0} (1 - cos(F_a^l, T^l)) ].
    The anomalous term is skipped for a sample whose mask is empty at that level; ``normal_term=False`` drops
    the second term.
    """
    total = abnormality[0].new_zeros(())
    for f, t in zip(abnormality, teacher):
        cos = cosine_map(f, t)  # (B,h,w)
        m = mask_at(mask, cos.shape[-2:])
        inside, has_anomaly = _masked_mean((cos - margin).clamp_min(0), m)
        total = total + (inside * has_anomaly).sum()
        if normal_term:
            outside, has_normal = _masked_mean(1 - cos, 1 - m)
            total = total + (outside * has_normal).sum()
    return total


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 4.0) -> Tensor:
    """Focal loss between (B,1,h,w) logits and a binary mask, mean over pixels, no alpha weighting. [DeSTSeg]"""
    return sigmoid_focal_loss(logits.float(), target.float(), alpha=-1, gamma=gamma, reduction="mean")


def l1_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean |sigmoid(logits) - mask|. [DeSTSeg]"""
    return (torch.sigmoid(logits.float()) - target.float()).abs().mean()


def segmentation_target(mask: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """(B,1,H,W) mask -> (B,1,h,w) target at the segmentation resolution (bilinear, threshold 0.5). [DeSTSeg]"""
    return mask_at(mask, size).unsqueeze(1)
