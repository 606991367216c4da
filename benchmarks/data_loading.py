"""Data-loading benchmark: can decoding, resizing and anomaly synthesis keep up with training?

It measures, in images per second at the network input size (default 256x256):

- ``decode cold``: decode + resize from disk with the package's loader (a thread pool), after asking the OS to
  drop the files from its page cache (``posix_fadvise(DONTNEED)``; without it the number is a warm one);
- ``decode warm``: the same again, files in the page cache; ``decode 1 thread`` for comparison;
- ``pairs, decoding each time``: a batch of training pairs made by decoding its images from disk, then the
  batched synthesis (what a loader without the in-memory cache would do);
- ``pairs from cache``: a batch of training pairs from the decoded images held in memory (what training does:
  ``SyntheticPairs.batch`` on ``--device``), for a category whose images are rotated (carpet: a quarter turn
  and +-5 degrees) and without the rotation;

beside the training step rates of the ``fast`` and ``paper`` presets (stage 1 and stage 2, from
``benchmarks/speed.py``, run here or read from its ``--json``). Data loading does not starve training when the
cached pair rate is above the step rates.

Without ``--data`` it writes ``--images`` PNGs of ``--source-size`` pixels, like MVTec AD's (700 to 1024 px,
RGB or grayscale), made from scikit-image's texture photographs. Run::

    python benchmarks/data_loading.py                               # about two minutes on two CPU cores
    python benchmarks/data_loading.py --data ~/data/mvtec --category carpet --speed-json speed.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dmdd_core.catalog import DATASETS
from dmdd_core.data import SyntheticPairs, load_images, open_source
from dmdd_core.data.loading import _decode_image
from dmdd_core.synthesis import TRAIN_STREAM, TextureSource, step_generator, synthesize_anomalies

SPEED_SCRIPT = Path(__file__).resolve().parent / "speed.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Data-loading throughput beside the training step rate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", default=None, help="dataset root of any layout (default: generated PNGs)")
    parser.add_argument("--category", default=None, help="category of --data (default: the first)")
    parser.add_argument("--images", type=int, default=120, help="generated images (without --data)")
    parser.add_argument("--source-size", type=int, default=1024, help="side of the generated images")
    parser.add_argument("--size", type=int, default=256, help="network input side the images are resized to")
    parser.add_argument("--pairs", type=int, default=640, help="training pairs timed per measurement")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch of the synthesis (the paper's: 32)")
    parser.add_argument("--device", default="cpu", help="where the synthesis runs: cpu, cuda...")
    parser.add_argument("--speed-json", default=None, help="training rates from benchmarks/speed.py --json")
    parser.add_argument("--no-train-rates", action="store_true", help="do not measure the training step rates")
    parser.add_argument("--speed-steps", type=int, default=3, help="timed steps of the training rate measurement")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--figure", default=None, metavar="PATH", help="also save a bar chart (png)")
    return parser.parse_args(argv)


def make_images(folder: Path, count: int, side: int) -> list[Path]:
    """``count`` PNGs of side x side under ``folder``: colour-tinted crops of real texture photographs, so they
    compress like real photographs do (pure noise would not)."""
    import skimage.data

    sources = [getattr(skimage.data, name)().astype(np.float32) / 255.0 for name in ("brick", "grass", "gravel")]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        gray = sources[i % len(sources)]
        image = np.asarray(Image.fromarray((gray * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC))
        tint = rng.uniform(0.6, 1.0, size=3)
        rgb = (image[:, :, None] * tint[None, None, :]).astype(np.uint8)
        path = folder / f"{i:03d}.png"
        Image.fromarray(rgb).save(path)
        paths.append(path)
    return paths


def drop_page_cache(paths: Sequence[Path]) -> bool:
    """Ask the OS to forget the files' cached pages; False where it cannot be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(count: int, seconds: float) -> float:
    return count / max(seconds, 1e-9)


