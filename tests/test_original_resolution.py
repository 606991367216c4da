"""Metrics at the model's input resolution (the default) and at each test image's original size (on request, as
MVTec AD's official evaluation): what each computes on, what the evaluation says, and a hand-made exact case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dmdd_core.infer as infer
from conftest import make_mvtec_tree
from dmdd_core.config import DMDDConfig
from dmdd_core.data import list_test_images
from dmdd_core.infer import METRIC_KEYS, evaluate, original_size_metrics, upsample_maps
from dmdd_core.metrics import aupro, image_auroc, pixel_ap, pixel_auroc
from dmdd_core.model import DMDD

CATEGORY = "part"
SIZES = {  # test image -> the (H, W) its metrics are computed at at the original resolution
    "dent/000.png": (80, 96), "dent/001.png": (80, 96), "dent/002.png": (80, 96),
    "dent/100.png": (90, 60),  # another size
    "dent/101.png": (40, 48),  # a 96x80 image whose mask is 48x40: the mask is never resized, it sets the size
    "good/000.png": (80, 96), "good/001.png": (80, 96),
    "good/100.png": (50, 70),  # another size
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A category of 96x80 images (W x H) with three test images of other sizes or with a smaller mask."""
    root = tmp_path_factory.mktemp("original")
    folder = make_mvtec_tree(root, CATEGORY, n_train=6, defects={"good": 2, "dent": 3}, size=(96, 80))
    rng = np.random.default_rng(0)

    def write(name: str, height: int, width: int, mask_size: tuple[int, int] | None = None) -> None:
        image = rng.integers(60, 160, size=(height, width, 3), dtype=np.uint8)
        if mask_size is not None:
            mask = np.zeros(mask_size, dtype=np.uint8)
            mask[mask_size[0] // 4 : mask_size[0] // 2, mask_size[1] // 3 : mask_size[1] // 2] = 255
            image[np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST)) > 0] = 250
            Image.fromarray(mask).save(folder / "ground_truth" / "dent" / f"{Path(name).stem}_mask.png")
        Image.fromarray(image).save(folder / "test" / name)

    write("good/100.png", 50, 70)
    write("dent/100.png", 90, 60, mask_size=(90, 60))
    write("dent/101.png", 80, 96, mask_size=(40, 48))
    return root


@pytest.fixture(scope="module")
def model() -> DMDD:
    """An untrained smoke-sized model (input 64x64): the metrics' plumbing does not need a good one."""
    torch.manual_seed(0)
    return DMDD(DMDDConfig.preset("smoke", teacher="resnet18", teacher_pretrained=False)).eval()


def ground_truth(root: Path) -> list[np.ndarray]:
    """Each test image's mask at its own size, read by hand (zeros of the image's size for good images)."""
    truth = []
    for item in list_test_images(root, CATEGORY):
        if item.mask is None:
            with Image.open(item.image) as img:
                truth.append(np.zeros((img.height, img.width), dtype=np.uint8))
        else:
            with Image.open(item.mask) as img:
                truth.append((np.asarray(img.convert("L")) > 0).astype(np.uint8))
    return truth


def test_input_resolution_is_the_default_and_unchanged(model: DMDD, root: Path) -> None:
    ev = evaluate(model, root, CATEGORY, progress=False)
    preds = ev.predictions
    assert preds is not None and preds.maps.shape == preds.masks.shape == (8, 64, 64)
    assert ev.metric_resolution == "input" and ev.metric_sizes == {"64x64": 8}
    record = ev.to_dict()
    assert record["metric_resolution"] == "the model's input, 64x64" and record["resolution"] == 64
    assert record["metric_resolution_setting"] == "input"
    for metrics in (ev.metrics, ev.baseline, ev.padim):
        assert list(metrics) == list(METRIC_KEYS) and all(0.0 <= v <= 1.0 for v in metrics.values())
    assert set(record["metric_keys"]) == set(METRIC_KEYS) and "not the reference" in record["metric_keys"]["aupro_per_image"]
    # What the evaluation computed before original resolution existed: the same functions on the (N,S,S) arrays.
    assert ev.metrics["image_auroc"] == image_auroc(preds.labels, preds.scores)
    assert ev.metrics["pixel_auroc"] == pixel_auroc(preds.masks, preds.maps)
    assert ev.metrics["pixel_ap"] == pixel_ap(preds.masks, preds.maps)
    assert ev.metrics["aupro"] == aupro(preds.masks, preds.maps)
    assert "64x64" in ev.summary() and "original" not in ev.summary()


