"""Two-stage training: the steps, the run state and the loop. [DeSTSeg schedule, METHOD.md section 6]

Read in this order:

- :func:`train_step`: one optimisation step. Stage 1 (steps 1..stage1_steps): the student (encoder, decoder,
  decouple heads) learns by distillation, L = L_NGM + lambda * L_AIM (:func:`distillation_step`); the
  segmentation network is untouched. Stage 2 (the remaining steps): the student is frozen in eval mode; the
  segmentation network learns the synthetic masks with focal + L1 loss (:func:`segmentation_step`).
- :class:`RunState`: model, optimisers, gradient scaler, step and log; it saves itself as one checkpoint with
  the random state, and restores itself from one.
- :func:`train_loop`: the loop over the batches, with validation and checkpointing as callbacks.

The batch of step s is a pure function of (seed, s) (``SyntheticPairs``), so a run interrupted at any checkpoint
and resumed ends with exactly the weights of an uninterrupted run. :func:`dmdd_core.fit.fit` puts the pieces
together: data, validation, progress, interruption. [ours]
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import DMDDConfig, Precision, normalise_saved, resolve_precision
from .data import TrainPair
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
    """Write ``text`` to a temporary file of its own in the same folder, then rename: a crash never leaves half a
    file, and two processes writing the same file at once (two ranks merging a benchmark) each rename a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    """Stage-1 losses for one batch: NGM on the normality branch, AIM on the abnormality branch. Without
    decoupling the plain student's features take the normality branch's place (NGM is then DeSTSeg's denoising
    loss) and there is no AIM."""
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


def config_differences(saved: dict[str, Any], cfg: DMDDConfig, ignored: Iterable[str] = RESUMABLE_DIFFERENCES,
                       saved_teacher: str | None = None) -> list[str]:
    """The fields (other than ``ignored``) in which a saved config differs from ``cfg``, as readable lines. A
    field that no longer exists changes nothing now and is not listed. ``saved_teacher``: the teacher the saved
    run used; a saved ``teacher="auto"`` stands for it when ``cfg`` names its teacher."""
    current, saved = cfg.to_dict(), saved_config(saved)
    if saved.get("teacher") == "auto" and saved_teacher and cfg.teacher != "auto":
        saved = {**saved, "teacher": saved_teacher}
    skip = set(ignored)
    return sorted(f"{k}: saved {saved.get(k)!r}, now {current[k]!r}" for k in current
                  if k not in skip and saved.get(k) != current[k])


