"""One command that measures what matters for the paper preset on a GPU, and writes it as JSON.

For each preset (``paper``, and ``fast`` as a lighter reference) and each precision the GPU offers (fp32; bf16
where the GPU computes it natively or it is asked for; fp16 with the gradient scaler), it measures:

- the step time of stage 1 (distillation) and stage 2 (segmentation): a whole training step as training runs it,
  the batch's synthesis on the GPU included, averaged over timed steps after warm-up steps;
- the synthesis wait per step: the part of that step spent making its batch (what a data loader's wait would be);
- the peak GPU memory of each stage (``torch.cuda.max_memory_allocated``);
- ``channels_last``, for the paper preset at the automatic precision;

and, once: synthesis batches per second on the GPU (paper size, batch 32, with and without the category's
rotation), inference images per second at batch 1 and 32 (fp32, as ``dmdd evaluate`` runs), and the predicted
minutes of the paper preset per category and for MVTec AD x 3 seeds at the automatic precision: training steps,
the validation checks, the test-set inference and the metrics (CPU rate measured by
``benchmarks/metrics_speed.py``).

It trains on the built-in dataset (category ``brick``) with a randomly initialised ResNet18 teacher: the weights
do not change the time, and nothing is downloaded. It stops adding measurements when ``--budget`` seconds have
passed (default 420: under 8 minutes in all on one GPU) and says what it skipped.

On a machine without a GPU it runs a 2-step version of itself (batch 2, fp32 only) so that it stays tested; its
figures are then CPU figures and the JSON and the printout say so. Run::

    python benchmarks/gpu_check.py                       # writes results/gpu_check/<gpu>.json
    python benchmarks/gpu_check.py --out check.json --presets paper --precisions bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dmdd_core.config import PRESETS, DMDDConfig, resolve_precision
from dmdd_core.data import SyntheticPairs, TrainPair, ensure_builtin_dataset
from dmdd_core.model import DMDD
from dmdd_core.train import (
    autocast_for,
    build_optimizers,
    grad_scaler_for,
    precision_for,
    select_device,
    train_step,
)

RESULTS = Path(__file__).resolve().parents[1] / "results" / "gpu_check"
CATEGORY = "brick"
MVTEC = {"categories": 15, "train_images": 3629, "test_images": 1725}
"""MVTec AD's own counts."""
SEEDS = 3
METRIC_SECONDS_PER_TEST_IMAGE = 0.02
"""Pixel metrics and the reference AUPRO with its two variants at 256² on the CPU, per test image (about 1.4 s per
100 maps in benchmarks/metrics_speed.py, with margin)."""
MIB = 2**20
PRESET_BATCH = DMDDConfig.preset("paper").batch_size


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:N or cpu")
    p.add_argument("--presets", nargs="+", default=["paper", "fast"], choices=sorted(PRESETS))
    p.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default on a GPU: fp32, fp16, and bf16 where it is native (compute capability >= 8.0); "
                   "fp32 on a CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per stage (default 10 on a GPU, 2 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per stage (default 3 on a GPU, 0 on a CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: the preset's on a GPU, 2 on a CPU)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds after which no new measurement starts")
    p.add_argument("--out", default=None, help="JSON path (default: results/gpu_check/<device name>.json)")
    args = p.parse_args(argv)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def default_precisions(device: torch.device) -> list[str]:
    """fp32 and fp16 on every GPU, bf16 where it is native; fp32 alone on a CPU (the 2-step version)."""
    if device.type != "cuda":
        return ["fp32"]
    native_bf16 = resolve_precision("auto", "cuda", torch.cuda.get_device_capability(device)) == "bf16"
    return ["fp32", "bf16", "fp16"] if native_bf16 else ["fp32", "fp16"]


def amp_of(precision: str) -> str:
    return "off" if precision == "fp32" else precision


