"""Speed benchmark of DMDD training and inference, and where the time of a step goes.

For each preset (default ``fast`` and ``paper``) on the chosen device it measures, in images per second:
stage-1 training (distillation step: forward, backward and SGD step of the student), stage-2 training
(segmentation step), inference (model forward in eval mode under ``torch.no_grad``) and, separately, the
synthetic training pairs (batched synthesis on the device from the built-in dataset, category ``brick``). It
also reports peak memory: ``torch.cuda.max_memory_allocated`` per phase on CUDA, the process peak RSS
(``ru_maxrss``) on CPU.

Batches are built before timing, so the training and inference rates exclude the synthesis. Each phase runs
warm-up steps, then timed steps (synchronised on CUDA). Then one more pass per stage splits a whole step (its
batch's synthesis included) into synthesis, teacher, student, segmentation network, optimiser, and backward
with the losses (the rest), by forward hooks on the three networks and optimiser hooks, synchronised on CUDA.

With ``--deploy`` (or ``--deploy-only``) it also times deployment on CPU: the inference graph (map and score,
:class:`dmdd_core.export.InferenceGraph`) in torch against its ONNX export in onnxruntime, at batch 1 and 16 on
the same threads, for each preset's input size.

Run::

    python benchmarks/speed.py                                   # fast and paper presets, auto device
    python benchmarks/speed.py --presets paper --device cuda --amp fp16 --channels-last --json speed.json
    python benchmarks/speed.py --presets smoke --steps 1         # a few seconds
    python benchmarks/speed.py --deploy-only --threads 2         # inference: torch against onnxruntime, batch 1 and 16

On CPU the paper preset runs at batch 8 instead of 32 unless ``--batch-size`` is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dmdd_core.config import AMP_MODES, PRESETS, DMDDConfig
from dmdd_core.data import SyntheticPairs, TrainPair, ensure_builtin_dataset
from dmdd_core.model import DMDD, Teacher, build_teacher
from dmdd_core.train import (
    autocast_for,
    build_optimizers,
    grad_scaler_for,
    precision_for,
    select_device,
    train_step,
)

CPU_PAPER_BATCH = 8
DEFAULT_STEPS = {"cpu": 5, "cuda": 20}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 5}
MIB = 2**20


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training and inference throughput of DMDD per preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--presets", nargs="+", default=["fast", "paper"], choices=sorted(PRESETS))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per phase (default: 5 on CPU, 20 on CUDA)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per phase (default: 2 on CPU, 5 on CUDA)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"training batch for every preset (default: the preset's; {CPU_PAPER_BATCH} for paper on CPU)",
    )
    parser.add_argument("--infer-batch", type=int, default=None, help="inference batch (default: the training batch)")
    parser.add_argument("--prebuilt", type=int, default=3, help="distinct batches built before timing, then cycled")
    parser.add_argument("--teacher", default="auto", help="auto, resnet18, tf_efficientnet_lite0 or a timm name")
    parser.add_argument("--teacher-weights", default=None, help="state dict file for the teacher")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES,
                        help="mixed precision as in training: auto (bf16 or fp16 by the GPU, fp32 on CPU), bf16, fp16, off")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (CUDA only)")
    parser.add_argument("--data", default=None, help="dataset root in MVTec AD layout (default: the built-in dataset)")
    parser.add_argument("--category", default="brick")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--deploy", action="store_true",
                        help="also time deployment on CPU: the inference graph in torch and exported to ONNX for "
                             "onnxruntime, at --deploy-batches (needs the deploy extra)")
    parser.add_argument("--deploy-only", dest="deploy_only", action="store_true",
                        help="time deployment only, no training phases (implies --deploy)")
    parser.add_argument("--deploy-batches", dest="deploy_batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--deploy-threads", dest="deploy_threads", type=int, default=2,
                        help="threads of torch and of onnxruntime in the deployment timing")
    parser.add_argument("--deploy-seconds", dest="deploy_seconds", type=float, default=3.0,
                        help="time each deployment rate for at least this long (after one warm-up call)")
    args = parser.parse_args(argv)
    args.deploy = args.deploy or args.deploy_only
    if min(args.deploy_batches) < 1:
        parser.error("--deploy-batches must be >= 1")
    for name in ("steps", "warmup", "batch_size", "infer_batch", "prebuilt", "threads", "deploy_threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'warmup' else '>= 1'}")
    return args


# --- measurement helpers -----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, step: Callable[[int], None], warmup: int, steps: int) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for i in range(warmup):
        step(i)
    _sync(device)
    started = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    return time.perf_counter() - started


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / MIB
    return None


def process_peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def build_batches(pairs: SyntheticPairs, count: int, device: torch.device) -> tuple[list[TrainPair], float]:
    """``count`` training batches, and the synthesis throughput (img/s) measured making them on ``device``."""
    pairs.batch(count)  # warm-up
    _sync(device)
    started = time.perf_counter()
    batches = [pairs.batch(step) for step in range(count)]
    _sync(device)
    return batches, count * pairs.batch_size / (time.perf_counter() - started)


class StepBreakdown:
    """Seconds spent in the teacher, the student, the segmentation network and the optimiser during a training
    step, from forward hooks and optimiser step hooks (synchronised on CUDA, which slows the step a little)."""

    PARTS = ("teacher", "student", "segmentation")

    def __init__(self, model: DMDD, optimizers: Sequence[torch.optim.Optimizer], device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys((*self.PARTS, "optimizer"), 0.0)
        self._started: dict[str, float] = {}
        self._handles = []
        for part in self.PARTS:
            module = getattr(model, part)
            self._handles.append(module.register_forward_pre_hook(lambda *_, p=part: self._start(p)))
            self._handles.append(module.register_forward_hook(lambda *_, p=part: self._stop(p)))
        for opt in optimizers:
            self._handles.append(opt.register_step_pre_hook(lambda *_: self._start("optimizer")))
            self._handles.append(opt.register_step_post_hook(lambda *_: self._stop("optimizer")))

    def _start(self, part: str) -> None:
        _sync(self.device)
        self._started[part] = time.perf_counter()

    def _stop(self, part: str) -> None:
        _sync(self.device)
        self.seconds[part] += time.perf_counter() - self._started.pop(part)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def step_breakdown(model: DMDD, pairs: SyntheticPairs, cfg: DMDDConfig, stage: int,
                   optimizer: torch.optim.Optimizer, device: torch.device, steps: int,
                   memory_format: torch.memory_format, scaler: torch.amp.GradScaler) -> dict[str, float]:
    """Milliseconds per step of ``stage`` in each part, a whole step being its batch's synthesis and
    :func:`~dmdd_core.train.train_step`: synthesis, teacher, student, segmentation, optimizer, and "backward"
    (the backward pass, the losses and everything else in the step). ``scaler``: the timed phases' own, warmed
    up (a new fp16 scaler skips its first optimiser steps)."""
    autocast = autocast_for(precision_for(cfg, device), device)
    hooks = StepBreakdown(model, [optimizer], device)
    synthesis = total = 0.0
    try:
        for step in range(steps):
            _sync(device)
            started = time.perf_counter()
            batch = TrainPair(*(t.contiguous(memory_format=memory_format) for t in pairs.batch(1000 + step)))
            _sync(device)
            made = time.perf_counter()
            train_step(model, batch, cfg, stage, optimizer, autocast, scaler)
            _sync(device)
            synthesis += made - started
            total += time.perf_counter() - started
    finally:
        hooks.remove()
    parts = {"synthesis": synthesis, **hooks.seconds}
    parts["backward"] = max(0.0, total - sum(parts.values()))
    return {k: 1000 * v / steps for k, v in parts.items()} | {"total": 1000 * total / steps}


def _inference_images(batches: list[TrainPair], size: int) -> torch.Tensor:
    """``size`` anomalous images taken from the prebuilt batches (cycled when more are needed)."""
    pool = torch.cat([b.augmented for b in batches])
    repeats = -(-size // pool.shape[0])
    return pool.repeat(repeats, 1, 1, 1)[:size].contiguous()


# --- one preset --------------------------------------------------------------------------------------------------
def benchmark_preset(
    cfg: DMDDConfig,
    teacher: Teacher,
    dataset_root: Path,
    category: str,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    infer_batch: int,
    prebuilt: int,
) -> dict[str, Any]:
    use_cuda = device.type == "cuda"
    memory_format = torch.channels_last if (use_cuda and cfg.channels_last) else torch.contiguous_format
    precision = precision_for(cfg, device)
    autocast, scaler = autocast_for(precision, device), grad_scaler_for(precision, device)

    pairs = SyntheticPairs.from_config(dataset_root, category, cfg, device=device).load_textures()
    made, data_img_s = build_batches(pairs, prebuilt, device)
    batches = [TrainPair(*(t.contiguous(memory_format=memory_format) for t in b)) for b in made]
    images = _inference_images(batches, infer_batch).contiguous(memory_format=memory_format)

    torch.manual_seed(cfg.seed)
    model = DMDD(cfg, teacher=teacher).to(device)
    model.to(memory_format=memory_format)
    opt_student, opt_seg = build_optimizers(model, cfg)
    memory: dict[str, float | None] = {}

    def stage1(i: int) -> None:
        train_step(model, batches[i % len(batches)], cfg, 1, opt_student, autocast, scaler)

    def stage2(i: int) -> None:
        train_step(model, batches[i % len(batches)], cfg, 2, opt_seg, autocast, scaler)

    def infer(_: int) -> None:
        with torch.no_grad():  # fp32, as dmdd evaluate runs
            model(images)

    _reset_peak(device)
    stage1_s = _timed(device, stage1, warmup, steps)
    memory["stage1"] = _peak_mib(device)
    opt_student.zero_grad(set_to_none=True)

    _reset_peak(device)
    stage2_s = _timed(device, stage2, warmup, steps)
    memory["stage2"] = _peak_mib(device)
    opt_seg.zero_grad(set_to_none=True)

    _reset_peak(device)
    model.eval()
    infer_s = _timed(device, infer, warmup, steps)
    memory["inference"] = _peak_mib(device)

    breakdown = {
        "stage1": step_breakdown(model, pairs, cfg, 1, opt_student, device, max(1, steps), memory_format, scaler),
        "stage2": step_breakdown(model, pairs, cfg, 2, opt_seg, device, max(1, steps), memory_format, scaler),
    }

    result: dict[str, Any] = {
        "preset": cfg.preset_name,
        "device": device.type,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "infer_batch": infer_batch,
        "steps": steps,
        "warmup": warmup,
        "amp": cfg.amp,
        "precision": precision,
        "channels_last": memory_format is torch.channels_last,
        "stage1_img_s": steps * cfg.batch_size / stage1_s,
        "stage2_img_s": steps * cfg.batch_size / stage2_s,
        "inference_img_s": steps * infer_batch / infer_s,
        "data_img_s": data_img_s,
        "stage1_ms_per_step": 1000 * stage1_s / steps,
        "stage2_ms_per_step": 1000 * stage2_s / steps,
        "inference_ms_per_batch": 1000 * infer_s / steps,
        "inference_precision": "fp32",
        "breakdown_ms_per_step": breakdown,
        "breakdown_share": {
            stage: {k: v / parts["total"] for k, v in parts.items() if k != "total"} for stage, parts in breakdown.items()
        },
    }
    if use_cuda:
        result["peak_memory_mib"] = memory
        result["peak_memory_kind"] = "torch.cuda.max_memory_allocated per phase"
    else:
        result["peak_memory_mib"] = {"process": process_peak_rss_mib()}
        result["peak_memory_kind"] = "process peak RSS (ru_maxrss), cumulative over the run so far"
    return result


# --- environment, teacher, table ---------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(seconds of CPU busy on the whole machine, of this process, wall clock); None without /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return busy, sum(os.times()[:2]), time.perf_counter()


def other_processes_cpu_load(since: tuple[float, float, float] | None) -> float | None:
    """Mean number of CPUs other processes kept busy since the snapshot ``since``."""
    now = cpu_snapshot()
    if since is None or now is None or now[2] <= since[2]:
        return None
    return max(0.0, ((now[0] - since[0]) - (now[1] - since[1])) / (now[2] - since[2]))


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        env["device_name"] = torch.cuda.get_device_name(index)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def make_teacher(name: str, weights: str | None) -> tuple[Teacher, str | None]:
    """The teacher (built once, shared by every preset) and the note of ``auto`` falling back, if any."""
    cfg = DMDDConfig.preset("smoke", teacher=name, teacher_weights=weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teacher = build_teacher(cfg)
    note = next((str(w.message) for w in caught if "teacher='auto'" in str(w.message)), None)
    return teacher, note


COLUMNS = [
    ("preset", "preset", "{}"),
    ("device", "device", "{}"),
    ("image", "image_size", "{0}x{0}"),
    ("batch", "batch_size", "{}"),
    ("stage-1 img/s", "stage1_img_s", "{:.1f}"),
    ("stage-2 img/s", "stage2_img_s", "{:.1f}"),
    ("infer img/s", "inference_img_s", "{:.1f}"),
    ("infer batch", "infer_batch", "{}"),
    ("data img/s", "data_img_s", "{:.1f}"),
    ("peak mem MiB", "peak_memory_mib", None),
]


def _memory_cell(memory: dict[str, float | None]) -> str:
    if "process" in memory:
        return f"{memory['process']:.0f} (process)"
    return " / ".join(f"{memory[k]:.0f}" for k in ("stage1", "stage2", "inference"))


def format_table(results: list[dict[str, Any]]) -> str:
    rows = [[title for title, _, _ in COLUMNS]]
    for r in results:
        rows.append([_memory_cell(r[key]) if fmt is None else fmt.format(r[key]) for _, key, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


BREAKDOWN_PARTS = ("synthesis", "teacher", "student", "segmentation", "backward", "optimizer")


def format_breakdown(results: list[dict[str, Any]]) -> str:
    """Where a step's time goes: ms per step and the share of each part, per preset and stage."""
    lines = ["where a step goes (ms per step, share): " + ", ".join(BREAKDOWN_PARTS) + " (backward: with the losses)"]
    for r in results:
        for stage, parts in r["breakdown_ms_per_step"].items():
            cells = ", ".join(f"{p} {parts[p]:.0f} ({parts[p] / parts['total']:.0%})" for p in BREAKDOWN_PARTS)
            lines.append(f"  {r['preset']} {stage}: {parts['total']:.0f} ms = {cells}")
    return "\n".join(lines)


