"""How long a training run should take on a GPU, from its floating-point operations and an assumed throughput.

A step's operations are counted by running it once under ``torch.utils.flop_counter.FlopCounterMode`` (forward
and backward; linear in the batch, so they are counted at a small batch and scaled). The time of a step is then
synthesis + operations / sustained throughput + a fixed overhead, the model of ``benchmarks/gpu_estimate.py``.
The sustained throughput of a GPU on these small convolution nets is an assumption, stated with every estimate
(:data:`SUSTAINED_TFLOPS`): a fraction of the GPU's peak in the precision it runs in (fp16 on a T4, bf16 on an
A100 or H100; :func:`dmdd_core.config.resolve_precision`). A measured run replaces it (``benchmarks/gpu_check.py``).
[ours]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import DMDDConfig, resolve_precision

SUSTAINED_TFLOPS: dict[str, float] = {"T4": 8.0, "L4": 15.0, "V100": 15.0, "A10": 15.0, "A100": 40.0, "H100": 60.0,
                                      "H200": 60.0}
"""GPU name (a part of what ``torch.cuda.get_device_name`` says) -> the TFLOPS these nets are assumed to sustain in
its mixed precision: about an eighth of the fp16/bf16 tensor-core peak (T4 65, A100 312, H100 about 990 dense),
less on the largest GPUs, whose peak small convolution nets reach least. An unknown GPU is assumed to be a T4."""
SYNTHESIS_MS = 5.0
"""GPU milliseconds to make one batch of training pairs (the batched synthesis runs on the GPU)."""
STEP_OVERHEAD_MS = 15.0
"""Fixed milliseconds per training step: kernel launches, the optimiser, Python."""


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (forward and backward, as FlopCounterMode counts them)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def step_flops(cfg: DMDDConfig, batch: int = 2, device: str | torch.device = "cpu") -> dict[str, float]:
    """FLOPs of one stage-1 step and one stage-2 step at the preset's batch, and of inference per image, counted
    at ``batch`` images on ``device`` (a GPU counts in well under a second; a CPU takes seconds at 256²). The batch
    is at least 2: the segmentation network's pooled branch normalises over the batch in train mode."""
    from .data import TrainPair
    from .model import DMDD
    from .train import distillation_step, segmentation_step

    model = DMDD(cfg.replace(teacher_pretrained=False, student_pretrained=False)).to(device)
    size = cfg.image_size
    pair = TrainPair(torch.rand(batch, 3, size, size, device=device), torch.rand(batch, 3, size, size, device=device),
                     (torch.rand(batch, 1, size, size, device=device) > 0.9).float())

    def stage1() -> None:
        distillation_step(model, pair, cfg)["loss"].backward()

    def stage2() -> None:
        segmentation_step(model, pair, cfg)["loss"].backward()

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(pair.augmented)
        model.train()

    scale = cfg.batch_size / batch
    return {"stage1": count_flops(stage1) * scale, "stage2": count_flops(stage2) * scale,
            "inference_per_image": count_flops(infer) / batch}


def assumed_tflops(gpu_name: str) -> tuple[str, float]:
    """(the GPU it is taken for, its assumed sustained TFLOPS) for a device name such as "Tesla T4"."""
    for name in sorted(SUSTAINED_TFLOPS, key=len, reverse=True):  # "A100" before "A10"
        if name.lower() in gpu_name.lower():
            return name, SUSTAINED_TFLOPS[name]
    return "T4", SUSTAINED_TFLOPS["T4"]


def train_minutes(cfg: DMDDConfig, flops: dict[str, float], tflops: float, synthesis_ms: float = SYNTHESIS_MS,
                  overhead_ms: float = STEP_OVERHEAD_MS) -> float:
    """Minutes of training (both stages) at ``tflops`` sustained, from :func:`step_flops`' counts."""
    fixed = (synthesis_ms + overhead_ms) / 1000
    rate = tflops * 1e12
    return (cfg.stage1_steps * (fixed + flops["stage1"] / rate) + cfg.stage2_steps * (fixed + flops["stage2"] / rate)) / 60


def describe_plan(cfg: DMDDConfig, device: str | torch.device | None = None) -> str:
    """What a notebook prints before it trains: the device, the precision, the setting and, on a GPU, the expected
    training time (counted operations at the GPU's assumed throughput, :data:`SUSTAINED_TFLOPS`)."""
    from .train import select_device

    dev = torch.device(select_device(str(device or cfg.device)))
    setting = (f"{cfg.preset_name} preset: {cfg.image_size}², {cfg.stage1_steps} + {cfg.stage2_steps} steps at batch "
               f"{cfg.batch_size}, segmentation body {cfg.seg_channels} channels")
    if dev.type != "cuda":
        return f"device: CPU ({torch.get_num_threads()} threads), precision fp32; {setting}"
    name = torch.cuda.get_device_name(dev)
    capability = torch.cuda.get_device_capability(dev)
    precision = resolve_precision(cfg.amp, "cuda", capability)
    taken_for, tflops = assumed_tflops(name)
    minutes = train_minutes(cfg, step_flops(cfg, 2, dev), tflops)
    return (f"device: {name} (compute capability {capability[0]}.{capability[1]}), precision {precision}; {setting}; "
            f"expected training about {minutes:.0f} min (counted operations at {tflops:.0f} TFLOPS, the throughput "
            f"assumed for a {taken_for}; evaluation adds a minute or two)")
