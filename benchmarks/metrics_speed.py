"""Timing of the evaluation metrics on a test set the size of a large MVTec AD category.

By default 100 anomaly maps of 256x256 (a third of them with one to three defect regions), smooth random maps
that score the defects a little higher, like a weak model's. Prints seconds per metric (best of ``--repeat``),
and what the three PRO computations give on the same maps.

Then the reference AUPRO and pixel AUROC at an original resolution like MVTec AD's (``evaluate(...,
resolution="original")``): by default 30 maps of 4 x ``--size`` (1024x1024 at the default size), passed as
lists of 2-D arrays as the evaluation passes them (``--original-images 0`` skips it). Run::

    python benchmarks/metrics_speed.py
    python benchmarks/metrics_speed.py --images 300 --size 256 --json metrics_speed.json
    python benchmarks/metrics_speed.py --original-images 100 --original-size 900
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from dmdd_core.metrics import (
    aupro,
    aupro_linear_thresholds,
    aupro_per_image,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    pixel_metrics,
)


def make_maps(images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(masks uint8, maps float32), both (images, size, size)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((images, size, size), dtype=np.uint8)
    for i in range(0, images, 3):
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - size // 8, size=2)
            h, w = rng.integers(size // 32, size // 8, size=2)
            masks[i, r : r + h, c : c + w] = 1
    noise = ndimage.gaussian_filter(rng.random((images, size, size)), sigma=(0, 4, 4))
    maps = (noise - noise.min()) / (noise.max() - noise.min()) + 0.1 * masks
    return masks, maps.astype(np.float32)


def best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return best, value


def original_resolution(images: int, size: int, repeat: int) -> dict[str, Any]:
    """Time the reference AUPRO and pixel AUROC on ``images`` maps of ``size`` x ``size`` given as lists of 2-D
    arrays, as ``evaluate(..., resolution="original")`` gives them; print the rows, return them."""
    masks, maps = make_maps(images, size, seed=1)
    mask_list, map_list = list(masks), list(maps)
    metrics: dict[str, Callable[[], float]] = {
        "aupro (reference)": lambda: aupro(mask_list, map_list),
        "pixel AUROC": lambda: pixel_auroc(mask_list, map_list),
        "pixel AUROC + AP + F1-max, one sort": lambda: pixel_metrics(mask_list, map_list)["pixel_auroc"],
    }
    defective = sum(bool(m.any()) for m in mask_list)
    print(f"original resolution: {images} maps of {size}x{size} as lists of 2-D arrays, {defective} with defects")
    rows = {}
    for name, fn in metrics.items():
        seconds, value = best_time(fn, repeat)
        rows[name] = {"seconds": seconds, "value": value}
        print(f"{name + f', {size}x{size}':48s} {seconds:8.3f} {value:8.4f}")
    return {"images": images, "size": size, "metrics": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--original-images", type=int, default=30,
                        help="maps timed at an original resolution (default 30; 0 skips)")
    parser.add_argument("--original-size", type=int, default=None,
                        help="their side (default 4 x --size: 1024 at the default 256, MVTec AD's largest)")
    args = parser.parse_args(argv)
    masks, maps = make_maps(args.images, args.size)
    labels = masks.reshape(len(masks), -1).max(1)
    scores = maps.reshape(len(maps), -1).max(1)
    metrics: dict[str, Callable[[], float]] = {
        "aupro (reference)": lambda: aupro(masks, maps),
        "aupro per image (variant)": lambda: aupro_per_image(masks, maps),
        "aupro 200 linear thresholds (variant)": lambda: aupro_linear_thresholds(masks, maps),
        "pixel AUROC": lambda: pixel_auroc(masks, maps),
        "pixel AP": lambda: pixel_ap(masks, maps),
        "pixel F1-max": lambda: pixel_f1_max(masks, maps),
        "pixel AUROC + AP + F1-max, one sort": lambda: pixel_metrics(masks, maps)["pixel_auroc"],
        "image AUROC": lambda: image_auroc(labels, scores),
    }
    rows = {}
    print(f"{args.images} maps of {args.size}x{args.size}, {int(labels.sum())} with defects; {os.cpu_count()} CPUs")
    print(f"{'metric':48s} {'seconds':>8s} {'value':>8s}")
    for name, fn in metrics.items():
        seconds, value = best_time(fn, args.repeat)
        rows[name] = {"seconds": seconds, "value": value}
        print(f"{name:48s} {seconds:8.3f} {value:8.4f}")
    report: dict[str, Any] = {"images": args.images, "size": args.size, "cpu_count": os.cpu_count(), "metrics": rows}
    if args.original_images > 0:
        report["original_resolution"] = original_resolution(
            args.original_images, args.original_size or 4 * args.size, args.repeat
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
