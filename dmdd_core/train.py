"""Two-stage training with atomic, resumable checkpoints. [DeSTSeg schedule, METHOD.md section 6]

Stage 1 (steps 1..stage1_steps): the student (encoder, decoder, decouple heads) learns by distillation,
L = L_NGM + lambda * L_AIM; the segmentation network is untouched.
Stage 2 (the remaining steps): the student is frozen in eval mode; the segmentation network learns the synthetic
masks with focal + L1 loss.

The batch of step s is a pure function of (seed, s), made on the training device (see ``SyntheticPairs``), and
the checkpoint holds the model, both optimisers, the gradient scaler, the random state and the log, so a run
interrupted at any checkpoint and resumed ends with exactly the weights of an uninterrupted run. Checkpoint rule: the last step; no checkpoint is ever
chosen on test data. [ours]
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import DMDDConfig, Precision, normalise_saved, progress_disabled, resolve_precision
from .data import (
    CategoryData,
    DataSource,
    InputReport,
    SyntheticPairs,
    TrainPair,
    ValidationDataset,
    as_source,
    default_textures,
)
from .losses import aim_loss, focal_loss, l1_loss, ngm_loss, segmentation_target
from .model import DMDD, Teacher, build_teacher

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.json"
CHECKPOINT_FORMAT = 1
#: Fields that may differ between an interrupted run and its resumption.
RESUMABLE_DIFFERENCES = {"device", "amp", "channels_last", "checkpoint_every", "teacher_weights", "preset_name"}
TIMING_KEYS = ("step", "stage", "seconds", "data_seconds")
"""Log entry fields that are not losses."""
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


SYNTHESIS_VERSION = 2
"""The training batches' recipe as code: 1 per sample in numpy, 2 batched in torch. A run resumed with another
version trains on other batches after the resumption than an uninterrupted run would."""


def precision_for(cfg: DMDDConfig, device: torch.device) -> Precision:
    """The precision ``cfg.amp`` gives on ``device`` (:func:`~dmdd_core.config.resolve_precision`)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return resolve_precision(cfg.amp, device.type, capability)


def legacy_precision(config: dict[str, Any]) -> str:
    """What a checkpoint written before precisions were recorded trained in: fp32 when ``amp`` was off (a bool
    then), unrecorded otherwise (bf16 on a GPU, fp32 on a CPU)."""
    return "fp32" if config.get("amp") is False else "unrecorded"


def autocast_for(precision: Precision, device: torch.device) -> torch.autocast:
    """The autocast context of ``precision`` on ``device`` (disabled for fp32)."""
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.bfloat16),
                          enabled=precision != "fp32")


