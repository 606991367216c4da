"""The datasets the package knows: their categories, layouts and per-category rotation policy, in one place.

Rotation policy (METHOD.md section 1): before synthesis, a normal training image is rotated by its category's
policy, "none", "small" (+-5 deg) or "right_angle_small" (a random multiple of 90 deg, then +-5 deg).
MVTec AD's policies are DeSTSeg's [DeSTSeg]; MPDD, VisA, the built-in textures and unknown categories are
choices of ours [ours]. Validation and test images are never rotated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Layout = Literal["mvtec", "visa", "folder"]
Policy = Literal["none", "small", "right_angle_small"]

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MPDD_CATEGORIES: tuple[str, ...] = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)  # fmt: skip
VISA_CATEGORIES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
    "pipe_fryum",
)  # fmt: skip
BUILTIN_CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel")


@dataclass(frozen=True)
class DatasetInfo:
    """What the package knows about one dataset."""

    name: str
    """The name used by ``--dataset`` and ``dmdd download``."""
    title: str
    layout: Layout
    """How its files are arranged (:mod:`dmdd_core.data.sources`)."""
    categories: tuple[str, ...]
    rotation: dict[str, Policy] = field(default_factory=dict)
    """Category -> rotation policy; categories not listed get "none"."""
    reference: str = ""


DATASETS: dict[str, DatasetInfo] = {
    "mvtec": DatasetInfo(
        "mvtec",
        "MVTec AD",
        "mvtec",
        MVTEC_CATEGORIES,
        {
            **dict.fromkeys(("capsule", "metal_nut", "pill", "toothbrush", "transistor"), "none"),
            **dict.fromkeys(("wood", "zipper", "cable"), "small"),
            **dict.fromkeys(("bottle", "grid", "hazelnut", "leather", "tile", "carpet", "screw"), "right_angle_small"),
        },  # [DeSTSeg]
        "Bergmann et al., CVPR 2019 and IJCV 2021",
    ),
    "mpdd": DatasetInfo(
        "mpdd",
        "MPDD (Metal Parts Defect Detection)",
        "mvtec",
        MPDD_CATEGORIES,
        {},  # [ours] parts are photographed in varying poses already
        "Jezek et al., ICUMT 2021",
    ),
    "visa": DatasetInfo(
        "visa",
        "VisA (Visual Anomaly)",
        "visa",
        VISA_CATEGORIES,
        {},  # [ours]
        "Zou et al., ECCV 2022",
    ),
    "builtin": DatasetInfo(
        "builtin",
        "built-in textures (generated offline)",
        "mvtec",
        BUILTIN_CATEGORIES,
        dict.fromkeys(BUILTIN_CATEGORIES, "right_angle_small"),  # [ours] textures without orientation
        "dmdd_core.data.builtin",
    ),
}
"""Known datasets by name. A folder of one's own is read with the ``folder`` layout (no entry needed)."""

DATASET_ALIASES: dict[str, str] = {"mvtec_ad": "mvtec", "mvtec-ad": "mvtec"}
"""Other names accepted for a known dataset."""
DATASET_KINDS: tuple[str, ...] = ("auto", "mvtec", "mpdd", "visa", "builtin", "folder", *DATASET_ALIASES)
"""Values of ``--dataset``: a known dataset (or an alias), ``folder`` for one category of your own, or ``auto``
(detect)."""

ROTATION_POLICY: dict[str, Policy] = {k: v for info in DATASETS.values() for k, v in info.rotation.items()}
"""Category -> policy over every known dataset (category names do not collide across them)."""


def rotation_policy(category: str) -> Policy:
    """The rotation policy of ``category``; "none" for categories not in :data:`ROTATION_POLICY`. [ours]"""
    return ROTATION_POLICY.get(category, "none")

