"""Decode a category's images once, check them, and keep them in memory, resized, as uint8. [ours]

Every file is checked when it is decoded, and each problem names the file and the fix:

- an unreadable, corrupt or truncated image or mask;
- a defective test image without its mask;
- a mask whose aspect ratio differs from its image's (it is most likely not that image's mask).

Without ``skip_bad`` the first pass collects every problem and raises one :class:`BadInputError` listing them
all. With ``skip_bad`` the bad files are left out, each one is logged as a warning, and all of them are counted in
the :class:`InputReport` that ends up in the run's log and evaluation report. Nothing is skipped silently.

What works as it is: grayscale, RGBA, palette and 16-bit images (three channels in [0,1]); images of any size
and aspect ratio (stretched to the square input); a mask with its image's aspect ratio but another size
(resized with nearest neighbour and binarised, and counted in the report).

Decoding runs in a thread pool (PIL releases the GIL while it decodes and resizes). A category of MVTec AD
(a few hundred images) takes tens of megabytes at 256x256.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from dmdd_core.config import progress_disabled
from dmdd_core.data.sources import TestItem
from dmdd_core.imageio import binary_mask_array, open_image, rgb_array

SKIP_HINT = (
    "Fix or remove the file(s), or pass --skip-bad (skip_bad=True) to leave them out; skipped files are "
    "logged and counted in the report."
)
ASPECT_TOLERANCE = 0.02
"""Relative difference of aspect ratios under which a mask of another size is still its image's mask."""

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Problem:
    """A file that cannot be used, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return self.reason if self.path in self.reason else f"{self.path}: {self.reason}"


class BadInputError(ValueError):
    """Input files that cannot be used; the message lists each one with what is wrong and the fix."""

    def __init__(self, problems: Sequence[Problem], what: str = "input files") -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        count = len(self.problems)
        super().__init__(f"{count} bad {what}:\n{shown}{more}\n{SKIP_HINT}")


@dataclass
class InputReport:
    """What loading made of a run's input: the files skipped (``skip_bad``) and the masks that were resized."""

    skipped: list[Problem] = field(default_factory=list)
    resized_masks: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def extend(self, other: InputReport) -> InputReport:
        self.skipped += [p for p in other.skipped if p not in self.skipped]
        self.resized_masks += [m for m in other.resized_masks if m not in self.resized_masks]
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_skipped": self.num_skipped,
            "skipped": [{"path": p.path, "reason": p.reason} for p in self.skipped],
            "num_resized_masks": len(self.resized_masks),
            "resized_masks": list(self.resized_masks),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputReport:
        return cls([Problem(s["path"], s["reason"]) for s in d.get("skipped", [])], list(d.get("resized_masks", [])))

    def summary(self) -> str:
        """One line, e.g. "2 bad files skipped, 1 mask resized"; empty when there is nothing to say."""
        parts = []
        if self.skipped:
            parts.append(f"{self.num_skipped} bad file{'s' * (self.num_skipped != 1)} skipped")
        if self.resized_masks:
            n = len(self.resized_masks)
            parts.append(f"{n} mask{'s' * (n != 1)} resized to {'their' if n != 1 else 'its'} image's size")
        return ", ".join(parts)


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def parallel_map(fn: Callable[[T], R], items: Sequence[T], desc: str, progress: bool | None) -> list[R]:
    """``[fn(x) for x in items]`` in a thread pool, in order, with a progress bar."""
    disable = progress_disabled(progress)
    with ThreadPoolExecutor(_workers()) as pool, tqdm(total=len(items), desc=desc, unit="img", disable=disable, file=sys.stderr) as bar:
        results = []
        for result in pool.map(fn, items):
            results.append(result)
            bar.update()
    return results


def _decode_all(
    decode: Callable[[T], R | Problem],
    items: Sequence[T],
    *,
    what: str,
    desc: str,
    skip_bad: bool,
    report: InputReport,
    progress: bool | None,
) -> list[tuple[T, R]]:
    """Decode every item in a thread pool; the (item, result) pairs that worked, in order. Problems raise one
    :class:`BadInputError`, or with ``skip_bad`` are warned about and added to ``report``."""
    results = parallel_map(decode, list(items), desc, progress)
    problems = [r for r in results if isinstance(r, Problem)]
    if problems and not skip_bad:
        raise BadInputError(problems, what)
    for problem in problems:
        warnings.warn(f"skipped {problem}", stacklevel=3)
    report.skipped += problems
    return [(item, r) for item, r in zip(items, results) if not isinstance(r, Problem)]


