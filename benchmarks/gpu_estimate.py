"""How long the full benchmark (notebook 08's full mode) should take on one GPU, estimated without one.

``benchmarks/gpu_check.py`` measures these figures on a GPU; this estimate stands in where none was measured.
Nothing here needs a GPU. The estimate combines what can be measured on any machine with two stated assumptions:

measured here
  - floating-point operations of one stage-1 step (distillation: teacher forward on two images, student forward
    and backward, AIM) and one stage-2 step (segmentation: teacher and student forward, segmentation network
    forward and backward) of the ``paper`` preset at batch 32 and 256², and of inference per image, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (counted at a small batch and scaled: the count is linear in
    the batch);
  - training pairs per second of the batched synthesis on this machine's CPU (for reference: on a GPU it runs
    on the GPU, in the training process);
assumed (flags)
  - ``--tflops``: the throughput the GPU sustains on these convolution nets in bf16, a low and a high value.
    An H100's dense bf16 peak is about 990 TFLOPS; small convolution nets at batch 32 reach a small fraction of
    it. The defaults, 60 and 200, are a deliberately wide range;
  - ``--synthesis-ms``: milliseconds the GPU spends making one batch of 32 pairs at 256² (default 5: about a
    hundred passes over the batch's 6.3 M values at a GPU's memory bandwidth, plus a few dozen kernel launches);
  - ``--step-overhead``: fixed milliseconds per step (kernel launches, optimiser, Python; default 15).

A step takes synthesis + GPU compute + overhead: the batch is made on the GPU before the step that uses it.
Per task (category and seed) it adds the validation checks during training, the test-set inference and the
metrics (on the CPU, measured rates from ``benchmarks/metrics_speed.py``). Dataset sizes are MVTec AD's
(15 categories, 3629 training and 1725 test images) and MPDD's (6 categories, 888 and 458).

Run::

    python benchmarks/gpu_estimate.py                          # about a minute on two CPU cores
    python benchmarks/gpu_estimate.py --tflops 40 120 --seeds 1      # an A100
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from dmdd_core.config import DMDDConfig
from dmdd_core.data import SyntheticPairs, ensure_builtin_dataset
from dmdd_core.estimate import count_flops, step_flops  # noqa: F401 (count_flops: part of this script's interface)

DATASETS = {  # categories, training images, test images (the datasets' own counts)
    "MVTec AD": (15, 3629, 1725),
    "MPDD": (6, 888, 458),
}
METRIC_SECONDS_PER_TEST_IMAGE = 0.02
"""Pixel AUROC/AP/F1 + reference AUPRO + two variants at 256² on the CPU (benchmarks/metrics_speed.py: about 1.4 s
per 100 maps), with margin for the original-resolution option."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", help="the preset estimated (default paper; lab: the T4 setting)")
    p.add_argument("--tflops", type=float, nargs=2, default=(60.0, 200.0), metavar=("LOW", "HIGH"),
                   help="sustained TFLOPS of the GPU on these nets in the run's precision (bf16, or fp16 on a T4), "
                        "low and high (default 60 200: an H100; a T4 in fp16: 8 20)")
    p.add_argument("--synthesis-ms", dest="synthesis_ms", type=float, default=5.0,
                   help="GPU milliseconds to make one batch of training pairs (default 5)")
    p.add_argument("--step-overhead", dest="step_overhead", type=float, default=15.0,
                   help="fixed milliseconds per training step (default 15)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per category (default 3)")
    p.add_argument("--count-batch", dest="count_batch", type=int, default=2,
                   help="batch the FLOPs are counted at, then scaled to the preset's (default 2)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def cpu_pairs_per_second(cfg: DMDDConfig, seconds: float = 3.0) -> float:
    """Training pairs per second of the batched synthesis on this machine's CPU at the preset's size and batch."""
    root = ensure_builtin_dataset()
    pairs = SyntheticPairs.from_config(root, "brick", cfg).load_textures()
    pairs.batch(0)  # warm-up
    made, started, step = 0, time.perf_counter(), 1
    while time.perf_counter() - started < seconds:
        pairs.batch(step)
        made, step = made + cfg.batch_size, step + 1
    return made / (time.perf_counter() - started)


def estimate(flops: dict[str, float], args: argparse.Namespace, cfg: DMDDConfig) -> dict[str, Any]:
    """Hours per dataset for the low and high throughput assumptions."""
    data_seconds = args.synthesis_ms / 1000
    out: dict[str, Any] = {}
    for label, tflops in (("slow GPU", min(args.tflops)), ("fast GPU", max(args.tflops))):
        rate = tflops * 1e12
        step1 = data_seconds + flops["stage1"] / rate + args.step_overhead / 1000
        step2 = data_seconds + flops["stage2"] / rate + args.step_overhead / 1000
        train_s = cfg.stage1_steps * step1 + cfg.stage2_steps * step2
        checks = cfg.stage2_steps // cfg.checkpoint_every  # validation runs at stage-2 checkpoints
        per_dataset = {}
        for name, (categories, n_train, n_test) in DATASETS.items():
            val_images = cfg.val_fraction * n_train / categories
            infer_s = (n_test / categories + checks * val_images) * (
                flops["inference_per_image"] / rate + args.step_overhead / 1000 / 16)
            metric_s = (n_test / categories) * METRIC_SECONDS_PER_TEST_IMAGE
            task_s = train_s + infer_s + metric_s
            per_dataset[name] = {"task_minutes": task_s / 60, "tasks": categories * args.seeds,
                                 "hours": task_s * categories * args.seeds / 3600}
        out[label] = {"tflops": tflops, "stage1_step_ms": 1000 * step1, "stage2_step_ms": 1000 * step2,
                      "data_ms_per_step": 1000 * data_seconds, "train_minutes_per_task": train_s / 60,
                      "datasets": per_dataset}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    cfg = DMDDConfig.preset(args.preset, teacher="resnet18")
    started = time.perf_counter()
    flops = step_flops(cfg, args.count_batch)
    rate = cpu_pairs_per_second(cfg)
    result = estimate(flops, args, cfg)
    print(f"{args.preset} preset: {cfg.image_size}², batch {cfg.batch_size}, {cfg.stage1_steps} + {cfg.stage2_steps} steps, "
          f"teacher {cfg.teacher}, {args.seeds} seeds")
    print(f"measured: stage-1 step {flops['stage1'] / 1e12:.2f} TFLOP, stage-2 step {flops['stage2'] / 1e12:.2f} TFLOP, "
          f"inference {flops['inference_per_image'] / 1e9:.1f} GFLOP per image; "
          f"synthesis {rate:.0f} training pairs/s on this CPU at {cfg.image_size}², batch {cfg.batch_size}")
    print(f"assumed: synthesis {args.synthesis_ms:.0f} ms per batch on the GPU, {args.step_overhead:.0f} ms overhead "
          "per step\n")
    print("| GPU throughput | stage-1 step | stage-2 step | synthesis per step | train per task | "
          + " | ".join(f"{name} ({DATASETS[name][0]} x {args.seeds} tasks)" for name in DATASETS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(DATASETS))
    for label, r in result.items():
        cells = " | ".join(f"{d['hours']:.1f} h" for d in r["datasets"].values())
        print(f"| {label}: {r['tflops']:.0f} TFLOPS | {r['stage1_step_ms']:.0f} ms | {r['stage2_step_ms']:.0f} ms | "
              f"{r['data_ms_per_step']:.0f} ms | {r['train_minutes_per_task']:.1f} min | {cells} |")
    total = [sum(d["hours"] for d in r["datasets"].values()) for r in result.values()]
    print(f"\nboth datasets: {min(total):.1f} to {max(total):.1f} h on one GPU "
          f"(estimated in {time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"flops": flops, "cpu_pairs_per_second": rate, "assumptions": vars(args), "estimate": result}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