# --- measurements ------------------------------------------------------------------------------------------------
def measure_training(cfg: DMDDConfig, pairs: SyntheticPairs, device: torch.device, steps: int,
                     warmup: int) -> dict[str, Any]:
    """Both stages' step time as training runs them (synthesis of the step's batch included), the synthesis
    wait per step and the peak memory of each stage."""
    torch.manual_seed(cfg.seed)
    model = DMDD(cfg).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    precision = precision_for(cfg, device)
    autocast, scaler = autocast_for(precision, device), grad_scaler_for(precision, device)
    optimizers = build_optimizers(model, cfg)
    out: dict[str, Any] = {"precision": precision, "channels_last": cfg.channels_last}
    step = 0
    for stage, optimizer in ((1, optimizers[0]), (2, optimizers[1])):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # fp16: a new scaler starts at 2^16 and skips the optimiser step while the gradients overflow, which would
        # make the first steps look short; warm up until its scale has held for three steps (at most 40 steps).
        stage_warmup, held, scale = warmup, 0, scaler.get_scale() if scaler.is_enabled() else None
        while scaler.is_enabled() and held < 3 and stage_warmup < warmup + 40:
            train_step(model, pairs.batch(step), cfg, stage, optimizer, autocast, scaler)
            step, stage_warmup = step + 1, stage_warmup + 1
            held, scale = (held + 1, scale) if scaler.get_scale() == scale else (0, scaler.get_scale())
        wait = total = 0.0
        for i in range(warmup + steps):
            sync(device)
            started = time.perf_counter()
            batch = TrainPair(*(t.contiguous(memory_format=memory_format) for t in pairs.batch(step)))
            sync(device)
            made = time.perf_counter()
            losses = train_step(model, batch, cfg, stage, optimizer, autocast, scaler)
            float(losses["loss"].detach())  # as the training loop logs it
            sync(device)
            if i >= warmup:
                wait += made - started
                total += time.perf_counter() - started
            step += 1
        out[f"stage{stage}_step_ms"] = 1000 * total / steps
        out[f"stage{stage}_synthesis_wait_ms"] = 1000 * wait / steps
        out[f"stage{stage}_synthesis_share"] = wait / total
        out[f"stage{stage}_peak_memory_mib"] = (torch.cuda.max_memory_allocated(device) / MIB
                                                 if device.type == "cuda" else None)
    del model, optimizers
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure_synthesis(cfg: DMDDConfig, root: Path, device: torch.device, batches: int) -> dict[str, float]:
    """Synthesis batches per second on the device at the preset's size and batch, with and without rotation."""
    out = {}
    for key, rotate in (("rotated", True), ("unrotated", False)):
        pairs = SyntheticPairs.from_config(root, CATEGORY, cfg.replace(rotate=rotate), device=device).load_textures()
        pairs.batch(batches)  # warm-up
        sync(device)
        started = time.perf_counter()
        for step in range(batches):
            pairs.batch(step)
        sync(device)
        out[f"{key}_batches_per_s"] = batches / (time.perf_counter() - started)
    out["pairs_per_s"] = out["rotated_batches_per_s"] * cfg.batch_size
    return out


@torch.no_grad()
def measure_inference(cfg: DMDDConfig, device: torch.device, batch_sizes: Sequence[int], repeats: int) -> dict[str, float]:
    """Images per second of the model's forward pass in eval mode, fp32 (as ``dmdd evaluate`` runs it)."""
    model = DMDD(cfg).to(device).eval()
    out = {}
    for batch in batch_sizes:
        images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device)
        model(images)
        sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            model(images)
        sync(device)
        out[f"batch_{batch}_img_per_s"] = repeats * batch / (time.perf_counter() - started)
    del model
    return out


def predict_minutes(cfg: DMDDConfig, stage1_ms: float, stage2_ms: float, inference_img_s: float) -> dict[str, float]:
    """Minutes of one category (an average MVTec AD one) and of all of MVTec AD x 3 seeds: the training steps,
    the validation checks at stage-2 checkpoints, the test-set inference and the metrics on the CPU."""
    per_category_train = MVTEC["train_images"] / MVTEC["categories"]
    per_category_test = MVTEC["test_images"] / MVTEC["categories"]
    train_s = (cfg.stage1_steps * stage1_ms + cfg.stage2_steps * stage2_ms) / 1000
    checks = cfg.stage2_steps // cfg.checkpoint_every
    val_images = 2 * round(cfg.val_fraction * per_category_train)  # each held-out image as it is and anomalous
    infer_s = (per_category_test + checks * val_images) / inference_img_s
    metric_s = per_category_test * METRIC_SECONDS_PER_TEST_IMAGE
    minutes = (train_s + infer_s + metric_s) / 60
    return {"train_minutes_per_category": train_s / 60, "minutes_per_category": minutes,
            "mvtec_3_seeds_hours": minutes * MVTEC["categories"] * SEEDS / 60}


