"""Deployment: the inference graph as an ONNX model, a weights-only model file, and the ONNX model's runner.

What runs next to a camera is the inference path only: teacher, decoupled student, segmentation network, the map
and the image score (:class:`InferenceGraph`). Two exports:

- ``dmdd export --format onnx``: that graph for onnxruntime (or any ONNX runtime), with the input normalisation
  *inside* the graph, so a user feeds RGB floats in [0, 1] and nothing else; the input contract, the validation
  thresholds and the training configuration are written into the model's metadata (:func:`contract`).
  :class:`OnnxModel` runs it with onnxruntime and checks its input against that contract.
- ``dmdd export --format torch``: the model's weights, configuration and thresholds, without the optimiser state
  and random-number states a checkpoint keeps for resuming; it loads with ``weights_only=True``
  (:func:`dmdd_core.train.load_checkpoint` reads both).

[ours] Both keep the input size fixed (the size the model was trained at, S x S) and the batch dynamic. The export
path follows ``torch.onnx.export`` with ``dynamo=True`` (PyTorch's exporter since 2.5, built on ``torch.export``);
anomalib writes an export's metadata into a file beside the model, here it travels inside the model file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .model import DMDD, anomaly_map_from_logits, top_k_score

if TYPE_CHECKING:
    from .data import LabelledDataset

ONNX_OPSET = 18
"""The ONNX opset of every export unless ``--opset`` says otherwise (tested with onnxruntime 1.32)."""
MAP_TOLERANCE = 1e-4
"""The largest map difference between onnxruntime and torch an export accepts (maps are in [0, 1])."""
MODEL_KIND = "model"
"""``kind`` of a weights-only model file (a training checkpoint has none)."""
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")
CONTRACT_KEY = "dmdd.contract"
"""The metadata entry of an exported ONNX model that holds :func:`contract` as JSON."""
DEPLOY_EXTRA = "pip install 'dmdd-core[deploy]' (onnx, onnxscript, onnxruntime)"


class MissingExtra(ImportError):
    """A package of the ``deploy`` extra is not installed (the message says how to install it)."""


class InferenceGraph(nn.Module):
    """The inference path of a :class:`~dmdd_core.model.DMDD` at a fixed input size S: image (N,3,S,S) in [0, 1]
    -> anomaly map (N,1,S,S) in [0, 1] and image score (N,). The same computation as ``DMDD.forward``'s
    ``anomaly_map`` and ``score`` (normalisation included), without the discrepancy maps it also returns."""

    def __init__(self, model: DMDD, image_size: int | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.image_size = int(image_size or model.cfg.image_size)
        self.k = model.top_k((self.image_size, self.image_size))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        teacher = self.model.teacher_features(image)
        normality, abnormality = self.model.student_features(image)
        logits = self.model.segment(teacher, normality, abnormality)
        anomaly_map = anomaly_map_from_logits(logits, (self.image_size, self.image_size))
        return anomaly_map, top_k_score(anomaly_map, self.k)


def contract(model: DMDD, state: dict[str, Any], opset: int = ONNX_OPSET) -> dict[str, Any]:
    """What an exported model expects and returns, and where it comes from: written into the ONNX metadata, the
    model file and printed by ``dmdd export``. ``state``: the checkpoint dict the model was loaded from."""
    size = int(model.cfg.image_size)
    teacher = model.teacher
    validation = state.get("validation") or {}
    return {
        "input": {
            "name": INPUT_NAME,
            "shape": ["N", 3, size, size],
            "dtype": "float32",
            "channels": "RGB",
            "range": [0.0, 1.0],
            "resize": f"resize every image to {size} x {size} with PIL's bicubic filter, as in training (another "
                      "filter shifts the scores slightly)",
            "normalisation": {"inside_the_graph": True, "mean": [round(float(v), 6) for v in teacher.mean.flatten()],
                              "std": [round(float(v), 6) for v in teacher.std.flatten()]},
        },
        "outputs": {
            "anomaly_map": {"shape": ["N", 1, size, size], "range": [0.0, 1.0],
                            "meaning": "per-pixel anomaly probability at the input size; upsample bilinearly to "
                                       "the image's own size"},
            "score": {"shape": ["N"], "meaning": f"image score: mean of the {model.top_k((size, size))} largest "
                                                 "pixels of the anomaly map"},
        },
        "thresholds": validation.get("thresholds"),
        "thresholds_meaning": "image: score >= it is anomalous; pixel: map >= it is anomalous; chosen on the "
                              "validation split (normal images with synthetic anomalies) at training",
        "opset": opset,
        "dmdd_version": __version__,
        "teacher": {"name": teacher.name, "source": teacher.source},
        "category": state.get("category"),
        "trained_steps": state.get("step"),
        "training_precision": model.training_precision,
        "config": model.cfg.to_dict(),
    }


def contract_text(info: dict[str, Any], onnx: bool = True) -> str:
    """The contract as a few readable lines (``onnx`` False: the lines true of a torch model file)."""
    i, o = info["input"], info["outputs"]
    norm = i["normalisation"]
    thresholds = info.get("thresholds")
    thresholds_line = "thresholds: " + (f"image {thresholds['image']:.6g}, pixel {thresholds['pixel']:.6g} "
                                        "(validation split)" if thresholds else
                                        "none (trained without a validation split)")
    if not onnx:
        return "\n".join([
            f"input: RGB in [0, 1], {i['shape'][-1]} x {i['shape'][-1]} (dmdd predict resizes); the model normalises",
            thresholds_line,
            f"dmdd {info['dmdd_version']}; teacher {info['teacher']['name']}; category {info.get('category')}; "
            f"{info.get('trained_steps')} training steps",
        ])
    lines = [
        f"input  {i['name']}: float32 {'x'.join(str(d) for d in i['shape'])}, RGB in [0, 1] "
        f"({i['resize']}); normalisation inside the graph (mean {norm['mean']}, std {norm['std']})",
        f"output anomaly_map: {'x'.join(str(d) for d in o['anomaly_map']['shape'])} in [0, 1]",
        f"output score: N ({o['score']['meaning']})",
        thresholds_line,
        f"opset {info['opset']}; dmdd {info['dmdd_version']}; teacher {info['teacher']['name']}; "
        f"category {info.get('category')}; {info.get('trained_steps')} training steps",
    ]
    return "\n".join(lines)


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"{module} is not installed: {DEPLOY_EXTRA}") from err


def export_onnx(model: DMDD, state: dict[str, Any], out: str | Path, *, opset: int = ONNX_OPSET) -> dict[str, Any]:
    """Write the inference graph of ``model`` to ``out`` (ONNX, dynamic batch, opset ``opset``) with
    :func:`contract` in its metadata (key :data:`CONTRACT_KEY`, plus one plain entry per input and output field
    for tools that show metadata); check that onnxruntime reproduces the torch model on two random images.
    Returns the contract with the check's figures under ``"check"``; raises ValueError (and writes nothing) when
    they differ by more than :data:`MAP_TOLERANCE`. ``model`` is moved to the CPU in float32, in place."""
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 5):
        raise MissingExtra(f"dmdd export needs torch >= 2.5 (its ONNX exporter); this is torch {torch.__version__}")
    _require("onnxscript")
    onnx = _require("onnx")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    graph = InferenceGraph(model).eval()
    size = graph.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    tmp = out.with_name(out.name + ".tmp")
    chatter = io.StringIO()  # the exporter narrates each of its passes on stdout: shown only if it fails
    info = contract(model, state, opset)
    try:
        try:
            with contextlib.redirect_stdout(chatter):
                torch.onnx.export(graph, (example,), tmp, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                  opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},),
                                  external_data=False, verbose=False)
        except Exception:
            print(chatter.getvalue(), end="")
            raise
        proto = onnx.load(str(tmp))
        entries = {CONTRACT_KEY: json.dumps(info), "dmdd.input": contract_text(info).splitlines()[0],
                   "dmdd.thresholds": json.dumps(info["thresholds"]), "dmdd.image_size": str(size)}
        for key, value in entries.items():
            prop = proto.metadata_props.add()
            prop.key, prop.value = key, value
        proto.producer_name = "dmdd-core"
        proto.producer_version = __version__
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        maps, scores = OnnxModel(tmp)(example.numpy())
        with torch.no_grad():
            ref_maps, ref_scores = graph(example)
        info["check"] = {"images": 2, "max_map_difference": float(np.abs(maps - ref_maps[:, 0].numpy()).max()),
                         "max_score_difference": float(np.abs(scores - ref_scores.numpy()).max())}
        if not info["check"]["max_map_difference"] <= MAP_TOLERANCE:
            raise ValueError(f"the ONNX export of this model differs from torch by up to "
                             f"{info['check']['max_map_difference']:.2e} in a map pixel (tolerance {MAP_TOLERANCE}); "
                             f"{out} was not written. Try another --opset, or the torch model file (--format torch)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return info


def export_torch(state: dict[str, Any], out: str | Path) -> Path:
    """Write the weights-only model file of a checkpoint dict: model weights, configuration, teacher, thresholds,
    data description, training precision and step; no optimiser, scaler or random-number state, no log. It loads
    with ``torch.load(..., weights_only=True)``, and :func:`dmdd_core.train.load_checkpoint` rebuilds the model
    from it (``dmdd evaluate`` / ``dmdd predict --checkpoint model.pt``); it cannot resume training."""
    from .train import CHECKPOINT_FORMAT, atomic_save

    keep = ("config", "teacher", "model", "precision", "category", "data", "data_root", "step", "synthesis_version")
    model_file = {"format": CHECKPOINT_FORMAT, "kind": MODEL_KIND, **{k: state[k] for k in keep if k in state},
                  "validation": {"thresholds": (state.get("validation") or {}).get("thresholds")}}
    model_file["model"] = {k: v.float() if v.is_floating_point() else v for k, v in model_file["model"].items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(model_file, out)
    return out


class OnnxModel:
    """An exported model run by onnxruntime on CPU: ``model(images)`` -> anomaly maps (N,S,S) and scores (N,),
    numpy float32. ``images``: (N,3,S,S) RGB floats in [0, 1] (numpy or torch). ``threads``: onnxruntime's
    intra-op threads (default: its own choice). :attr:`contract`, :attr:`image_size` and :attr:`thresholds` come
    from the model's metadata; only onnxruntime runs the model (the README shows the same without this class)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}; write one with "
                                    f"dmdd export --checkpoint RUN --format onnx --out {self.path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
            hint = " (a torch checkpoint or model file: pass it as --checkpoint)" if self.path.suffix == ".pt" else ""
            raise ValueError(f"cannot load {self.path} as an ONNX model{hint} ({err})") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        if CONTRACT_KEY not in meta:
            raise ValueError(f"{self.path} has no {CONTRACT_KEY} metadata: it was not written by dmdd export")
        self.contract: dict[str, Any] = json.loads(meta[CONTRACT_KEY])
        self.image_size = int(self.contract["input"]["shape"][-1])
        self.thresholds: dict[str, float] | None = self.contract.get("thresholds")

    def __call__(self, images: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
        array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
        expected = (3, self.image_size, self.image_size)
        if array.ndim != 4 or tuple(array.shape[1:]) != expected:
            raise ValueError(f"{self.path} takes images of shape N x {' x '.join(map(str, expected))} (RGB, resized "
                             f"to {self.image_size} x {self.image_size}); got {tuple(array.shape)}")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"{self.path} takes floats in [0, 1] (normalisation is inside the model); got values "
                             f"in [{array.min():.3g}, {array.max():.3g}]: divide 8-bit images by 255")
        maps, scores = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: array.astype(np.float32, copy=False)})
        return maps[:, 0], scores