def test_original_resolution_computes_on_each_images_own_size(
    model: DMDD, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[tuple[tuple[int, ...], tuple[int, ...]]]] = []

    def spy(masks: Any, maps: Any, *args: Any, **kwargs: Any) -> float:
        seen.append([(np.shape(m), np.shape(s)) for m, s in zip(masks, maps)])
        return aupro(masks, maps, *args, **kwargs)

    monkeypatch.setattr(infer, "aupro", spy)
    ev = evaluate(model, root, CATEGORY, resolution="original", pro_variants=False, progress=False)
    expected = [(size, size) for size in SIZES.values()]
    assert seen == [expected] * 3  # the model's maps, then the two baselines', each at its image's size
    assert [Path(p).relative_to(root / CATEGORY / "test").as_posix() for p in ev.predictions.paths] == list(SIZES)

    # The same numbers by hand: the model's 64x64 maps upsampled to each ground truth's size, masks as read.
    preds = ev.predictions
    assert preds is not None and preds.maps.shape == (8, 64, 64)  # the predictions keep the input-size maps
    truth = ground_truth(root)
    assert [t.shape for t in truth] == list(SIZES.values())
    maps = [F.interpolate(torch.from_numpy(m)[None, None], size=t.shape, mode="bilinear", align_corners=False)[0, 0]
            .numpy() for m, t in zip(preds.maps, truth)]
    assert ev.metrics["pixel_auroc"] == pixel_auroc(truth, maps)
    assert ev.metrics["pixel_ap"] == pixel_ap(truth, maps)
    assert ev.metrics["aupro"] == aupro(truth, maps)
    assert ev.metrics["image_auroc"] == image_auroc(preds.labels, preds.scores)
    assert set(ev.metrics) == set(ev.baseline) == set(ev.padim) == set(METRIC_KEYS) - {"aupro_per_image", "aupro_linear_200"}

    # What the evaluation says about it.
    assert ev.metric_resolution == "original" and ev.resolution == 64
    assert ev.metric_sizes == {"96x80": 5, "60x90": 1, "48x40": 1, "70x50": 1}
    text = "each image's original size (4 sizes: 5 at 96x80, 1 at 48x40, 1 at 60x90, 1 at 70x50)"
    record = ev.to_dict()
    assert record["metric_resolution"] == text and record["metric_resolution_setting"] == "original"
    assert f"input 64x64, metrics at {text}" in ev.summary()
    assert "101_mask.png" in ev.input_report.resized_masks[0]  # the 64x64 pipeline resized that mask; said so


def test_original_resolution_with_the_pro_variants(model: DMDD, root: Path) -> None:
    ev = evaluate(model, root, CATEGORY, resolution="original", progress=False)
    assert list(ev.metrics) == list(ev.baseline) == list(ev.padim) == list(METRIC_KEYS)
    assert all(0.0 <= v <= 1.0 for v in [*ev.metrics.values(), *ev.baseline.values(), *ev.padim.values()])


def test_validation_split_has_no_original_resolution(model: DMDD, root: Path) -> None:
    with pytest.raises(ValueError, match=r"resolution='original' needs split='test'.*synthesised.*64x64"):
        evaluate(model, root, CATEGORY, split="val", resolution="original", progress=False)


def test_unknown_resolution_lists_the_choices(model: DMDD, root: Path) -> None:
    with pytest.raises(ValueError, match=r"one of 'input', 'original', got 'full'"):
        evaluate(model, root, CATEGORY, resolution="full", progress=False)


