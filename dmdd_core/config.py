"""One configuration dataclass for the whole method, with named presets.

Every field carries its provenance, as in the method card (docs/METHOD.md):

- [paper]   stated by the DMDD paper (Liu et al., ACM MM 2024, arXiv 2408.03888);
- [DeSTSeg] a fact of DeSTSeg (Zhang et al., CVPR 2023), the method DMDD extends;
- [ours]    a choice this package makes where the paper is silent. Each one is a field, so the ablation
            notebook can switch it.

Presets: ``paper`` is the full setting of the method card, ``fast`` trains in about three minutes on two CPU
cores, ``smoke`` runs a handful of steps (tests).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

TeacherName = Literal["auto", "resnet18", "wide_resnet50_2", "tf_efficientnet_lite0"] | str


@dataclass
class DMDDConfig:
    """All settings of a DMDD run. Build one with :meth:`preset` and override fields with :meth:`replace`."""

    # --- data and synthesis ---------------------------------------------------------------------------------
    image_size: int = 256
    """Side of the square network input; every image is resized to it. [DeSTSeg: 256]"""
    beta_max: float = 0.8
    """Synthetic anomaly opacity: beta ~ U(0, beta_max) keeps that share of the original image. [DeSTSeg]"""
    perlin_max_scale_exp: int = 5
    """Perlin noise scale 2^k per axis with k in 0..perlin_max_scale_exp (clipped to the image). [DeSTSeg]"""
    perlin_threshold: float = 0.5
    """Perlin noise above this becomes the anomaly mask. [DeSTSeg]"""
    match_grayscale: bool = True
    """Turn textures to grayscale when pasted into a grayscale image, so colour never betrays a synthetic
    anomaly. [ours; DeSTSeg pastes colour textures]"""
    rotate: bool = True
    """Apply the per-category rotation policy before synthesis (METHOD.md section 1). [DeSTSeg]"""
    val_fraction: float = 0.1
    """Share of the normal training images held out as the validation split (never trained on); used for
    thresholds and checks during training, never the test set. 0 disables it. [ours]"""
    val_seed: int = 0
    """Seed of the validation split and of its synthetic anomalies; independent of ``seed``, so every run of a
    category validates on the same images. [ours]"""
    synth_texture: float = 1.0
    """Share of the synthetic anomalies made by pasting a texture inside a Perlin mask. [DeSTSeg: the only one]"""
    synth_patch: float = 0.0
    """Share made of a shifted, rescaled, brightness-changed patch of another normal image inside a Perlin mask.
    [ours]"""
    synth_stroke: float = 0.0
    """Share made of a thin dark or bright curve (scratches, cracks). [ours]"""
    synth_brightness: float = 0.0
    """Share made of a smooth low-frequency brightness change (uneven or dark areas). [ours] The four shares are
    normalised by their sum (:class:`dmdd_core.synthesis.SourceMix`); the validation split keeps the texture
    recipe alone, so that every setting validates on the same anomalies."""
    texture_dir: str | None = None
    """Folder of texture images (DTD in the paper's setting); None: the offline textures shipped with
    installed packages plus procedural ones. [ours]"""

    # --- teacher ---------------------------------------------------------------------------------------------
    teacher: TeacherName = "auto"
    """timm backbone name, or "auto": resnet18 if its weights can be had, else tf_efficientnet_lite0 (offline).
    [DeSTSeg: resnet18; the paper's backbone is not confirmed]"""
    teacher_weights: str | None = None
    """Explicit weight file for the teacher (first choice of the weight sources). [ours]"""
    teacher_pretrained: bool = True
    """False gives a randomly initialised teacher: a test-only option, never a real run."""

    # --- student and decoupling ------------------------------------------------------------------------------
    student: str = "resnet18"
    """Student encoder (a timm name). [DeSTSeg: resnet18]"""
    student_pretrained: bool = False
    """Start the student's encoder from ImageNet weights (the teacher's weight sources: offline for
    tf_efficientnet_lite0) instead of a random initialisation; its decoder stays random. [ours; DeSTSeg and the
    paper: random]"""
    decouple: bool = True
    """Split the student's features into normality and abnormality branches. [paper] False: DeSTSeg's student."""
    decouple_hidden_mult: int = 2
    """Decouple head width: a 1x1 conv C -> mult*C, BN, ReLU, a 1x1 conv, then split in two halves. [ours]"""

    # --- losses ----------------------------------------------------------------------------------------------
    aim: bool = True
    """Train the abnormality branch with Abnormality Inverse Mimicking. [paper] Needs decouple=True."""
    aim_weight: float = 1.0
    """lambda in L = L_NGM + lambda * L_AIM. [ours]"""
    aim_margin: float = 0.0
    """m in max(0, cos(F_a, T) - m) inside the anomaly. [ours]"""
    aim_normal_term: bool = True
    """Also pull the abnormality features to the teacher outside the anomaly. [ours]"""
    aim_teacher_image: Literal["augmented", "original"] = "augmented"
    """Which image the teacher sees for AIM: the anomalous one (what exists at test time) or the normal one.
    [ours]"""
    ngm_region: Literal["all", "normal"] = "all"
    """Average NGM over all pixels (DeSTSeg's denoising loss) or over normal pixels only. [ours]"""

    # --- segmentation network --------------------------------------------------------------------------------
    msn: bool = True
    """Multi-perception segmentation network on both branches with attention. [paper] False: DeSTSeg's head
    on the normality branch."""
    seg_branches: Literal["both", "normality"] = "both"
    """What the multi-perception network reads: the discrepancies of both branches, or of the normality branch
    alone. [ours: the paper's figure shows both]"""
    seg_channels: int = 256
    """Width of the segmentation body. [DeSTSeg]"""
    aspp_rates: tuple[int, int, int] = (6, 12, 18)
    """Atrous rates of the multi-receptive-field block. [DeSTSeg]"""
    focal_gamma: float = 4.0
    """Focal loss exponent. [DeSTSeg]"""

    # --- training --------------------------------------------------------------------------------------------
    stage1_steps: int = 1000
    """Student distillation steps (segmentation net untouched). [DeSTSeg]"""
    stage2_steps: int = 4000
    """Segmentation steps with the student frozen. [DeSTSeg: steps 1001..5000]"""
    batch_size: int = 32
    lr_student: float = 0.4
    lr_seg: float = 0.1
    lr_seg_head: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 250
    """Steps between checkpoints; the last step is always written (and evaluated: :data:`dmdd_core.protocol.CHECKPOINT_RULE`). [ours]"""

    # --- inference -------------------------------------------------------------------------------------------
    top_k: int = 100
    """Image score: mean of the top-k pixels of the anomaly map (k scaled with the map area). [DeSTSeg: 100
    at 256^2]"""

    # --- device ----------------------------------------------------------------------------------------------
    device: str = "auto"
    """"auto" picks CUDA when available, else CPU."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Mixed precision of training. "auto": bf16 autocast on a GPU that computes bf16 natively (compute capability
    >= 8.0), fp16 autocast with a gradient scaler below that (T4, V100: their bf16 is emulated and slower than
    fp32), fp32 on a CPU; "bf16", "fp16" or "off" (fp32) force one (:func:`resolve_precision`). [ours]"""
    channels_last: bool = False
    """channels_last memory format on CUDA. [ours]"""

    preset_name: str = field(default="paper", compare=False)

    # ---------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if isinstance(self.aspp_rates, list):
            self.aspp_rates = tuple(self.aspp_rates)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when a combination cannot work."""
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 and >= 32, got {self.image_size}")
        if self.aim and not self.decouple:
            raise ValueError("aim=True needs decouple=True: AIM trains the abnormality branch")
        if self.msn and not self.decouple:
            raise ValueError("msn=True needs decouple=True: it fuses both branches (use msn=False for DeSTSeg)")
        if self.stage1_steps < 0 or self.stage2_steps < 0:
            raise ValueError("stage1_steps and stage2_steps must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.beta_max < 1.0:
            raise ValueError(f"beta_max must be in [0, 1), got {self.beta_max}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.aim_teacher_image not in ("augmented", "original"):
            raise ValueError(f"aim_teacher_image must be 'augmented' or 'original', got {self.aim_teacher_image!r}")
        if self.seg_branches not in ("both", "normality"):
            raise ValueError(f"seg_branches must be 'both' or 'normality', got {self.seg_branches!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        shares = (self.synth_texture, self.synth_patch, self.synth_stroke, self.synth_brightness)
        if min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(f"synth_texture, synth_patch, synth_stroke and synth_brightness must be >= 0 with a "
                             f"positive sum, got {shares}")
        if self.ngm_region not in ("all", "normal"):
            raise ValueError(f"ngm_region must be 'all' or 'normal', got {self.ngm_region!r}")

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    # --- presets ---------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str = "paper", **overrides: Any) -> DMDDConfig:
        """A named preset (``paper``, ``fast``, ``smoke``, ``destseg``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls(preset_name=name, **values)

    def replace(self, **changes: Any) -> DMDDConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["aspp_rates"] = list(self.aspp_rates)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DMDDConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**normalise_saved({k: v for k, v in d.items() if k in known}))


AMP_MODES: tuple[str, ...] = ("auto", "bf16", "fp16", "off")
"""Values of ``amp``."""
Precision = Literal["bf16", "fp16", "fp32"]


def normalise_saved(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict as saved by an earlier version, in today's values: ``amp`` was a bool (bf16 on CUDA)."""
    if isinstance(d.get("amp"), bool):
        d = {**d, "amp": "bf16" if d["amp"] else "off"}
    return d


def resolve_precision(amp: str, device_type: str, capability: tuple[int, int] | None = None) -> Precision:
    """The precision a run computes in: ``amp`` ("auto", "bf16", "fp16" or "off") on a device of ``device_type``
    ("cuda", "cpu", ...) whose CUDA compute capability is ``capability`` (asked of the current GPU when None).

    "auto": bf16 where the GPU has bf16 arithmetic (compute capability >= 8.0: A100, RTX 30xx and later, H100),
    fp16 below that (T4 is 7.5, V100 7.0: torch reports bf16 as supported there, but emulates it), fp32 off CUDA.
    A forced mode is kept on any device (autocast runs on a CPU too, slowly). [ours]
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off":
        return "fp32"
    if amp != "auto":
        return amp  # type: ignore[return-value]
    if device_type != "cuda":
        return "fp32"
    if capability is None:
        import torch

        capability = torch.cuda.get_device_capability()
    return "bf16" if capability >= (8, 0) else "fp16"


def is_fast_mode() -> bool:
    """True when DMDD_FAST is set to 1/true/yes: notebooks and tests switch to the ``fast`` preset."""
    return os.environ.get("DMDD_FAST", "").strip().lower() in ("1", "true", "yes")


def runs_dir(*parts: str) -> Path:
    """Where training runs go, the notebooks' and the command line's default ``--out``: ``$DMDD_RUNS`` if set (the
    test suite sets one folder for the whole session, so a model trained once is loaded everywhere else), else
    ``$DMDD_HOME/runs`` (one root for data and runs, e.g. a Drive folder on Colab), else ``runs/``."""
    home = os.environ.get("DMDD_HOME", "").strip()
    default = str(Path(home) / "runs") if home else "runs"
    return Path(os.environ.get("DMDD_RUNS", "").strip() or default).expanduser().joinpath(*parts)


TUTORIAL_FAST_MODE: dict[str, Any] = {"stage1_steps": 100, "stage2_steps": 60, "batch_size": 4}
"""The fast preset shortened for fast mode (DMDD_FAST=1): about a minute and a half on two CPU cores."""


def gpu_preset() -> str:
    """The preset the notebooks train on a GPU: ``lab`` (minutes on a T4), or ``paper`` when ``DMDD_PAPER`` is set
    to 1/true/yes (the one switch for the paper's full setting, hours per category on a T4)."""
    return "paper" if os.environ.get("DMDD_PAPER", "").strip().lower() in ("1", "true", "yes") else "lab"


def tutorial_config(**overrides: Any) -> DMDDConfig:
    """The model the notebooks train and study, and the test suite shares: the ``fast`` preset shortened by
    :data:`TUTORIAL_FAST_MODE` in fast mode; otherwise :func:`gpu_preset` on a GPU (``lab``, or ``paper`` with
    ``DMDD_PAPER=1``), the ``fast`` preset on a CPU. Every notebook that only needs *a* trained model asks for this
    one, so it is trained once."""
    if is_fast_mode():
        return DMDDConfig.preset("fast", **{**TUTORIAL_FAST_MODE, **overrides})
    import torch

    return DMDDConfig.preset(gpu_preset() if torch.cuda.is_available() else "fast", **overrides)


def tutorial_run_name(cfg: DMDDConfig, category: str, data: str = "builtin") -> str:
    """The folder name of a tutorial run under :func:`runs_dir`, e.g. ``builtin_brick_fast_100+60_batch4``."""
    return f"{data}_{category}_{cfg.preset_name}_{cfg.stage1_steps}+{cfg.stage2_steps}_batch{cfg.batch_size}"


def progress_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: forced by ``progress``; else off in fast mode and CI, tqdm's own choice otherwise."""
    if progress is not None:
        return not progress
    if is_fast_mode() or os.environ.get("CI"):
        return True
    return None


def plain_progress(progress: bool | None, stream: Any = None) -> bool:
    """Whether progress goes out as plain lines instead of a bar: progress is wanted (``progress`` True, or None
    outside fast mode and CI) and ``stream`` (stderr) is neither a terminal nor a notebook's output, e.g. a log
    file, ``nohup`` or a cluster job, where a bar would show nothing."""
    import sys

    stream = sys.stderr if stream is None else stream
    if progress_disabled(progress) is True:
        return False
    if getattr(stream, "isatty", lambda: False)():
        return False
    return not type(stream).__module__.startswith("ipykernel")  # Jupyter shows tqdm's widget


def progress_line(text: str, stream: Any = None) -> None:
    """One plain progress line on stderr, flushed, for logs that are not a terminal."""
    import sys

    print(text, file=sys.stderr if stream is None else stream, flush=True)


def log_every(total_steps: int) -> int:
    """Steps between two plain progress lines of a training: ``$DMDD_LOG_EVERY`` if set, else a twentieth of the
    run (at least 1)."""
    every = os.environ.get("DMDD_LOG_EVERY", "").strip()
    return max(1, int(every) if every else total_steps // 20)


PRESETS: dict[str, dict[str, Any]] = {
    # METHOD.md section 6 exactly.
    "paper": {},
    # Two CPU cores, about three minutes of training per category: smaller images, fewer steps, smaller batches;
    # the architecture and losses are the paper preset's. The atrous rates are halved with the image side, so
    # the multi-receptive-field block sees the same share of the image as at 256^2. [ours]
    "fast": dict(
        image_size=128,
        stage1_steps=200,
        stage2_steps=150,
        batch_size=8,
        aspp_rates=(3, 6, 9),
        checkpoint_every=50,
    ),
    # Two CPU cores, at most 15 minutes of training per category at the paper's input size, data preparation
    # included. Measured on a 2-core AMD EPYC at 256^2, batch 8: the paper's 256-channel segmentation body takes
    # 17.1 s per stage-2 step, a 64-channel one 2.4 s, so the body is narrowed and the time goes to the student.
    # On ELPV mono (seed 0, 180 + 120 steps): the random ResNet18 student trained in 985 s to image AUROC 0.933;
    # an EfficientNet-Lite0 student whose encoder starts from ImageNet weights trained in 869 s to 0.946 (PaDiM
    # 0.943). Hence that student, at 160 + 110 steps. Chosen on ELPV mono, the built-in data and validation
    # splits; METHOD.md section 9. [ours]
    "cpu": dict(
        image_size=256,
        student="tf_efficientnet_lite0",
        student_pretrained=True,
        stage1_steps=160,
        stage2_steps=110,
        batch_size=8,
        seg_channels=64,
        checkpoint_every=50,
    ),
    # One T4 (Colab's free GPU, fp16), at most 10 minutes of training per category: every component at the paper's
    # input size; half the batch, a 128-channel segmentation body (the 256-channel one is 80 % of a paper stage-2
    # step's operations), 1000 + 2000 steps. Counted with the ResNet18 teacher (benchmarks/gpu_estimate.py --preset
    # lab --tflops 8 20): 0.65 TFLOP per stage-1 step and 1.14 per stage-2 step (paper: 1.31 and 5.84), 7.1 min of
    # training at 8 TFLOPS sustained (an eighth of the T4's fp16 peak, dmdd_core.estimate), 3.4 min at 20. [ours]
    "lab": dict(
        batch_size=16,
        seg_channels=128,
        stage1_steps=1000,
        stage2_steps=2000,
        checkpoint_every=500,
    ),
    # A handful of steps and a narrow segmentation network: checks that everything runs. [ours]
    "smoke": dict(
        image_size=64,
        stage1_steps=2,
        stage2_steps=2,
        batch_size=2,
        seg_channels=64,
        checkpoint_every=2,
    ),
    # DeSTSeg's architecture and losses: every DMDD switch off. [DeSTSeg]
    "destseg": dict(decouple=False, aim=False, msn=False),
}