# --- deployment: torch against onnxruntime ----------------------------------------------------------------------
def _rate(call: Callable[[], object], images: int, min_seconds: float, min_calls: int = 3) -> float:
    """Images per second of ``call`` (``images`` per call): one warm-up call, then calls until both
    ``min_calls`` and ``min_seconds`` are reached."""
    call()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        call()
        calls += 1
    return calls * images / (time.perf_counter() - start)


def deploy_rates(cfg: DMDDConfig, teacher: Teacher, folder: Path, batches: Sequence[int], threads: int,
                 min_seconds: float) -> list[dict[str, Any]]:
    """Inference rates on CPU of one preset's model at each batch: the inference graph in torch (fp32, no_grad)
    and its ONNX export in onnxruntime (the session's own run, without the input checks of ``OnnxModel``), both
    on ``threads`` threads (torch's are set by the caller). The student is randomly initialised: the rates do not
    depend on the weights' values."""
    from dmdd_core.export import InferenceGraph, OnnxModel, export_onnx

    model = DMDD(cfg.replace(device="cpu", student_pretrained=False), teacher=teacher).float().cpu().eval()
    path = folder / f"{cfg.preset_name}.onnx"
    started = time.perf_counter()
    export_onnx(model, {}, path)
    export_seconds = time.perf_counter() - started
    graph, runtime = InferenceGraph(model).eval(), OnnxModel(path, threads=threads)
    rows = []
    for batch in batches:
        images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
        array = images.numpy()

        def torch_call(images: torch.Tensor = images) -> object:
            with torch.no_grad():
                return graph(images)

        torch_rate = _rate(torch_call, batch, min_seconds)
        onnx_rate = _rate(lambda array=array: runtime.session.run(None, {"image": array}), batch, min_seconds)
        rows.append({"preset": cfg.preset_name, "input": cfg.image_size, "batch": batch, "threads": threads,
                     "torch_img_s": torch_rate, "onnxruntime_img_s": onnx_rate, "onnx_mb": path.stat().st_size / 1e6,
                     "export_seconds": round(export_seconds, 1)})
        print(f"  {cfg.preset_name} batch {batch}: torch {torch_rate:.2f} img/s, onnxruntime {onnx_rate:.2f} img/s",
              flush=True)
    return rows