# --- the run -----------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    warnings.filterwarnings("ignore", message=".*GradScaler.*")
    device = select_device(args.device)
    on_gpu = device.type == "cuda"
    steps = args.steps or (10 if on_gpu else 2)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 0)
    precisions = args.precisions or default_precisions(device)
    root = ensure_builtin_dataset()
    report: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_figures": not on_gpu,
        "note": "" if on_gpu else "CPU figures from the 2-step version (no GPU here): not a GPU measurement",
        "compute_capability": list(torch.cuda.get_device_capability(device)) if on_gpu else None,
        "auto_precision": resolve_precision("auto", device.type,
                                            torch.cuda.get_device_capability(device) if on_gpu else None),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if on_gpu else None,
        "teacher": "resnet18, random weights (timing only)",
        "data": f"built-in dataset, category {CATEGORY}",
        "steps": steps,
        "warmup": warmup,
        "training": [],
        "skipped": [],
    }
    print(f"gpu_check on {report['device']} ({device}); torch {torch.__version__}; {warmup} warm-up + {steps} timed "
          f"steps per stage; precisions {', '.join(precisions)}")
    if not on_gpu:
        print("no GPU: running the 2-step version; every figure below is a CPU figure")

    def config(preset: str, precision: str, channels_last: bool = False) -> DMDDConfig:
        overrides: dict[str, Any] = {"teacher": "resnet18", "teacher_pretrained": False, "device": str(device),
                                     "amp": amp_of(precision), "channels_last": channels_last}
        if args.batch_size or not on_gpu:
            overrides["batch_size"] = args.batch_size or 2
        return DMDDConfig.preset(preset, **overrides)

    plan = [(preset, precision, False) for preset in args.presets for precision in precisions]
    if "paper" in args.presets and on_gpu:
        plan.insert(len(precisions), ("paper", report["auto_precision"], True))
    for preset, precision, channels_last in plan:
        label = f"{preset} {precision}{' channels_last' if channels_last else ''}"
        if time.perf_counter() - started > args.budget:
            report["skipped"].append(f"{label}: over the {args.budget:.0f} s budget")
            continue
        cfg = config(preset, precision, channels_last)
        pairs = SyntheticPairs.from_config(root, CATEGORY, cfg, device=device).load_textures()
        row = None
        try:
            row = measure_training(cfg, pairs, device, steps, warmup)
        except torch.cuda.OutOfMemoryError:
            report["skipped"].append(f"{label}: out of GPU memory at batch {cfg.batch_size}")
        if row is None:  # freed here, outside the except block whose traceback holds the model
            del pairs
            gc.collect()
            torch.cuda.empty_cache()
            continue
        row = {"preset": preset, "image_size": cfg.image_size, "batch_size": cfg.batch_size, **row}
        report["training"].append(row)
        print(f"  {label:28s} stage 1 {row['stage1_step_ms']:8.1f} ms  stage 2 {row['stage2_step_ms']:8.1f} ms  "
              f"synthesis wait {row['stage1_synthesis_wait_ms']:.1f} / {row['stage2_synthesis_wait_ms']:.1f} ms"
              + (f"  peak {row['stage1_peak_memory_mib']:.0f} / {row['stage2_peak_memory_mib']:.0f} MiB" if on_gpu else ""),
              flush=True)

    paper = config("paper", report["auto_precision"]).replace(batch_size=args.batch_size or PRESET_BATCH)
    report["synthesis"] = {"image_size": paper.image_size, "batch_size": paper.batch_size,
                           **measure_synthesis(paper, root, device, max(steps, 5))}
    sizes = (1, 32) if on_gpu else (1, 2)
    report["inference"] = {"precision": "fp32", **measure_inference(paper, device, sizes, max(steps, 5 if on_gpu else 1))}
    auto = next((r for r in report["training"] if r["preset"] == "paper" and not r["channels_last"]
                 and r["precision"] == report["auto_precision"]), None)
    if auto is not None:
        paper_full = DMDDConfig.preset("paper")
        report["prediction"] = {
            "precision": auto["precision"],
            "batch_size": auto["batch_size"],
            **predict_minutes(paper_full, auto["stage1_step_ms"], auto["stage2_step_ms"],
                              report["inference"][f"batch_{sizes[1]}_img_per_s"]),
        }
        if auto["batch_size"] != paper_full.batch_size:
            report["prediction"]["note"] = (f"steps measured at batch {auto['batch_size']}, not the preset's "
                                            f"{paper_full.batch_size}: a lower bound")
        p = report["prediction"]
        print(f"paper preset at {p['precision']}: {p['minutes_per_category']:.1f} min per category "
              f"({p['train_minutes_per_category']:.1f} of them training); MVTec AD x {SEEDS} seeds: "
              f"{p['mvtec_3_seeds_hours']:.1f} h" + (" [CPU figures]" if not on_gpu else ""))
    s = report["synthesis"]
    print(f"synthesis at {s['image_size']}², batch {s['batch_size']}: {s['rotated_batches_per_s']:.1f} batches/s "
          f"({s['unrotated_batches_per_s']:.1f} without rotation); inference "
          + ", ".join(f"{k.split('_')[1]}: {v:.0f} img/s" for k, v in report["inference"].items() if k != "precision"))
    for skipped in report["skipped"]:
        print(f"skipped: {skipped}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(f"total {report['seconds']:.0f} s")
    return report


def default_out(report: dict[str, Any]) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "_", report["device"].lower()).strip("_") or "device"
    return RESULTS / f"{'cpu_' if report['cpu_figures'] else ''}{slug}.json"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    out = Path(args.out) if args.out else default_out(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