def _rgb_uint8(img: Image.Image, size: int) -> np.ndarray:
    """A decoded image -> (size,size,3) uint8, through the one RGB conversion of :mod:`dmdd_core.imageio`."""
    return np.round(rgb_array(img, (size, size)) * 255.0).astype(np.uint8)


def _decode_image(path: Path, size: int) -> np.ndarray | Problem:
    try:
        return _rgb_uint8(open_image(path), size)
    except (ValueError, FileNotFoundError) as err:
        return Problem(str(path), str(err))


def load_images(
    paths: Sequence[Path],
    size: int,
    *,
    skip_bad: bool = False,
    report: InputReport | None = None,
    progress: bool | None = None,
    desc: str = "decode",
) -> tuple[np.ndarray, list[Path]]:
    """Decode and resize ``paths`` -> ((N,size,size,3) uint8, the paths kept, in order)."""
    kept = _decode_all(
        lambda p: _decode_image(p, size), paths, what="images", desc=desc, skip_bad=skip_bad,
        report=report if report is not None else InputReport(), progress=progress,
    )
    if not kept:
        return np.zeros((0, size, size, 3), np.uint8), []
    return np.stack([r for _, r in kept]), [p for p, _ in kept]


@dataclass
class _Decoded:
    image: np.ndarray
    mask: np.ndarray
    resized_mask: str | None = None


def _decode_item(item: TestItem, size: int) -> _Decoded | Problem:
    try:
        img = open_image(item.image)
    except (ValueError, FileNotFoundError) as err:
        return Problem(str(item.image), str(err))
    image = _rgb_uint8(img, size)
    if item.mask is None:
        return _Decoded(image, np.zeros((size, size), np.uint8))
    if not item.mask.is_file():
        return Problem(
            str(item.image),
            f"defective test image without a mask: expected {item.mask}. Add the mask (white = defect), "
            "or move the image out of the test set",
        )
    try:
        mask_img = open_image(item.mask)
    except (ValueError, FileNotFoundError) as err:
        return Problem(str(item.mask), str(err))
    resized = None
    if mask_img.size != img.size:
        (iw, ih), (mw, mh) = img.size, mask_img.size
        if abs((mw / mh) / (iw / ih) - 1.0) > ASPECT_TOLERANCE:
            return Problem(
                str(item.mask),
                f"mask is {mw}x{mh} but its image {item.image.name} is {iw}x{ih}, another aspect ratio: it is "
                "probably not this image's mask. Check the pairing (and --mask-suffix)",
            )
        resized = f"{item.mask} ({mw}x{mh}, image {iw}x{ih})"
    mask = binary_mask_array(mask_img, (size, size)).astype(np.uint8)
    return _Decoded(image, mask, resized)


def load_test_items(
    items: Sequence[TestItem],
    size: int,
    *,
    skip_bad: bool = False,
    report: InputReport | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, list[TestItem]]:
    """Decode test images and masks -> ((N,S,S,3) uint8 images, (N,S,S) uint8 {0,1} masks, the items kept)."""
    report = report if report is not None else InputReport()
    kept = _decode_all(
        lambda it: _decode_item(it, size), items, what="test files", desc="decode test", skip_bad=skip_bad,
        report=report, progress=progress,
    )
    report.resized_masks += [r.resized_mask for _, r in kept if r.resized_mask is not None]
    if not kept:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.uint8), []
    images = np.stack([r.image for _, r in kept])
    masks = np.stack([r.mask for _, r in kept])
    return images, masks, [it for it, _ in kept]


def load_image(path: str | Path, size: int) -> Tensor:
    """One image file in any mode -> (3,size,size) float32 in [0,1], antialiased bicubic resize. No mean/std."""
    return torch.from_numpy(rgb_array(open_image(path), (size, size)).transpose(2, 0, 1).copy())


def load_mask(path: str | Path, size: int) -> Tensor:
    """One mask file -> (1,size,size) float32 in {0,1}: nearest resize, non-zero is anomalous."""
    return torch.from_numpy(binary_mask_array(open_image(path), (size, size))[None].copy())