def format_deploy(rows: Sequence[dict[str, Any]]) -> str:
    """The deployment table: images/s of torch and onnxruntime per preset and batch, and their ratio."""
    lines = ["| preset | input | batch | threads | torch img/s | onnxruntime img/s | onnxruntime / torch | ONNX file |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['input']}² | {r['batch']} | {r['threads']} | {r['torch_img_s']:.2f} | "
                     f"{r['onnxruntime_img_s']:.2f} | {r['onnxruntime_img_s'] / r['torch_img_s']:.2f}x | "
                     f"{r['onnx_mb']:.0f} MB |")
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark with command line ``argv``; print the table and return the report (as in the JSON)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    device = select_device(args.device)
    steps = args.steps if args.steps is not None else DEFAULT_STEPS["cuda" if device.type == "cuda" else "cpu"]
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP["cuda" if device.type == "cuda" else "cpu"]
    notes: list[str] = []

    if args.data is None:
        dataset_root = ensure_builtin_dataset()
        data_name = f"built-in dataset ({dataset_root})"
    else:
        dataset_root = Path(args.data).expanduser()
        data_name = str(dataset_root)

    teacher, fallback = make_teacher(args.teacher, args.teacher_weights)
    if fallback is not None:
        notes.append(f"teacher 'auto' fell back to {teacher.name}: resnet18 ImageNet weights are not available here")
    if device.type != "cuda" and args.channels_last:
        notes.append("--channels-last applies on CUDA only (as in training); ignored on CPU")

    env = environment(device)
    snapshot = cpu_snapshot()
    time.sleep(0.5)
    busy = other_processes_cpu_load(snapshot)
    if device.type == "cpu" and busy is not None and busy >= 0.25:
        notes.append(f"other processes kept {busy:.1f} CPU(s) busy at start")
    snapshot = cpu_snapshot()
    env.update(teacher=teacher.name, teacher_source=teacher.source, data=data_name, category=args.category)
    print(
        f"torch {env['torch']} | device {device} ({env['device_name']}) | "
        f"threads {env['torch_threads']} (interop {env['torch_interop_threads']}, {env['cpu_count']} CPUs)"
    )
    print(f"teacher: {teacher.name} ({teacher.source}){' [auto]' if args.teacher == 'auto' else ''}")
    print(f"data: {data_name}, category {args.category}; {warmup} warm-up + {steps} timed steps per phase")

    results = []
    for name in [] if args.deploy_only else args.presets:
        overrides: dict[str, Any] = {
            "device": str(device),
            "amp": args.amp,
            "channels_last": args.channels_last,
            "teacher": teacher.name,
        }
        if args.batch_size is not None:
            overrides["batch_size"] = args.batch_size
        elif device.type == "cpu" and name == "paper":
            overrides["batch_size"] = CPU_PAPER_BATCH
            notes.append(
                f"paper on CPU: batch {CPU_PAPER_BATCH} instead of {PRESETS['paper'].get('batch_size', 32)} "
                "(pass --batch-size 32 for the full batch)"
            )
        cfg = DMDDConfig.preset(name, **overrides)
        infer_batch = args.infer_batch if args.infer_batch is not None else cfg.batch_size
        print(f"  {name}: {cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size} ...", flush=True)
        preset_started = time.perf_counter()
        result = benchmark_preset(
            cfg,
            teacher,
            dataset_root,
            args.category,
            device,
            steps=steps,
            warmup=warmup,
            infer_batch=infer_batch,
            prebuilt=args.prebuilt,
        )
        result["seconds"] = round(time.perf_counter() - preset_started, 2)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(result)

    if device.type == "cuda":
        notes.append("peak mem: torch.cuda.max_memory_allocated, stage 1 / stage 2 / inference")
    else:
        notes.append("peak mem: peak RSS of the whole process so far (ru_maxrss), not per phase")
    notes.append("data img/s: batched synthesis of training pairs on the device, excluded from the training rates")

    busy = other_processes_cpu_load(snapshot)
    env["other_processes_cpus_busy"] = None if busy is None else round(busy, 2)
    if device.type == "cpu" and busy is not None and busy >= 0.25:
        notes.append(
            f"other processes kept {busy:.1f} CPU(s) busy on average during the run, so the numbers are "
            f"low{'' if env['torch_threads'] < (env['cpu_count'] or 1) else ' (with every CPU used by torch, far too low: try --threads 1)'}"
        )
    deploy: list[dict[str, Any]] = []
    if args.deploy:
        import tempfile

        threads, before = args.deploy_threads, torch.get_num_threads()
        print(f"deployment on CPU, {threads} threads: torch against onnxruntime", flush=True)
        torch.set_num_threads(threads)
        try:
            with tempfile.TemporaryDirectory() as folder:
                for name in args.presets:
                    cfg = DMDDConfig.preset(name, teacher=teacher.name)
                    deploy += deploy_rates(cfg, teacher, Path(folder), args.deploy_batches, threads,
                                           args.deploy_seconds)
        finally:
            torch.set_num_threads(before)
        notes.append("deployment: the inference graph (map and score) in fp32, random student weights; the ONNX "
                     "export has the normalisation inside; onnxruntime's CPU provider with the same thread count")
    total = time.perf_counter() - started
    if results:
        print()
        print(format_table(results))
        print()
        print(format_breakdown(results))
    if deploy:
        print()
        print(format_deploy(deploy))
    for note in notes:
        print(f"note: {note}")
    print(f"total time: {total:.1f} s")

    report = {"environment": env, "results": results, "deploy": deploy, "notes": notes,
              "total_seconds": round(total, 2)}
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