def test_upsampling_and_metrics_by_hand() -> None:
    # Two 2x2 maps; image 0 is 2x4 with its column 2 defective, image 1 is good and 1x3.
    maps = np.array([[[0.0, 1.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=np.float32)
    up = upsample_maps(maps, [(2, 4), (1, 3)])
    # Bilinear, align_corners=False, 2 -> 4 columns: samples at x = -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
    np.testing.assert_array_equal(up[0], [[0.0, 0.25, 0.75, 1.0]] * 2)
    np.testing.assert_array_equal(up[1], np.zeros((1, 3)))
    assert all(u.dtype == np.float32 for u in up)
    np.testing.assert_array_equal(upsample_maps(maps, [(2, 2)] * 2), list(maps))  # same size: unchanged
    with pytest.raises(ValueError, match="2 maps but 1 sizes"):
        upsample_maps(maps, [(2, 4)])

    defect = np.zeros((2, 4), dtype=np.uint8)
    defect[:, 2] = 1  # scored 0.75; the anomaly-free pixels: 0, 0, .25, .25, 1, 1 and the good image's 0, 0, 0
    metrics = original_size_metrics(np.array([1, 0]), np.array([0.9, 0.1]), maps, [defect, np.zeros((1, 3), np.uint8)])
    assert metrics["image_auroc"] == 1.0 and metrics["image_f1_max"] == 1.0
    assert metrics["pixel_auroc"] == pytest.approx(7 / 9)  # 0.75 beats 7 of the 9 anomaly-free pixels
    assert metrics["pixel_ap"] == pytest.approx(0.5)  # the two 1.0s come first: precision 2/4 at recall 1
    assert metrics["pixel_f1_max"] == pytest.approx(2 / 3)  # threshold 0.75: precision 1/2, recall 1
    # PRO 0 up to FPR 2/9 (the two 1.0s), then 1 up to the limit 0.3: area (0.3 - 2/9) / 0.3 = 7/27.
    assert metrics["aupro"] == pytest.approx(7 / 27)
    # Image 0 alone has 6 anomaly-free pixels: the two 1.0s already make FPR 1/3 > 0.3 with PRO 0.
    assert metrics["aupro_per_image"] == pytest.approx(0.0)
    # Every kept linear threshold has FPR 2/9: rescaled to 1, the curve is a vertical segment of area 0.
    assert metrics["aupro_linear_200"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2 maps but 1 sizes"):
        original_size_metrics(np.array([1, 0]), np.array([0.9, 0.1]), maps, [defect])


def test_branch_scores_are_the_students_raw_maps_scored_like_the_model(model: DMDD, root: Path) -> None:
    """Each raw discrepancy map's image score is the mean of its top-k pixels, k as the model's own score, and
    the evaluation records the image AUROC of each (the table of what limits a model reads them)."""
    ev = evaluate(model, root, CATEGORY, progress=False, padim=False)
    preds = ev.predictions
    assert preds is not None and set(preds.branch_scores) == {"normality", "abnormality"}
    images = torch.stack([infer.TestDataset(root, CATEGORY, 64)[i].image for i in range(8)])
    with torch.no_grad():
        out = model(images)
    k = model.cfg.top_k * 64 * 64 // 256**2
    assert k >= 1 and model.top_k((64, 64)) == k
    for name, raw in (("normality", out.normality_discrepancy), ("abnormality", out.abnormality_discrepancy)):
        by_hand = np.sort(raw.flatten(1).numpy(), axis=1)[:, -k:].mean(1)
        np.testing.assert_allclose(preds.branch_scores[name], by_hand, rtol=1e-5)
        assert ev.branches[name] == pytest.approx(image_auroc(preds.labels, by_hand))
        assert ev.to_dict()["branch_image_auroc"][name] == ev.branches[name]
    # The model's own score is the same top-k mean over its anomaly map.
    np.testing.assert_allclose(preds.scores, np.sort(out.anomaly_map.flatten(1).numpy(), axis=1)[:, -k:].mean(1),
                               rtol=1e-5)