def grad_scaler_for(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only: fp16 gradients underflow without one; bf16 has fp32's range."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def select_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; a named device that is not available raises a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_optimizers(model: DMDD, cfg: DMDDConfig) -> tuple[torch.optim.SGD, torch.optim.SGD]:
    """SGD, momentum 0.9, weight decay 1e-4; lr 0.4 student, 0.1 segmentation body, 0.01 head. [DeSTSeg]"""
    groups = model.trainable_parameters()
    student = torch.optim.SGD(
        groups["student"], lr=cfg.lr_student, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    seg = torch.optim.SGD(
        [{"params": groups["seg_body"], "lr": cfg.lr_seg}, {"params": groups["seg_head"], "lr": cfg.lr_seg_head}],
        lr=cfg.lr_seg,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    return student, seg


def distillation_step(model: DMDD, batch: TrainPair, cfg: DMDDConfig) -> dict[str, Tensor]:
    """Stage-1 losses for one batch: NGM on the normality branch, AIM on the abnormality branch."""
    teacher_orig = model.teacher_features(batch.original)
    normality, abnormality = model.student_features(batch.augmented)
    losses = {"ngm": ngm_loss(normality, teacher_orig, batch.mask, cfg.ngm_region)}
    if cfg.aim and abnormality is not None:
        teacher_aim = model.teacher_features(batch.augmented) if cfg.aim_teacher_image == "augmented" else teacher_orig
        losses["aim"] = aim_loss(abnormality, teacher_aim, batch.mask, cfg.aim_margin, cfg.aim_normal_term)
        losses["loss"] = losses["ngm"] + cfg.aim_weight * losses["aim"]
    else:
        losses["loss"] = losses["ngm"]
    return losses


def segmentation_step(model: DMDD, batch: TrainPair, cfg: DMDDConfig) -> dict[str, Tensor]:
    """Stage-2 losses for one batch: focal + L1 between the segmentation output and the synthetic mask."""
    with torch.no_grad():
        teacher = model.teacher_features(batch.augmented)
        normality, abnormality = model.student_features(batch.augmented)
    logits = model.segment(teacher, normality, abnormality)
    target = segmentation_target(batch.mask, logits.shape[-2:])
    losses = {"focal": focal_loss(logits, target, cfg.focal_gamma), "l1": l1_loss(logits, target)}
    losses["loss"] = losses["focal"] + losses["l1"]
    return losses


def train_step(
    model: DMDD,
    batch: TrainPair,
    cfg: DMDDConfig,
    stage: int,
    optimizer: torch.optim.Optimizer,
    autocast: torch.autocast,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Tensor]:
    """One optimisation step of ``stage`` (1: distillation, 2: segmentation), with the train/eval modes that
    stage needs: the student trains in stage 1 and is frozen in eval mode in stage 2. With an enabled ``scaler``
    (fp16) the loss is scaled before the backward pass and the step skipped when a gradient overflowed."""
    model.student.train(stage == 1)
    model.segmentation.train(stage == 2)
    with autocast:
        losses = distillation_step(model, batch, cfg) if stage == 1 else segmentation_step(model, batch, cfg)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None or not scaler.is_enabled():
        losses["loss"].backward()
        optimizer.step()
    else:
        scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
    return losses


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
    """The precision it trained in (:func:`precision_summary`), e.g. "bf16", or "fp32 then bf16" for a run resumed
    on another device."""


def precision_summary(sessions: list[dict[str, Any]], default: str = "unrecorded") -> str:
    """The precisions of a run's sessions in order, repeats merged: "bf16", "fp32 then bf16"."""
    names: list[str] = []
    for session in sessions:
        if not names or names[-1] != session["precision"]:
            names.append(session["precision"])
    return " then ".join(names) or default


def saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the fields it predates filled in with their defaults (a field added later keeps the
    behaviour the run was made with only when its default is that behaviour, which is how fields are added)."""
    return {**DMDDConfig().to_dict(), **normalise_saved(saved)}


def _check_resumable(saved: dict[str, Any], cfg: DMDDConfig, path: Path) -> None:
    current = cfg.to_dict()
    saved = saved_config(saved)
    diffs = {
        k: (saved.get(k), current[k])
        for k in current
        if k not in RESUMABLE_DIFFERENCES and saved.get(k) != current[k]
    }
    if diffs:
        shown = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, a, b in ((k, *v) for k, v in diffs.items()))
        raise ValueError(
            f"{path} was written with another configuration ({shown}). "
            "Use another --out folder, or pass resume=False (--no-resume) to start over."
        )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[DMDD, dict[str, Any]]:
    """Rebuild the model from a checkpoint (teacher weights included, so it works offline).

    Returns the model in eval mode and the checkpoint dict (config, step, log, optimiser states...).
    Loaded with ``weights_only=True``: a checkpoint can hold tensors and plain data only.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first (dmdd train --out {path.parent})")
    state = _read_checkpoint(path)
    return model_from_state(state).to(select_device(str(device))).eval(), state


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"cannot read checkpoint {path} ({err}); delete it to train from scratch") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dmdd checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def model_from_state(state: dict[str, Any]) -> DMDD:
    """The model saved in a checkpoint dict; the teacher is rebuilt from the saved weights, not downloaded."""
    teacher = Teacher(state["teacher"]["name"], pretrained=False)
    teacher.source = state["teacher"]["source"]
    model = DMDD(DMDDConfig.from_dict(state["config"]), teacher=teacher)
    model.load_state_dict(state["model"])
    model.training_precision = str(state.get("precision") or legacy_precision(state["config"]))
    return model


def validate(model: DMDD, val: ValidationDataset, step: int) -> dict[str, float]:
    """Image and pixel AUROC on the validation split (its synthetic anomalies), and the F1-max thresholds."""
    from .infer import predict_dataset
    from .metrics import f1_max_threshold, image_auroc, pixel_auroc

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


def train(
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

    The validation share of the training images (``cfg.val_fraction``) is held out; in stage 2 the model is
    checked on it at every checkpoint, and the last step's F1-max thresholds are saved for ``predict``. No
    checkpoint is chosen by it: the rule is the last step.
    A finished checkpoint in ``out_dir`` is loaded instead of training again; an unfinished one is resumed.
    ``stop_at_step`` ends the run early after that global step (with a checkpoint), as an interruption would.
    The first Ctrl-C (or SIGTERM) finishes the running step, writes a checkpoint and stops; a second one stops
    at once, keeping the last checkpoint (:class:`StopRequest`). ``skip_bad`` leaves unreadable
    images out (logged, and counted in ``log.json``) instead of stopping.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT_NAME
    device = select_device(cfg.device)
    if isinstance(data, CategoryData):
        category_data = data
    else:
        category_data = CategoryData.from_config(as_source(data), category, cfg, skip_bad=skip_bad, progress=progress)
    textures = default_textures(category, cfg)
    pairs = SyntheticPairs.from_config(category_data, category, cfg, textures, device=device)
    val = ValidationDataset.from_config(category_data, cfg, textures) if category_data.val_paths else None
    validation: dict[str, Any] = {"history": [], "num_images": len(category_data.val_paths)}

    seed_everything(cfg.seed)
    start_step, log = 0, []
    sessions: list[dict[str, Any]] = []
    state: dict[str, Any] | None = None
    if resume and ckpt_path.is_file():
        state = _read_checkpoint(ckpt_path)
        _check_resumable(state["config"], cfg, ckpt_path)
        model = model_from_state(state)
        model.cfg = cfg
        opt_student, opt_seg = build_optimizers(model, cfg)
        opt_student.load_state_dict(state["opt_student"])
        opt_seg.load_state_dict(state["opt_seg"])
        torch.set_rng_state(state["rng_cpu"])
        start_step, log = int(state["step"]), list(state["log"])
        validation = dict(state.get("validation") or validation)
        sessions = list(state.get("sessions") or [])
        if not sessions and start_step > 0:  # written before sessions were recorded
            sessions.append({"start_step": 0, "device": "unrecorded", "precision": legacy_precision(state["config"])})
        if state.get("synthesis_version", 1) != SYNTHESIS_VERSION:
            warnings.warn(
                f"{ckpt_path} was written with synthesis version {state.get('synthesis_version', 1)}, this package "
                f"makes version {SYNTHESIS_VERSION}: the batches after step {start_step} differ from those an "
                "uninterrupted run of either version would see. Pass resume=False (--no-resume) to start over.",
                stacklevel=2,
            )
    else:
        if teacher is None:
            teacher = build_teacher(cfg)
        # Building a teacher draws random numbers (timm initialises it before loading weights): seed again, so
        # the student starts the same whether the teacher was passed in or built here.
        seed_everything(cfg.seed)
        model = DMDD(cfg, teacher=teacher)
        opt_student, opt_seg = build_optimizers(model, cfg)

    use_cuda = device.type == "cuda"
    memory_format = torch.channels_last if (use_cuda and cfg.channels_last) else torch.contiguous_format
    model.to(device)
    model.to(memory_format=memory_format)
    _move_optimizer(opt_student, device)
    _move_optimizer(opt_seg, device)
    if use_cuda and state is not None and state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(list(state["rng_cuda"]))
    precision = precision_for(cfg, device)
    scaler = grad_scaler_for(precision, device)
    if state is not None and state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    sessions.append({"start_step": start_step, "device": str(device), "precision": precision,
                     "synthesis_version": SYNTHESIS_VERSION})
    if start_step < (cfg.total_steps if stop_at_step is None else min(cfg.total_steps, stop_at_step)):
        pairs.load_textures(progress)  # decoded now, in threads, not in the first steps

    def save(step: int) -> None:
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "config": cfg.to_dict(),
                "category": category,
                "data_root": str(category_data.source.root),
                "data": category_data.source.describe(),
                "split": {
                    "val_fraction": cfg.val_fraction,
                    "val_seed": cfg.val_seed,
                    "train": [p.name for p in category_data.train_paths],
                    "val": [p.name for p in category_data.val_paths],
                },
                "input_report": category_data.report.to_dict(),
                "validation": validation,
                "teacher": {"name": model.teacher.name, "source": model.teacher.source},
                "model": model.state_dict(),
                "opt_student": opt_student.state_dict(),
                "opt_seg": opt_seg.state_dict(),
                # A disabled scaler (bf16, fp32) keeps the state of an earlier fp16 session.
                "scaler": scaler.state_dict() if scaler.is_enabled() else (state or {}).get("scaler", {}),
                "synthesis_version": SYNTHESIS_VERSION,
                "precision": precision_summary(sessions),
                "sessions": sessions,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if use_cuda else [],
                "log": log,
            },
            ckpt_path,
        )
        summary = {
            "config": cfg.to_dict(),
            "category": category,
            "data": category_data.source.describe(),
            "num_train_images": len(category_data.train_paths),
            "input_report": category_data.report.to_dict(),
            "precision": precision_summary(sessions),
            "sessions": sessions,
            "validation": validation,
            "log": log,
        }
        atomic_write_text(json.dumps(summary, indent=1), out / LOG_NAME)

    total = cfg.total_steps
    stop = total if stop_at_step is None else min(total, stop_at_step)
    def result() -> TrainResult:
        model.training_precision = precision_summary(sessions)
        return TrainResult(model.eval(), log, ckpt_path, start_step, validation, category_data.report,
                           precision_summary(sessions))

    if start_step >= stop:
        sessions.pop()  # nothing trained in this session
        return result()

    bar = tqdm(total=total, initial=start_step, desc=f"DMDD {category} {precision}", disable=progress_disabled(progress), file=sys.stderr)
    autocast = autocast_for(precision, device)
    step = start_step
    started = step_started = time.perf_counter()
    stopped_cleanly = False
    with StopRequest() as stop_request:
        try:
            for batch in pairs.batches(start_step, stop):
                data_seconds = time.perf_counter() - step_started
                if memory_format is torch.channels_last:
                    batch = TrainPair(*(t.contiguous(memory_format=memory_format) for t in batch))
                stage = 1 if step < cfg.stage1_steps else 2
                losses = train_step(model, batch, cfg, stage, opt_student if stage == 1 else opt_seg, autocast, scaler)
                step += 1
                entry = {"step": step, "stage": stage, **{k: float(v.detach()) for k, v in losses.items()}}
                entry["seconds"] = round(time.perf_counter() - started, 3)
                entry["data_seconds"] = round(data_seconds, 4)
                log.append(entry)
                bar.set_postfix({k: f"{v:.4f}" for k, v in entry.items() if k not in TIMING_KEYS}, refresh=False)
                bar.set_description(f"DMDD {category} {precision} stage {stage}")
                bar.update(1)
                due = step % cfg.checkpoint_every == 0 or step == stop or step == cfg.stage1_steps
                if due:
                    if val is not None and step > cfg.stage1_steps:
                        checked = validate(model, val, step)
                        validation["history"].append(checked)
                        if step == total:
                            validation["thresholds"] = {
                                "image": checked["image_threshold"],
                                "pixel": checked["pixel_threshold"],
                                "rule": "F1-max on the validation split at the last step",
                            }
                    save(step)
                if stop_request.requested and step < stop:
                    if not due:
                        save(step)
                    stopped_cleanly = True
                    bar.close()
                    print(f"\nstopped after step {step}; checkpoint saved to {ckpt_path}; run again to resume", file=sys.stderr)
                    raise KeyboardInterrupt
                step_started = time.perf_counter()  # the next batch's synthesis starts now
        except KeyboardInterrupt:
            if stop_request.requested and not stopped_cleanly:
                # The second signal: the running step may be half done, so the last checkpoint stays as it is.
                print(f"\nstopped during step {step + 1}; the last checkpoint is kept; run again to resume", file=sys.stderr)
            elif not stop_request.requested and step > start_step:
                # Raised by code between steps (or where signals cannot be caught): save what is done.
                save(step)
                print(f"\ninterrupted at step {step}; checkpoint saved to {ckpt_path}; run again to resume", file=sys.stderr)
            raise
        finally:
            bar.close()
    return result()


class StopRequest:
    """While training, the first Ctrl-C (SIGINT) or SIGTERM asks for a stop after the running step, so the
    checkpoint written then is whole: weights, optimizer and random state of one and the same step, and the
    resumed run equals an uninterrupted one. A second signal stops at once, keeping the last checkpoint.
    Outside the main thread signals cannot be caught, and this does nothing."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (a checkpoint is saved); press Ctrl-C again to stop at once", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def _move_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for values in optimizer.state.values():
        for key, value in values.items():
            if isinstance(value, Tensor):
                values[key] = value.to(device)
