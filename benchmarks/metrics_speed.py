"""Timing of the evaluation metrics on a test set the size of a large MVTec AD category.

By default 100 anomaly maps of 256x256 (a third of them with one to three defect regions), smooth random maps
that score the defects a little higher, like a weak model's. Prints seconds per metric (best of ``--repeat``),
and what the three PRO computations give on the same maps. Run::

    python benchmarks/metrics_speed.py
    python benchmarks/metrics_speed.py --images 300 --size 256 --json metrics_speed.json
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

from dmdd_core.metrics import aupro, aupro_linear_thresholds, aupro_per_image, image_auroc, pixel_ap, pixel_auroc


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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="PATH")
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
        "image AUROC": lambda: image_auroc(labels, scores),
    }
    rows = {}
    print(f"{args.images} maps of {args.size}x{args.size}, {int(labels.sum())} with defects; {os.cpu_count()} CPUs")
    print(f"{'metric':40s} {'seconds':>8s} {'value':>8s}")
    for name, fn in metrics.items():
        seconds, value = best_time(fn, args.repeat)
        rows[name] = {"seconds": seconds, "value": value}
        print(f"{name:40s} {seconds:8.3f} {value:8.4f}")
    report = {"images": args.images, "size": args.size, "cpu_count": os.cpu_count(), "metrics": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