@dataclass
class Agreement:
    """How closely an exported ONNX model reproduces the torch model on a labelled split."""

    images: int
    max_map_difference: float
    max_score_difference: float
    torch_image_auroc: float
    onnx_image_auroc: float
    torch_seconds: float
    onnx_seconds: float

    def problems(self, tolerance: float = MAP_TOLERANCE) -> list[str]:
        """What keeps the export from being the same model: maps further apart than ``tolerance``, or image AUROCs
        that differ at 4 decimals. Empty when it is."""
        found = []
        if not self.max_map_difference <= tolerance:
            found.append(f"maps differ by up to {self.max_map_difference:.2e} (tolerance {tolerance})")
        if round(self.torch_image_auroc, 4) != round(self.onnx_image_auroc, 4):
            found.append(f"image AUROC {self.onnx_image_auroc:.4f} against torch's {self.torch_image_auroc:.4f}")
        return found

    def summary(self) -> str:
        return (f"{self.images} images: max |map difference| {self.max_map_difference:.2e}, max |score difference| "
                f"{self.max_score_difference:.2e}; image AUROC torch {self.torch_image_auroc:.4f}, onnxruntime "
                f"{self.onnx_image_auroc:.4f}")


def compare(model: DMDD, onnx_model: OnnxModel, dataset: LabelledDataset, batch_size: int = 16) -> Agreement:
    """Run the torch model and the ONNX model over a labelled split (e.g. ``TestDataset``) and compare maps, scores
    and image AUROC. ``model`` is moved to the CPU in float32, in place."""
    from torch.utils.data import DataLoader

    from .infer import predict_batch
    from .metrics import image_auroc

    model = model.float().cpu().eval()
    diffs, score_diffs, torch_scores, onnx_scores, labels = [], [], [], [], []
    torch_seconds = onnx_seconds = 0.0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator()):
        start = time.perf_counter()
        ref_maps, ref_scores = predict_batch(model, batch.image)
        torch_seconds += time.perf_counter() - start
        start = time.perf_counter()
        maps, scores = onnx_model(batch.image)
        onnx_seconds += time.perf_counter() - start
        diffs.append(float(np.abs(maps - ref_maps.numpy()).max()))
        score_diffs.append(float(np.abs(scores - ref_scores.numpy()).max()))
        torch_scores.append(ref_scores.numpy())
        onnx_scores.append(scores)
        labels.append(np.asarray(batch.label))
    y = np.concatenate(labels).astype(int)
    return Agreement(images=len(y), max_map_difference=max(diffs), max_score_difference=max(score_diffs),
                     torch_image_auroc=image_auroc(y, np.concatenate(torch_scores)),
                     onnx_image_auroc=image_auroc(y, np.concatenate(onnx_scores)),
                     torch_seconds=torch_seconds, onnx_seconds=onnx_seconds)


def file_size_text(path: str | Path) -> str:
    """``"12.3 MB"``: a file's size in megabytes (10^6 bytes)."""
    return f"{Path(path).stat().st_size / 1e6:.1f} MB"
