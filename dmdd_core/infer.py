"""Inference: anomaly maps and image scores, evaluation on a test split, and predicting a folder of images.

The anomaly map is the segmentation output (stride 4) bilinearly upsampled to the input size, the image score
the mean of its top-k pixels. [DeSTSeg]

Metrics are computed at the model's input resolution by default: maps and masks at S x S. On request
(``resolution="original"``) they are computed as MVTec AD's official evaluation does, at each test image's own
size: the S x S map upsampled bilinearly to it, the ground-truth mask read at its size, never resized. Every
:class:`Evaluation` says which.
"""

from __future__ import annotations

import csv
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from .baseline import MeanImageBaseline
from .config import plain_progress, progress_disabled, progress_line
from .data import (
    CategoryData,
    DataSource,
    InputReport,
    LabelledDataset,
    TestDataset,
    TestItem,
    ValidationDataset,
    as_source,
    default_textures,
    images_to_tensor,
)
from .data.loading import parallel_map
from .imageio import IMAGE_EXTENSIONS, binary_mask_array, open_image, rgb_array
from .metrics import (
    ImageSet,
    aupro,
    aupro_linear_thresholds,
    aupro_per_image,
    f1_max_threshold,
    image_auroc,
    pixel_metrics,
)
from .model import DMDD, top_k_score
from .padim import PaDiM
from .protocol import (
    AUPRO_DEFINITION,
    CHECKPOINT_RULE,
    HEADLINE_METRICS,
    METRICS,
    RESOLUTIONS,
    label,
    resolution_text,
)

if TYPE_CHECKING:
    from .export import OnnxModel

METRIC_KEYS: dict[str, str] = {m.key: f"{m.label}: {m.definition}" for m in METRICS}
"""What each key of :attr:`Evaluation.metrics` (and ``baseline``) means (:mod:`dmdd_core.protocol`); the two PRO
variants are absent when :func:`evaluate` is called with ``pro_variants=False``, every pixel metric on a split with
image labels only."""
ABSENT_PIXEL_METRICS = "absent: the test split has image labels only (no ground-truth masks)"
"""What result files say of the pixel metrics of a split with image labels only."""


@dataclass
class Predictions:
    """Model outputs for N test images at the model's input size S."""

    maps: np.ndarray
    """(N,S,S) float32 anomaly maps in [0,1]."""
    scores: np.ndarray
    """(N,) float32 image scores."""
    masks: np.ndarray
    """(N,S,S) uint8 ground truth (zeros for good images)."""
    labels: np.ndarray
    """(N,) int, 1 = defective."""
    paths: list[str]
    defect_types: list[str]
    branch_scores: dict[str, np.ndarray] = field(default_factory=dict)
    """(N,) image scores of the student's raw discrepancy maps, by :data:`BRANCHES` key: the mean of the top-k
    pixels of each map, k as the model's own score. They show whether the student or the segmentation network
    limits a model (:attr:`Evaluation.branches`)."""


BRANCHES: dict[str, str] = {
    "normality": "normality discrepancy 1 - cos(T, F_n), before the segmentation network",
    "abnormality": "abnormality discrepancy 1 - cos(T, F_a), before the segmentation network",
}
"""The student's raw maps whose image scores :func:`predict_dataset` records beside the model's own."""


@torch.no_grad()
def predict_batch(model: DMDD | OnnxModel, images: Tensor) -> tuple[Tensor, Tensor]:
    """(B,3,S,S) in [0,1] -> anomaly maps (B,S,S) and scores (B,), on the model's device; an exported ONNX model
    (:class:`~dmdd_core.export.OnnxModel`) runs on onnxruntime's CPU and gives CPU tensors."""
    if not isinstance(model, DMDD):
        maps, scores = model(images)
        return torch.from_numpy(maps), torch.from_numpy(scores)
    device = next(model.parameters()).device
    model.eval()
    out = model(images.to(device))
    return out.anomaly_map[:, 0], out.score


