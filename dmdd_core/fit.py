"""Training one category, end to end: the data, the run state, the loop, validation, progress and stopping.
[ours; the loop itself is :func:`dmdd_core.train.train_loop`]

The validation share of the training images (``cfg.val_fraction``) is held out with synthetic anomalies; in
stage 2 the model is checked on it at every checkpoint, and the last step's F1-max thresholds are saved for
``predict``. No checkpoint is ever chosen by it: the checkpoint rule is the last step
(:data:`dmdd_core.protocol.CHECKPOINT_RULE`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DMDDConfig, log_every, plain_progress, progress_disabled, progress_line
from .data import CategoryData, DataSource, InputReport, SyntheticPairs, ValidationDataset, as_source, default_textures
from .infer import predict_dataset
from .interrupt import StopRequest
from .metrics import f1_max_threshold, image_auroc, pixel_auroc
from .model import DMDD, Teacher
from .protocol import THRESHOLD_RULE
from .train import CHECKPOINT_NAME, TIMING_KEYS, RunState, select_device, train_loop


@dataclass
class TrainResult:
    model: DMDD
    log: list[dict[str, Any]]
    checkpoint: Path
    resumed_from: int
    """The step training started from (0 for a fresh run)."""
    validation: dict[str, Any]
    """Validation-split metrics during training and the thresholds chosen on it (empty without a val split)."""
    input_report: InputReport
    """Training and validation files skipped with ``skip_bad``."""
    precision: str = "unrecorded"
    """The precision it trained in (:func:`~dmdd_core.train.precision_summary`), e.g. "bf16", or
    "fp32 then bf16" for a run resumed on another device."""


def validate(model: DMDD, val: ValidationDataset, step: int) -> dict[str, float]:
    """Image and pixel AUROC on the validation split (its synthetic anomalies), and the F1-max thresholds."""
    was_training = model.training
    preds = predict_dataset(model, val, progress=False)
    model.train(was_training)
    image_f1, image_threshold = f1_max_threshold(preds.labels, preds.scores)
    pixel_f1, pixel_threshold = f1_max_threshold(preds.masks.ravel(), preds.maps.ravel())
    return {
        "step": step,
        "image_auroc": image_auroc(preds.labels, preds.scores),
        "pixel_auroc": pixel_auroc(preds.masks, preds.maps),
        "image_f1_max": image_f1,
        "image_threshold": image_threshold,
        "pixel_f1_max": pixel_f1,
        "pixel_threshold": pixel_threshold,
    }


def run_meta(category: str, data: CategoryData, cfg: DMDDConfig, rotation: str) -> dict[str, Any]:
    """What a checkpoint records about its data: the category, the source, the rotation policy of the synthesis,
    the split and the skipped files."""
    return {
        "category": category,
        "rotation": rotation,
        "data_root": str(data.source.root),
        "data": data.source.describe(),
        "split": {"val_fraction": cfg.val_fraction, "val_seed": cfg.val_seed,
                  "train": [p.name for p in data.train_paths], "val": [p.name for p in data.val_paths]},
        "input_report": data.report.to_dict(),
    }


def fit(
    cfg: DMDDConfig,
    data: str | Path | DataSource | CategoryData,
    category: str,
    out_dir: str | Path,
    *,
    teacher: Teacher | None = None,
    resume: bool = True,
    progress: bool | None = None,
    stop_at_step: int | None = None,
    skip_bad: bool = False,
) -> TrainResult:
    """Train DMDD on one category of ``data`` (a dataset root of any layout, a :class:`DataSource`, or a
    :class:`CategoryData` already loaded), writing ``checkpoint.pt`` and ``log.json`` to ``out_dir``.

    A finished checkpoint in ``out_dir`` is loaded instead of training again; an unfinished one is resumed.
    ``stop_at_step`` ends the run early after that global step (with a checkpoint), as an interruption would.
    The first Ctrl-C (or SIGTERM) finishes the running step, writes a checkpoint and stops; a second one stops
    at once, keeping the last checkpoint (:class:`~dmdd_core.interrupt.StopRequest`). ``skip_bad`` leaves
    unreadable images out (logged, and counted in ``log.json``) instead of stopping.
    """
    out, device = Path(out_dir), select_device(cfg.device)
    if not isinstance(data, CategoryData):
        data = CategoryData.from_config(as_source(data), category, cfg, skip_bad=skip_bad, progress=progress)
    textures = default_textures(category, cfg)
    pairs = SyntheticPairs.from_config(data, category, cfg, textures, device=device)
    val = ValidationDataset.from_config(data, cfg, textures) if data.val_paths else None
    fields = {"meta": run_meta(category, data, cfg, pairs.rotation), "validation": {"history": [], "num_images": len(data.val_paths)}}
    if resume and (out / CHECKPOINT_NAME).is_file():
        state = RunState.restore(out / CHECKPOINT_NAME, cfg, device, **fields)
    else:
        state = RunState.fresh(cfg, teacher, device, **fields)
    start = state.step
    stop = cfg.total_steps if stop_at_step is None else min(cfg.total_steps, stop_at_step)
    if start >= stop:
        state.sessions.pop()  # nothing trained in this session
    else:
        pairs.load_textures(progress)  # decoded now, in threads, not in the first steps
        _train(state, pairs, stop, out, val, progress)
    state.model.training_precision = state.precision_summary
    return TrainResult(state.model.eval(), state.log, out / CHECKPOINT_NAME, start, state.validation, data.report,
                       state.precision_summary)


def _train(state: RunState, pairs: SyntheticPairs, stop: int, out: Path, val: ValidationDataset | None,
           progress: bool | None) -> None:
    """The loop with a progress bar (on a terminal or in a notebook; elsewhere, a plain line every
    :func:`~dmdd_core.config.log_every` steps: :func:`_step_line`), validation at the stage-2 checkpoints, and
    clean stops."""
    from tqdm.auto import tqdm

    cfg, category = state.cfg, state.meta["category"]
    lines = plain_progress(progress)
    bar = tqdm(total=cfg.total_steps, initial=state.step, desc=f"DMDD {category} {state.precision}",
               disable=True if lines else progress_disabled(progress), file=sys.stderr)
    every, since = log_every(cfg.total_steps), [time.perf_counter(), state.step]

    def on_step(entry: dict[str, Any]) -> None:
        bar.set_postfix({k: f"{v:.4f}" for k, v in entry.items() if k not in TIMING_KEYS}, refresh=False)
        bar.set_description(f"DMDD {category} {state.precision} stage {entry['stage']}")
        bar.update(1)
        if lines and (state.step % every == 0 or state.step == stop):
            now = time.perf_counter()
            progress_line(_step_line(category, entry, cfg.total_steps, stop,
                                     (state.step - since[1]) / max(now - since[0], 1e-9)))
            since[:] = [now, state.step]

    def on_checkpoint(state: RunState, scheduled: bool) -> None:
        if scheduled and val is not None and state.step > cfg.stage1_steps:
            checked = validate(state.model, val, state.step)
            state.validation["history"].append(checked)
            if lines:
                progress_line(f"DMDD {category} step {state.step}: validation image AUROC "
                              f"{checked['image_auroc']:.4f}, pixel AUROC {checked['pixel_auroc']:.4f}")
            if state.step == cfg.total_steps:
                state.validation["thresholds"] = {"image": checked["image_threshold"],
                                                  "pixel": checked["pixel_threshold"], "rule": THRESHOLD_RULE}
        state.save(out)

    with StopRequest() as stop_request:
        try:
            stop_request.run(
                lambda: train_loop(state, pairs.batches(state.step, stop), stop, on_step=on_step,
                                   on_checkpoint=on_checkpoint, stop_requested=lambda: stop_request.requested),
                step=lambda: state.step,
                save=lambda: state.save(out),
                checkpoint=out / CHECKPOINT_NAME,
            )
        finally:
            bar.close()


def _step_line(category: str, entry: dict[str, Any], total: int, stop: int, rate: float) -> str:
    """``DMDD brick step 120/1400 (9%) stage 1: ngm 0.1234 aim 0.0567 | 3.21 steps/s | about 6 min 39 s left``:
    the losses of this step, the rate since the previous line, the time to ``stop`` at that rate."""
    step = entry["step"]
    losses = " ".join(f"{k} {v:.4f}" for k, v in entry.items() if k not in TIMING_KEYS)
    left = round((stop - step) / rate) if rate > 0 else 0
    minutes = f"{left // 60} min {left % 60} s" if left >= 60 else f"{left} s"
    return (f"DMDD {category} step {step}/{total} ({100 * step // total}%) stage {entry['stage']}: {losses} | "
            f"{rate:.2f} steps/s | about {minutes} left")
