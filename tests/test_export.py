"""Deployment: the ONNX export reproduces the torch model, ``predict --model`` runs it, and the weights-only model
file round-trips."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from dmdd_core.cli import main
from dmdd_core.config import DMDDConfig
from dmdd_core.data import TestDataset, open_source
from dmdd_core.export import CONTRACT_KEY, Agreement, InferenceGraph, OnnxModel, compare
from dmdd_core.fit import TrainResult
from dmdd_core.model import DMDD, Teacher
from dmdd_core.train import CHECKPOINT_NAME, RunState, load_checkpoint

for _module in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_module, reason="the deploy extra (onnx, onnxscript, onnxruntime) is not installed")


@pytest.fixture(scope="module")
def exported(tutorial_run: TrainResult, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tutorial model exported once for this module by the command line, and what the command printed."""
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", "--checkpoint", str(tutorial_run.checkpoint.parent), "--out", str(out), "--verify"]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def onnx_file(exported: tuple[Path, str]) -> Path:
    return exported[0]


def _scores(path: Path) -> dict[str, float]:
    with path.open() as fh:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(fh)}


def test_inference_graph_is_the_models_map_and_score() -> None:
    cfg = DMDDConfig.preset("smoke", teacher="tf_efficientnet_lite0", teacher_pretrained=False)
    torch.manual_seed(0)
    model = DMDD(cfg, teacher=Teacher("tf_efficientnet_lite0", pretrained=False)).eval()
    images = torch.rand(3, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        out = model(images)
        anomaly_map, score = InferenceGraph(model)(images)
    torch.testing.assert_close(anomaly_map, out.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(score, out.score, rtol=0, atol=0)


def _figure(text: str, before: str, after: str) -> float:
    return float(text.split(before, 1)[1].split(after, 1)[0])


def test_onnx_export_reproduces_the_torch_model_on_the_test_split(exported: tuple[Path, str],
                                                                  tutorial_run: TrainResult) -> None:
    """``dmdd export --verify``: onnxruntime against torch over the built-in brick's test split (60 images, in
    batches of 16 and a last one of 12: the batch dimension is dynamic)."""
    onnx_file, printed = exported
    model, state = load_checkpoint(tutorial_run.checkpoint)
    onnx_model = OnnxModel(onnx_file, threads=2)
    size = model.cfg.image_size
    # the contract: what the model takes and returns, and the thresholds chosen on the validation split
    info = onnx_model.contract
    assert info["input"]["shape"] == ["N", 3, size, size] and info["input"]["normalisation"]["inside_the_graph"]
    assert info["input"]["normalisation"]["mean"] == pytest.approx(model.teacher.mean.flatten().tolist())
    assert info["thresholds"] == state["validation"]["thresholds"] and onnx_model.thresholds is not None
    assert info["opset"] == 18 and info["config"] == model.cfg.to_dict()
    line = next(line for line in printed.splitlines() if "on the test split of brick: 60 images" in line)
    assert _figure(line, "max |map difference| ", ",") <= 1e-4, line
    torch_auroc, onnx_auroc = _figure(line, "image AUROC torch ", ","), float(line.rsplit("onnxruntime ", 1)[1])
    assert onnx_auroc == torch_auroc, line  # printed to 4 decimals
    assert torch_auroc > 0.6  # a model that separates the defects, so the comparison means something


def test_compare_measures_a_difference(onnx_file: Path, tutorial_run: TrainResult, builtin_root: Path) -> None:
    """What ``--verify`` reports is measured: a model whose weights differ from the export's shows it."""
    model, _ = load_checkpoint(tutorial_run.checkpoint)
    with torch.no_grad():
        model.segmentation.head[-1].bias.add_(1.0)  # a different model: every logit one higher
    dataset = TestDataset(open_source(builtin_root), "brick", model.cfg.image_size)
    agreement = compare(model, OnnxModel(onnx_file, threads=2), Subset(dataset, range(0, 60, 10)), batch_size=4)
    assert agreement.images == 6 and agreement.max_map_difference > 0.01 and agreement.max_score_difference > 0.01


def test_export_prints_the_contract_and_the_check(exported: tuple[Path, str]) -> None:
    out, printed = exported
    assert "normalisation inside the graph" in printed and "opset 18" in printed and "thresholds: image" in printed
    assert f"wrote {out}" in printed and f"dmdd predict --model {out}" in printed
    assert "[torch.onnx]" not in printed  # the exporter's own narration stays out of the way
    difference = float(printed.split("max |map difference| ")[1].split(",")[0])
    assert difference <= 1e-4
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta[CONTRACT_KEY])["input"]["channels"] == "RGB"


def test_predict_with_the_onnx_model_gives_the_torch_models_scores(
    onnx_file: Path, tutorial_run: TrainResult, builtin_root: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"  # a few test images of each kind, in their sub-folders
    for kind in ("good", "cut", "stain"):
        (images / kind).mkdir(parents=True)
        for path in sorted((builtin_root / "brick" / "test" / kind).glob("*.png"))[:2]:
            shutil.copy(path, images / kind / path.name)
    assert main(["predict", "--model", str(onnx_file), "--input", str(images), "--out", str(tmp_path / "onnx")]) == 0
    assert main(["predict", "--checkpoint", str(tutorial_run.checkpoint), "--input", str(images),
                 "--out", str(tmp_path / "torch")]) == 0
    onnx_scores, torch_scores = _scores(tmp_path / "onnx" / "scores.csv"), _scores(tmp_path / "torch" / "scores.csv")
    assert onnx_scores.keys() == torch_scores.keys() and len(onnx_scores) == 6
    assert max(abs(onnx_scores[k] - torch_scores[k]) for k in onnx_scores) <= 1e-5
    for kind in ("maps", "overlays", "masks"):  # the same outputs as the torch path, thresholds included
        assert len(list((tmp_path / "onnx" / kind).rglob("*.*"))) == 6
    name = next(iter(onnx_scores)).removesuffix(".png")
    np.testing.assert_allclose(np.load(tmp_path / "onnx" / "maps" / f"{name}.npy"),
                               np.load(tmp_path / "torch" / "maps" / f"{name}.npy"), atol=1e-4, rtol=0)
    # the README's recipe (onnxruntime, numpy and PIL only, the contract read from the model) gives the same score
    import onnxruntime as ort
    from PIL import Image

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    contract = json.loads(session.get_modelmeta().custom_metadata_map["dmdd.contract"])
    size = contract["input"]["shape"][-1]
    image = Image.open(images / f"{name}.png").convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = (np.asarray(image, np.float32) / 255).transpose(2, 0, 1)[None]
    anomaly_map, score = session.run(None, {"image": x})
    assert anomaly_map.shape == (1, 1, size, size)
    assert abs(float(score[0]) - onnx_scores[f"{name}.png"]) <= 1e-5


def test_onnx_model_rejects_input_outside_its_contract(onnx_file: Path, tmp_path: Path) -> None:
    onnx_model = OnnxModel(onnx_file)
    size = onnx_model.image_size
    with pytest.raises(ValueError, match=rf"N x 3 x {size} x {size}"):
        onnx_model(np.zeros((1, 3, size + 1, size), np.float32))
    with pytest.raises(ValueError, match="divide 8-bit images by 255"):
        onnx_model(np.full((1, 3, size, size), 255.0, np.float32))
    with pytest.raises(FileNotFoundError, match="dmdd export"):
        OnnxModel(tmp_path / "missing.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="broken.onnx"):
        OnnxModel(tmp_path / "broken.onnx")


def test_weights_only_model_file_round_trip(smoke_run: TrainResult, builtin_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(smoke_run.checkpoint), "--format", "torch", "--out", str(out)]) == 0
    saved = torch.load(out, map_location="cpu", weights_only=True)
    checkpoint = torch.load(smoke_run.checkpoint, map_location="cpu", weights_only=True)
    assert saved["kind"] == "model" and not {"opt_student", "opt_seg", "rng_cpu", "log"} & saved.keys()
    assert out.stat().st_size < 0.6 * smoke_run.checkpoint.stat().st_size  # the optimiser state is gone
    assert saved["validation"]["thresholds"] == checkpoint["validation"]["thresholds"]
    model, _ = load_checkpoint(out)
    reference, _ = load_checkpoint(smoke_run.checkpoint)
    images = torch.rand(2, 3, model.cfg.image_size, model.cfg.image_size)
    with torch.no_grad():
        torch.testing.assert_close(model(images).anomaly_map, reference(images).anomaly_map, rtol=0, atol=0)
    # a model file cannot resume training: the error says what to do
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT_NAME).write_bytes(out.read_bytes())
    with pytest.raises(ValueError, match="weights-only model file"):
        RunState.restore(run / CHECKPOINT_NAME, model.cfg, torch.device("cpu"))


def test_agreement_names_what_differs() -> None:
    same = Agreement(60, 3e-7, 2e-7, 0.82, 0.82, 1.0, 1.0)
    assert same.problems() == []
    apart = Agreement(60, 2e-3, 1e-3, 0.82001, 0.81990, 1.0, 1.0)
    assert [p.split(" ")[0] for p in apart.problems()] == ["maps", "image"]


def test_export_options_that_do_not_apply_fail_before_writing(smoke_run: TrainResult, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.pt"
    for extra in (["--verify"], ["--opset", "17"]):
        assert main(["export", "--checkpoint", str(smoke_run.checkpoint), "--format", "torch", "--out", str(out),
                     *extra]) == 2
        assert "are for --format onnx" in capsys.readouterr().err and not out.exists()
    assert main(["predict", "--checkpoint", str(tmp_path / "model.onnx"), "--input", str(tmp_path),
                 "--out", str(tmp_path / "preds")]) == 2
    assert "pass it as --model" in capsys.readouterr().err