def predict_dataset(model: DMDD, dataset: LabelledDataset, batch_size: int = 16, progress: bool | None = None) -> Predictions:
    """Run the model over a labelled split (test or validation)."""
    from tqdm.auto import tqdm

    maps, scores, masks, labels, paths, types = [], [], [], [], [], []
    branch_scores: dict[str, list[np.ndarray]] = {}
    device = next(model.parameters()).device
    model.eval()
    # An explicit generator: the loader then draws nothing from the global random state, so checking the
    # validation split during training never changes the training's random stream (nor its result).
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    for batch in tqdm(loader, desc="predict", disable=progress_disabled(progress), file=sys.stderr):
        with torch.no_grad():
            out = model(batch.image.to(device))
        maps.append(out.anomaly_map[:, 0].float().cpu().numpy())
        scores.append(out.score.float().cpu().numpy())
        k = model.top_k((out.anomaly_map.shape[-2], out.anomaly_map.shape[-1]))
        for name, branch in (("normality", out.normality_discrepancy), ("abnormality", out.abnormality_discrepancy)):
            if branch is not None:
                branch_scores.setdefault(name, []).append(top_k_score(branch.float(), k).cpu().numpy())
        masks.append(batch.mask[:, 0].numpy().astype(np.uint8))
        labels.append(np.asarray(batch.label))
        paths += list(batch.path)
        types += list(batch.defect_type)
    return Predictions(
        maps=np.concatenate(maps).astype(np.float32),
        scores=np.concatenate(scores).astype(np.float32),
        masks=np.concatenate(masks),
        labels=np.concatenate(labels).astype(int),
        paths=paths,
        defect_types=types,
        branch_scores={name: np.concatenate(parts).astype(np.float32) for name, parts in branch_scores.items()},
    )


@dataclass
class Evaluation:
    """Metrics of one category's test split, with what they were computed on."""

    category: str
    metrics: dict[str, float]
    baseline: dict[str, float]
    """The same metrics for the naive mean-image baseline (:mod:`dmdd_core.baseline`)."""
    resolution: int
    seed: int
    num_images: int
    num_defective: int
    split: str = "test"
    """"test" (the dataset's labelled test images) or "val" (held-out training images, synthetic anomalies)."""
    checkpoint_rule: str = CHECKPOINT_RULE
    data: dict[str, str] = field(default_factory=dict)
    """The dataset it was computed on (root, kind...)."""
    input_report: InputReport = field(default_factory=InputReport)
    """Files skipped (``skip_bad``) or masks resized while loading the split and the baseline's images."""
    predictions: Predictions | None = field(default=None, repr=False)
    metric_resolution: str = "input"
    """Where the pixel metrics were computed: "input" (every map and mask at the model's input size,
    ``resolution``) or "original" (each test image at its own size, as MVTec AD's official evaluation)."""
    metric_sizes: dict[str, int] = field(default_factory=dict)
    """The sizes the pixel metrics were computed at, "WxH" -> number of images."""
    training_precision: str = "unrecorded"
    """The precision the model was trained in (fp32, bf16, fp16); evaluation itself runs in fp32."""
    padim: dict[str, float] = field(default_factory=dict)
    """The same metrics for PaDiM on the model's own teacher (:mod:`dmdd_core.padim`); empty when not asked."""
    padim_fit_seconds: float | None = None
    """The time PaDiM took to fit (its teacher pass over the training images included); None when not run."""
    pixel_labels: bool = True
    """False when the split has image labels only (no ground-truth folder): the pixel metrics are then absent
    from every metrics dict, not zero."""
    branches: dict[str, float] = field(default_factory=dict)
    """Image AUROC of the student's raw discrepancy maps (:data:`BRANCHES`) on the same split: beside
    ``metrics["image_auroc"]`` it tells whether the student (a weak model of normality) or the segmentation
    network (a weak reading of good discrepancies) limits the model."""

    @property
    def metric_resolution_text(self) -> str:
        """In words (:func:`~dmdd_core.protocol.resolution_text`), e.g. "the model's input, 128x128"."""
        return resolution_text(self.metric_resolution, self.resolution, self.metric_sizes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "split": self.split,
            "data": self.data,
            "resolution": self.resolution,
            "seed": self.seed,
            "training_precision": self.training_precision,
            "checkpoint_rule": self.checkpoint_rule,
            "metric_resolution": self.metric_resolution_text,
            "metric_resolution_setting": self.metric_resolution,
            "metric_sizes": self.metric_sizes,
            "aupro_definition": AUPRO_DEFINITION,
            "metric_keys": {k: v for k, v in METRIC_KEYS.items() if k in self.metrics},
            "num_images": self.num_images,
            "num_defective": self.num_defective,
            "dmdd": self.metrics,
            "naive_baseline": self.baseline,
            "padim": self.padim,
            "padim_fit_seconds": self.padim_fit_seconds,
            "pixel_metrics": "computed" if self.pixel_labels else ABSENT_PIXEL_METRICS,
            "branch_image_auroc": self.branches,
            "input": self.input_report.to_dict(),
        }

    def summary(self) -> str:
        """One line: DMDD's headline metrics, each with the baselines' in brackets, and what they were computed on."""
        def figure(key: str) -> str:
            if key not in self.metrics:
                return f"{label(key)} absent"
            others = [f"{name} {d[key]:.3f}" for name, d in (("mean image", self.baseline), ("PaDiM", self.padim))
                      if key in d]
            return f"{label(key)} {self.metrics[key]:.3f}" + (f" ({', '.join(others)})" if others else "")

        where = (f"{self.resolution}x{self.resolution}" if self.metric_resolution == "input"
                 else f"input {self.resolution}x{self.resolution}, metrics at {self.metric_resolution_text}")
        notes = [f"{self.split} split", f"{self.num_images} images", where, f"seed {self.seed}",
                 f"trained in {self.training_precision}"]
        if not self.pixel_labels:
            notes.append("image labels only")
        if self.input_report.summary():
            notes.append(self.input_report.summary())
        return (f"{self.category}: " + ", ".join(figure(k) for k in HEADLINE_METRICS)
                + f" [{'; '.join([', '.join(notes[:5]), *notes[5:]])}]")


