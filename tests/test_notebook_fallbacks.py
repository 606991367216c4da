"""Notebooks 07 and 08 on a GPU whose downloads fail (a dead link, no internet): their settings cells fall back to
the built-in dataset and print the download's own instructions, as notebook 00 does. Run here with a faked GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import dmdd_core.download as download
import dmdd_core.estimate as estimate

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _cells(name: str) -> list[str]:
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.fixture
def gpu_without_downloads(monkeypatch: pytest.MonkeyPatch, builtin_root: Path) -> None:
    def unavailable(name: str, *args: Any, **kwargs: Any) -> Path:
        raise download.DownloadUnavailable(f"{name}: the host cannot be reached. Download it by hand from ...")

    monkeypatch.delenv("DMDD_FAST", raising=False)
    monkeypatch.delenv("DMDD_PAPER", raising=False)
    monkeypatch.setenv("DMDD_DATA", str(builtin_root.parent))
    monkeypatch.setattr(download, "download_dataset", unavailable)
    monkeypatch.setattr(download, "download_mvtec_categories", lambda categories, *a, **kw: unavailable("mvtec"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(estimate, "step_flops", lambda cfg, batch=1, device="cpu": dict.fromkeys(
        ("stage1", "stage2", "inference_per_image"), 1e11))


def _run_until(cells: list[str], last: str) -> dict[str, Any]:
    """Execute the code cells up to and including the first one containing ``last`` (no install cell)."""
    namespace: dict[str, Any] = {}
    for cell in cells:
        if cell.startswith("# Install dmdd"):
            continue
        exec(compile(cell, "<cell>", "exec"), namespace)
        if last in cell:
            return namespace
    raise AssertionError(f"no cell contains {last!r}")


def test_notebook_07_on_a_gpu_falls_back_to_the_builtin_data(gpu_without_downloads: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    ns = _run_until(_cells("07_ablations"), "print(describe_plan(base)")
    out = capsys.readouterr().out
    assert "uses the built-in dataset instead" in out and "Download it by hand" in out
    assert ns["CATEGORIES"] == ["brick"] and Path(ns["DATA"]).name.startswith("builtin")
    assert ns["base"].preset_name == "lab" and "Tesla T4" in out and "precision fp16" in out


def test_notebook_08_on_a_gpu_falls_back_to_the_builtin_data(gpu_without_downloads: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    ns = _run_until(_cells("08_benchmark_reproduction"), "print(describe_plan(cfg)")
    out = capsys.readouterr().out
    assert "uses the built-in dataset instead" in out and "offline textures" in out
    assert list(ns["datasets"]) == ["builtin"] and ns["cfg"].texture_dir is None
    assert ns["cfg"].preset_name == "lab" and "Tesla T4" in out