def measure(paths: list[Path], category: str, args: argparse.Namespace) -> dict[str, Any]:
    size = args.size
    results: dict[str, Any] = {}
    cold = drop_page_cache(paths)
    started = time.perf_counter()
    images, _ = load_images(paths, size, progress=False)
    results["decode_cold_img_s" if cold else "decode_first_img_s"] = rate(len(paths), time.perf_counter() - started)
    started = time.perf_counter()
    load_images(paths, size, progress=False)
    results["decode_warm_img_s"] = rate(len(paths), time.perf_counter() - started)
    started = time.perf_counter()
    for path in paths:
        _decode_image(path, size)
    results["decode_1_thread_img_s"] = rate(len(paths), time.perf_counter() - started)

    device = torch.device(args.device)
    textures = TextureSource.builtin(exclude=(category,))
    policy = DATASETS["builtin"].rotation_policy(category)
    steps = max(1, args.pairs // args.batch_size)
    cached = {
        "pairs_cached_img_s": SyntheticPairs(images, textures, batch_size=args.batch_size, rotation=policy,
                                             device=device),
        "pairs_cached_unrotated_img_s": SyntheticPairs(images, textures, batch_size=args.batch_size, device=device),
    }
    for pairs in cached.values():
        pairs.load_textures().batch(steps)  # warm-up
    started = time.perf_counter()
    for step in range(steps):
        generator = step_generator(TRAIN_STREAM, 0, step)
        picks = torch.randint(len(paths), (args.batch_size,), generator=generator).tolist()
        decoded = np.stack([_decode_image(paths[i], size) for i in picks])
        normal = torch.from_numpy(decoded).permute(0, 3, 1, 2).to(device).float().div_(255.0)
        synthesize_anomalies(normal, textures, generator, rotation=policy)
    _sync(device)
    results["pairs_decoding_each_img_s"] = rate(steps * args.batch_size, time.perf_counter() - started)
    for key, pairs in cached.items():
        started = time.perf_counter()
        for step in range(steps):
            pairs.batch(step)
        _sync(device)
        results[key] = rate(steps * args.batch_size, time.perf_counter() - started)
    results["synthesis"] = {"device": str(device), "batch_size": args.batch_size, "size": size,
                            "torch_threads": torch.get_num_threads(), "category": category}
    results["page_cache_dropped"] = cold
    return results


def training_rates(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Stage-1/2 img/s of the fast and paper presets, from --speed-json or measured by benchmarks/speed.py."""
    if args.speed_json:
        return list(json.loads(Path(args.speed_json).read_text())["results"])
    spec = importlib.util.spec_from_file_location("dmdd_benchmark_speed", SPEED_SCRIPT)
    assert spec is not None and spec.loader is not None
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    argv = ["--presets", "fast", "paper", "--steps", str(args.speed_steps), "--warmup", "1", "--prebuilt", "1"]
    return list(speed.main(argv)["results"])


LABELS = {
    "decode_cold_img_s": "decode + resize from disk, page cache dropped (thread pool)",
    "decode_first_img_s": "decode + resize from disk, first pass (thread pool)",
    "decode_warm_img_s": "decode + resize from disk, page cache warm (thread pool)",
    "decode_1_thread_img_s": "decode + resize from disk, one thread",
    "pairs_decoding_each_img_s": "training pairs, decoding the images each time",
    "pairs_cached_img_s": "training pairs from the in-memory cache (quarter turn + small rotation)",
    "pairs_cached_unrotated_img_s": "training pairs from the in-memory cache (no rotation)",
}


def format_table(data: dict[str, Any], train: list[dict[str, Any]]) -> str:
    lines = ["| what | img/s |", "|---|---|"]
    for key, value in data.items():
        if key.endswith("_img_s"):
            label = LABELS.get(key, key)
            lines.append(f"| {label} | {value:.1f} |")
    for row in train:
        where = f"{row['preset']} preset, {row['image_size']}x{row['image_size']}, batch {row['batch_size']}, {row['device']}"
        lines.append(f"| training step, stage 1, {where} | {row['stage1_img_s']:.1f} |")
        lines.append(f"| training step, stage 2, {where} | {row['stage2_img_s']:.1f} |")
    return "\n".join(lines)


def plot(report: dict[str, Any]):  # noqa: ANN201 - a matplotlib Figure
    """Horizontal bars: data-loading rates (blue) beside the training step rates (grey), img/s."""
    from dmdd_core.plots import figure

    rows = [(LABELS.get(k, k), v) for k, v in report["data"].items() if k.endswith("_img_s") and k in LABELS]
    train = [(f"training step {stage}, {r['preset']} ({r['image_size']}², batch {r['batch_size']}, {r['device']})",
              r[f"stage{stage[-1]}_img_s"]) for r in report["training"] for stage in ("stage 1", "stage 2")]
    labels = [label for label, _ in rows + train]
    values = [value for _, value in rows + train]
    fig, axes = figure(size=(9, 0.4 * len(labels) + 1.2))
    ax = axes[0, 0]
    colours = ["tab:blue"] * len(rows) + ["tab:grey"] * len(train)
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    for i, value in enumerate(values):
        ax.text(value, i, f" {value:.1f}", va="center", fontsize=8)
    ax.set_xlabel("images per second")
    ax.set_title(f"Data loading vs training, {report['images']} -> {report['input_size']}², {report['cpu_count']} CPUs",
                 fontsize=9)
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dmdd-data-bench-") as tmp:
        if args.data:
            source = open_source(args.data)
            category = args.category or source.categories()[0]
            paths = source.train_images(category)
            origin = f"{source.root} ({source.kind}), category {category}"
        else:
            category = "carpet"
            paths = make_images(Path(tmp), args.images, args.source_size)
            origin = f"{args.images} generated RGB PNGs of {args.source_size}x{args.source_size}"
        with Image.open(paths[0]) as first:
            source_size = first.size
        data = measure(paths, category, args)
    train = [] if args.no_train_rates else training_rates(args)
    report = {
        "images": origin,
        "num_images": len(paths),
        "first_image_size": list(source_size),
        "input_size": args.size,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "data": data,
        "training": [
            {k: row[k] for k in ("preset", "device", "image_size", "batch_size", "stage1_img_s", "stage2_img_s")}
            for row in train
        ],
    }
    print(f"images: {origin}; input {args.size}x{args.size}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
          f"threads; synthesis on {args.device} in batches of {args.batch_size}")
    print(format_table(data, report["training"]))
    per_thread = data["pairs_cached_img_s"] / torch.get_num_threads()
    print(f"synthesis from the cache: {data['pairs_cached_img_s']:.0f} pairs/s ({per_thread:.0f} per thread), "
          f"{data['pairs_cached_unrotated_img_s']:.0f} pairs/s without rotation")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.figure:
        fig = plot(report)
        fig.savefig(args.figure, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