def check_resumable(saved: dict[str, Any], cfg: DMDDConfig, path: Path, saved_teacher: str | None = None) -> None:
    """A clear error when the run saved at ``path`` was made with another configuration than ``cfg``
    (``saved_teacher``: see :func:`config_differences`)."""
    differences = config_differences(saved, cfg, saved_teacher=saved_teacher)
    if differences:
        raise ValueError(
            f"{path} was written with another configuration ({'; '.join(differences)}). "
            "Use another --out folder, or pass resume=False (--no-resume) to start over."
        )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[DMDD, dict[str, Any]]:
    """Rebuild the model from a checkpoint (teacher weights included, so it works offline), or from a weights-only
    model file (``dmdd export --format torch``).

    Returns the model in eval mode and the checkpoint dict (config, step, log, optimiser states...; a model file
    has the weights, configuration, teacher and thresholds only). Loaded with ``weights_only=True``: a checkpoint
    can hold tensors and plain data only.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first (dmdd train --out {path.parent})")
    state = read_checkpoint(path)
    return model_from_state(state).to(select_device(str(device))).eval(), state


def read_checkpoint(path: Path) -> dict[str, Any]:
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
    cfg = DMDDConfig.from_dict(state["config"])
    # Every weight comes from the checkpoint: a pretrained student's encoder is not fetched again.
    model = DMDD(cfg.replace(student_pretrained=False), teacher=teacher)
    model.cfg = cfg
    model.load_state_dict(state["model"])
    model.training_precision = str(state.get("precision") or legacy_precision(state["config"]))
    return model


# --- the run state: everything a checkpoint holds ----------------------------------------------------------------
@dataclass
class RunState:
    """What a run needs to go on from ``step``: the model, both optimisers, the gradient scaler, the log and the
    sessions (device and precision of each start). :meth:`save` writes it with the random state as one
    checkpoint; :meth:`restore` reads it back, so a resumed run continues bit-exactly. ``meta`` (the data, the
    split, the input report) and ``validation`` (the validation split's history and thresholds) are written as
    they are."""

    cfg: DMDDConfig
    model: DMDD
    opt_student: torch.optim.Optimizer
    opt_seg: torch.optim.Optimizer
    device: torch.device
    precision: Precision = "fp32"
    scaler: torch.amp.GradScaler | None = None
    step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    saved_scaler: dict[str, Any] = field(default_factory=dict)
    """The scaler state of an earlier fp16 session, kept while a bf16 or fp32 session runs."""

    @classmethod
    def fresh(cls, cfg: DMDDConfig, teacher: Teacher | None, device: torch.device, **fields: Any) -> RunState:
        """Step 0: a new model seeded with ``cfg.seed`` and its optimisers, on ``device``."""
        seed_everything(cfg.seed)
        if teacher is None:
            teacher = build_teacher(cfg)
        # Building a teacher draws random numbers (timm initialises it before loading weights): seed again, so
        # the student starts the same whether the teacher was passed in or built here.
        seed_everything(cfg.seed)
        model = DMDD(cfg, teacher=teacher)
        return cls(cfg, model, *build_optimizers(model, cfg), device, **fields).start_session()

    @classmethod
    def restore(cls, path: Path, cfg: DMDDConfig, device: torch.device, **fields: Any) -> RunState:
        """The state saved at ``path``, checked to have ``cfg``'s configuration, with its random state set."""
        seed_everything(cfg.seed)
        saved = read_checkpoint(path)
        if saved.get("kind") == "model":
            raise ValueError(f"{path} is a weights-only model file (dmdd export --format torch): it has no optimiser "
                             "state to resume from. Point --out at the run's own folder, or pass resume=False "
                             "(--no-resume) to start over.")
        check_resumable(saved["config"], cfg, path, (saved.get("teacher") or {}).get("name"))
        if saved.get("synthesis_version", 1) != SYNTHESIS_VERSION:
            warnings.warn(
                f"{path} was written with synthesis version {saved.get('synthesis_version', 1)}, this package "
                f"makes version {SYNTHESIS_VERSION}: the batches after step {saved['step']} differ from those an "
                "uninterrupted run of either version would see. Pass resume=False (--no-resume) to start over.",
                stacklevel=3,
            )
        before, now = saved.get("rotation"), fields.get("meta", {}).get("rotation")
        if before is not None and now is not None and before != now:
            warnings.warn(f"{path} trained with the rotation policy {before!r}; its data source now gives {now!r}, so "
                          f"the batches after step {saved['step']} differ from an uninterrupted run's", stacklevel=3)
        model = model_from_state(saved)
        model.cfg = cfg
        opt_student, opt_seg = build_optimizers(model, cfg)
        opt_student.load_state_dict(saved["opt_student"])
        opt_seg.load_state_dict(saved["opt_seg"])
        sessions = list(saved.get("sessions") or [])
        if not sessions and saved["step"] > 0:  # written before sessions were recorded
            sessions.append({"start_step": 0, "device": "unrecorded", "precision": legacy_precision(saved["config"])})
        state = cls(cfg, model, opt_student, opt_seg, device, step=int(saved["step"]), log=list(saved["log"]),
                    sessions=sessions, saved_scaler=dict(saved.get("scaler") or {}), **fields)
        state.validation = dict(saved.get("validation") or state.validation)
        torch.set_rng_state(saved["rng_cpu"])
        state.start_session()
        if state.device.type == "cuda" and saved.get("rng_cuda"):
            torch.cuda.set_rng_state_all(list(saved["rng_cuda"]))
        return state

    def start_session(self) -> RunState:
        """Move model and optimisers to the device, set the precision and its scaler, and record the session."""
        self.model.to(self.device)
        if self.device.type == "cuda" and self.cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        for optimizer in (self.opt_student, self.opt_seg):
            for values in optimizer.state.values():
                for key, value in values.items():
                    if isinstance(value, Tensor):
                        values[key] = value.to(self.device)
        self.precision = precision_for(self.cfg, self.device)
        self.scaler = grad_scaler_for(self.precision, self.device)
        if self.saved_scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(self.saved_scaler)
        self.sessions.append({"start_step": self.step, "device": str(self.device), "precision": self.precision,
                              "synthesis_version": SYNTHESIS_VERSION})
        return self

    def stage(self) -> int:
        """The stage of the next step: 1 (distillation) for steps 1..stage1_steps, then 2 (segmentation)."""
        return 1 if self.step < self.cfg.stage1_steps else 2

    def optimizer(self, stage: int) -> torch.optim.Optimizer:
        return self.opt_student if stage == 1 else self.opt_seg

    @property
    def precision_summary(self) -> str:
        return precision_summary(self.sessions)

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint dict: plain data and tensors only (it loads with ``weights_only=True``)."""
        scaler = self.scaler.state_dict() if self.scaler is not None and self.scaler.is_enabled() else self.saved_scaler
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.cfg.to_dict(),
            **self.meta,
            "validation": self.validation,
            "teacher": {"name": self.model.teacher.name, "source": self.model.teacher.source},
            "model": self.model.state_dict(),
            "opt_student": self.opt_student.state_dict(),
            "opt_seg": self.opt_seg.state_dict(),
            "scaler": scaler,
            "synthesis_version": SYNTHESIS_VERSION,
            "precision": self.precision_summary,
            "sessions": self.sessions,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "log": self.log,
        }

    def save(self, folder: Path) -> Path:
        """Write ``checkpoint.pt`` and the readable ``log.json`` (no weights) to ``folder``, atomically."""
        atomic_save(self.checkpoint(), folder / CHECKPOINT_NAME)
        summary = {"config": self.cfg.to_dict(), **{k: v for k, v in self.meta.items() if k != "split"},
                   "num_train_images": len(self.meta.get("split", {}).get("train", [])),
                   "precision": self.precision_summary, "sessions": self.sessions,
                   "validation": self.validation, "log": self.log}
        atomic_write_text(json.dumps(summary, indent=1), folder / LOG_NAME)
        return folder / CHECKPOINT_NAME


# --- the loop ------------------------------------------------------------------------------------------------------
def train_loop(
    state: RunState,
    batches: Iterable[TrainPair],
    stop: int,
    *,
    on_step: Callable[[dict[str, Any]], None] = lambda entry: None,
    on_checkpoint: Callable[[RunState, bool], None] = lambda state, scheduled: None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> bool:
    """Train ``state`` on ``batches`` (those of steps ``state.step`` .. ``stop - 1``) and return True when it
    reached ``stop``. ``on_step`` gets each log entry (a progress bar); ``on_checkpoint(state, scheduled)`` runs
    every ``checkpoint_every`` steps, at the end of stage 1 and at ``stop`` (``scheduled`` True: validate, then
    save), and when ``stop_requested()`` turns True (``scheduled`` False: save), after which the loop returns."""
    cfg = state.cfg
    autocast = autocast_for(state.precision, state.device)
    channels_last = state.device.type == "cuda" and cfg.channels_last
    started = step_started = time.perf_counter()
    for batch in batches:
        data_seconds = time.perf_counter() - step_started
        if channels_last:
            batch = TrainPair(*(t.contiguous(memory_format=torch.channels_last) for t in batch))
        stage = state.stage()
        losses = train_step(state.model, batch, cfg, stage, state.optimizer(stage), autocast, state.scaler)
        state.step += 1
        entry = {"step": state.step, "stage": stage, **{k: float(v.detach()) for k, v in losses.items()},
                 "seconds": round(time.perf_counter() - started, 3), "data_seconds": round(data_seconds, 4)}
        state.log.append(entry)
        on_step(entry)
        scheduled = state.step % cfg.checkpoint_every == 0 or state.step in (stop, cfg.stage1_steps)
        if scheduled:
            on_checkpoint(state, True)
        if stop_requested() and state.step < stop:  # asked during this step or its checkpoint
            if not scheduled:
                on_checkpoint(state, False)
            return False
        step_started = time.perf_counter()  # the next batch's synthesis starts now
    return state.step >= stop