def _metrics(labels: np.ndarray, scores: np.ndarray, masks: ImageSet, maps: ImageSet,
             pro_variants: bool = True, pixel: bool = True) -> dict[str, float]:
    """The metrics of :data:`METRIC_KEYS` at the maps' resolution: (N,H,W) arrays, or lists of 2-D arrays of
    each image's size. ``pro_variants=False`` leaves out the two AUPRO variants, ``pixel=False`` (a split with
    image labels only) every pixel metric."""
    metrics = {"image_auroc": image_auroc(labels, scores), "image_f1_max": f1_max_threshold(labels, scores)[0]}
    if not pixel:
        return metrics
    metrics |= {**pixel_metrics(masks, maps), "aupro": aupro(masks, maps)}
    if pro_variants:
        metrics["aupro_per_image"] = aupro_per_image(masks, maps)
        metrics["aupro_linear_200"] = aupro_linear_thresholds(masks, maps, num_thresholds=200)
    return metrics


def _resize_map(anomaly_map: Tensor, size: tuple[int, int]) -> np.ndarray:
    """One (S,S) map -> (H,W) float32, bilinear, ``align_corners=False`` (the model's own upsampling)."""
    resized = F.interpolate(anomaly_map[None, None].float(), size=size, mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()


def upsample_maps(maps: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """(N,S,S) maps -> N float32 maps, map i resized bilinearly to ``sizes[i]`` = (H, W), as
    :func:`predict_folder` resizes a map to its image."""
    if len(maps) != len(sizes):
        raise ValueError(f"{len(maps)} maps but {len(sizes)} sizes")
    return [_resize_map(torch.from_numpy(np.asarray(m, dtype=np.float32)), (int(h), int(w)))
            for m, (h, w) in zip(maps, sizes)]


def _original_mask(item: TestItem) -> np.ndarray:
    """A test item's ground truth at its original size, (H,W) uint8 {0,1}: its mask decoded and binarised, or
    for a good image zeros of the image's size (read from the file's header, the image is not decoded)."""
    if item.mask is None:
        from PIL import Image

        with Image.open(item.image) as img:
            width, height = img.size
        return np.zeros((height, width), dtype=np.uint8)
    return binary_mask_array(open_image(item.mask)).astype(np.uint8)


def original_masks(items: Sequence[TestItem], progress: bool | None = None) -> list[np.ndarray]:
    """The ground truth of each test item at its original size (see :func:`_original_mask`), read in a thread
    pool, in order."""
    return parallel_map(_original_mask, list(items), "read masks", progress)


def original_size_metrics(labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: Sequence[np.ndarray],
                          *, pro_variants: bool = True) -> dict[str, float]:
    """The metrics of :data:`METRIC_KEYS` at each image's original size: map i of ``maps`` (N,S,S) upsampled
    bilinearly (:func:`upsample_maps`) to the shape of its ground truth ``masks[i]`` (2-D, sizes free to
    differ). The upsampled maps live only during the call."""
    return _metrics(labels, scores, masks, upsample_maps(maps, [m.shape for m in masks]), pro_variants)


def evaluate(
    model: DMDD,
    data: str | Path | DataSource,
    category: str,
    *,
    split: str = "test",
    batch_size: int = 16,
    skip_bad: bool = False,
    progress: bool | None = None,
    resolution: str = "input",
    pro_variants: bool = True,
    padim: bool = True,
) -> Evaluation:
    """The metrics of :data:`METRIC_KEYS` for the model on one split of ``data`` (a dataset root of any layout,
    or a source), beside the naive baseline fitted on the same training share.

    ``split`` is "test" (the dataset's labelled test images) or "val" (the held-out share of the training
    images with synthetic anomalies, as chosen by the model's config). ``resolution`` is "input" (maps and
    masks at the model's input size S x S) or "original" (test split only: each S x S map, the model's and the
    baseline's, upsampled bilinearly to its image's own size and compared with the mask read at that size,
    never resized, as MVTec AD's official evaluation does; a mask of another size than its image, accepted when
    their aspect ratios match and listed in the input report, sets the size). ``pro_variants=False`` skips the
    two AUPRO variants, ``padim=False`` the PaDiM baseline (:mod:`dmdd_core.padim`). A test split whose dataset
    has no ground truth at all (:meth:`~dmdd_core.data.DataSource.has_pixel_labels`) gets image metrics only;
    its pixel metrics are absent. ``skip_bad`` leaves unreadable files out and counts them in the report instead of
    stopping. The returned :attr:`Evaluation.predictions` hold the S x S maps in both cases.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {', '.join(map(repr, RESOLUTIONS))}, got {resolution!r}")
    cfg = model.cfg
    size = cfg.image_size
    if split == "val" and resolution == "original":
        raise ValueError(
            f"resolution='original' needs split='test': the validation images are synthesised at the model's "
            f"input size ({size}x{size}) and have no other size; use resolution='input' for the validation split"
        )
    source = as_source(data)
    started, lines = time.perf_counter(), plain_progress(progress)

    def phase(text: str) -> None:  # one plain line per phase where no bar can show (a log file)
        if lines:
            progress_line(f"evaluate {category} ({split}): {text}")

    phase("reading the images")
    category_data = CategoryData.from_config(source, category, cfg, skip_bad=skip_bad, progress=progress)
    report = InputReport().extend(category_data.report)
    dataset: LabelledDataset
    if split == "test":
        dataset = TestDataset(source, category, size, skip_bad=skip_bad, report=report, progress=progress)
    else:
        dataset = ValidationDataset.from_config(category_data, cfg, default_textures(category, cfg))
    phase(f"predicting {len(dataset)} images")
    preds = predict_dataset(model, dataset, batch_size, False if lines else progress)
    pixel = split == "val" or source.has_pixel_labels(category)
    train_images = images_to_tensor(category_data.train_images)
    test_images = dataset.image_tensor()
    phase(f"fitting the baselines on {len(train_images)} training images" + (" (mean image, PaDiM)" if padim else ""))
    baseline = MeanImageBaseline(top_k=cfg.top_k).fit(train_images)
    predictions = {"dmdd": (preds.maps, preds.scores), "mean": baseline.predict(test_images)}
    fitted = PaDiM(model.teacher, seed=cfg.seed).fit(train_images) if padim else None
    if fitted is not None:
        predictions["padim"] = fitted.predict(test_images)
    phase(f"metrics at {resolution} resolution")
    if resolution == "input" or not pixel:
        results = {who: _metrics(preds.labels, scores, preds.masks, maps, pro_variants, pixel)
                   for who, (maps, scores) in predictions.items()}
        sizes = {f"{size}x{size}": len(dataset)}
    else:
        assert isinstance(dataset, TestDataset)
        masks = original_masks(dataset.items, progress)
        # One model's upsampled maps at a time: the masks are the only original-size arrays kept throughout.
        results = {who: original_size_metrics(preds.labels, scores, maps, masks, pro_variants=pro_variants)
                   for who, (maps, scores) in predictions.items()}
        sizes = dict(Counter(f"{m.shape[1]}x{m.shape[0]}" for m in masks))
    phase(f"done in {time.perf_counter() - started:.0f} s: image AUROC {results['dmdd']['image_auroc']:.4f}")
    return Evaluation(
        category=category,
        metrics=results["dmdd"],
        baseline=results["mean"],
        padim=results.get("padim", {}),
        padim_fit_seconds=None if fitted is None else fitted.fit_seconds,
        pixel_labels=pixel,
        branches={name: image_auroc(preds.labels, s) for name, s in preds.branch_scores.items()},
        resolution=size,
        seed=cfg.seed,
        training_precision=model.training_precision,
        num_images=len(dataset),
        num_defective=int(preds.labels.sum()),
        split=split,
        metric_resolution=resolution,
        metric_sizes=sizes,
        data=source.describe(),
        input_report=report,
        predictions=preds,
    )


def image_files(folder: str | Path) -> list[Path]:
    """Every image under ``folder`` (recursive, sorted); a clear error when there is none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return files


def overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H,W,3) image in [0,1] and (H,W) map in [0,1] -> (H,W,3) uint8 with the map in the jet colour map."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(anomaly_map, 0.0, 1.0))[..., :3]
    return (255 * ((1 - alpha) * image + alpha * heat)).round().astype(np.uint8)


def predict_folder(
    model: DMDD | OnnxModel,
    folder: str | Path,
    out_dir: str | Path,
    *,
    thresholds: dict[str, Any] | None = None,
    skip_bad: bool = False,
    batch_size: int = 8,
    progress: bool | None = None,
) -> Path:
    """Predict every image under ``folder``; write to ``out_dir``, mirroring the folder's sub-paths:

    ``maps/<name>.npy`` (float32 anomaly map at the image's own size), ``overlays/<name>.png`` and
    ``scores.csv`` (path, score, width, height). With ``thresholds`` (the ``{"image": t, "pixel": t}`` chosen on
    the validation split at training, saved in the checkpoint) the CSV also says whether each image is
    anomalous, and ``masks/<name>.png`` holds the binary map. Unreadable images raise, or with ``skip_bad`` are
    left out, warned about and listed in ``skipped.csv``. Returns the CSV's path. ``model``: the torch model, or
    an exported ONNX model (:class:`~dmdd_core.export.OnnxModel`) run by the same code path.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from .data import BadInputError, Problem

    files = image_files(folder)
    seen: dict[Path, Path] = {}
    for path in files:
        key = path.relative_to(folder).with_suffix("")
        if key in seen:
            raise ValueError(
                f"{seen[key]} and {path} would write the same map and overlay ({key}); rename one of them"
            )
        seen[key] = path
    root, out = Path(folder), Path(out_dir)
    size = model.cfg.image_size if isinstance(model, DMDD) else model.image_size
    rows, problems = [], []
    fields = ["path", "score", "width", "height"] + (["anomalous"] if thresholds else [])
    for start in tqdm(range(0, len(files), batch_size), desc="predict", disable=progress_disabled(progress), file=sys.stderr):
        chunk, images, resized = [], [], []
        for path in files[start : start + batch_size]:
            try:
                decoded = open_image(path)
            except (ValueError, FileNotFoundError) as err:
                problems.append(Problem(str(path), str(err)))
                continue
            chunk.append(path)
            images.append(rgb_array(decoded))
            resized.append(torch.from_numpy(rgb_array(decoded, (size, size)).transpose(2, 0, 1).copy()))
        if not chunk:
            continue
        inputs = torch.stack(resized)
        maps, scores = predict_batch(model, inputs)
        for path, image, m, s in zip(chunk, images, maps.float().cpu(), scores.float().cpu()):
            h, w = image.shape[:2]
            full = _resize_map(m, (h, w))
            rel = path.relative_to(root).with_suffix("")
            for kind in ("maps", "overlays", "masks") if thresholds else ("maps", "overlays"):
                (out / kind / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(out / "maps" / f"{rel}.npy", full.astype(np.float32))
            Image.fromarray(overlay(image, full)).save(out / "overlays" / f"{rel}.png")
            row: dict[str, Any] = {"path": path.relative_to(root).as_posix(), "score": f"{float(s):.6f}", "width": w, "height": h}
            if thresholds:
                row["anomalous"] = int(float(s) >= thresholds["image"])
                Image.fromarray(((full >= thresholds["pixel"]) * 255).astype(np.uint8)).save(out / "masks" / f"{rel}.png")
            rows.append(row)
    if problems and not skip_bad:
        raise BadInputError(problems, "images")
    _write_csv(out / "skipped.csv", ["path", "reason"], [{"path": p.path, "reason": p.reason} for p in problems])
    for problem in problems:
        warnings.warn(f"skipped {problem}", stacklevel=2)
    return _write_csv(out / "scores.csv", fields, rows)


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` to ``path`` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
