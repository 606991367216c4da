"""The map of the method: every component and every connection drawn, and the committed picture up to date."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from dmdd_core.plots import METHOD_MAP_ARROWS, METHOD_MAP_BOXES, method_map, save_figure

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]


def test_the_map_draws_every_part_and_connection(tmp_path: Path) -> None:
    fig = method_map()
    texts = [t.get_text() for t in fig.axes[0].texts]
    for part in ("teacher T", "student S", "decouple heads", "NGM:", "AIM:", "segmentation input",
                 "multi-perception", "anomaly map"):
        assert sum(part in t for t in texts) == 1, part
    assert len(fig.axes[0].patches) == len(METHOD_MAP_BOXES) + len(METHOD_MAP_ARROWS)
    assert {end for _, end, *_ in METHOD_MAP_ARROWS} | {start for start, *_ in METHOD_MAP_ARROWS} == set(METHOD_MAP_BOXES)
    # NGM compares the anomalous image's normality features with the teacher's features of the *normal* image
    assert ("teacher", "ngm", "T(I)", 0.0) in METHOD_MAP_ARROWS and ("heads", "ngm", "F_n", 0.3) in METHOD_MAP_ARROWS
    fresh = np.asarray(Image.open(save_figure(fig, "map", tmp_path)))
    committed = np.asarray(Image.open(ROOT / "figures" / "method_map.png"))
    assert fresh.shape == committed.shape, "run python tools/figures.py --only method_map"


def test_the_readme_and_notebook_00_show_the_map() -> None:
    assert "figures/method_map.png" in (ROOT / "README.md").read_text()
    assert "figures/method_map.png" in (ROOT / "notebooks" / "00_quickstart.ipynb").read_text()


def test_example_maps_on_one_scale_with_colour_bars_and_ground_truth_outlines() -> None:
    from dmdd_core.plots import anomaly_examples

    rng = np.random.default_rng(0)
    masks = [np.pad(np.ones((8, 8)), 12) for _ in range(2)]
    maps = [rng.random((32, 32)) * 0.3 for _ in range(2)]
    fig = anomaly_examples([rng.random((32, 32, 3))] * 2, masks, maps, ["a", "b"], extra={"raw": maps},
                           extra_scale=(0, 1), colorbars=True, contours=True)
    panels, bars = fig.axes[:8], fig.axes[8:]
    assert len(bars) == 2  # the anomaly map row and the extra row
    raw_row = panels[6:8]
    assert all(ax.images[0].get_clim() == (0, 1) for ax in raw_row)  # not each panel's own 0..0.3
    assert all(len(ax.collections) == 1 for ax in panels[4:8]) and not panels[2].collections  # outlines on maps only
    own = anomaly_examples([rng.random((32, 32, 3))] * 2, masks, maps, ["a", "b"], extra={"raw": maps})
    assert own.axes[6].images[0].get_clim()[1] < 0.31 and len(own.axes) == 8
