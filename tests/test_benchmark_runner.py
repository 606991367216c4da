"""The benchmark runner: tasks and ranks, resuming after a stop, tables beside the published numbers, merging,
and sharding over two torchrun processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dmdd_core.fit as fit_module
from dmdd_core.benchmark import PUBLISHED, markdown_report, merge, run_benchmark, summarise
from dmdd_core.cli import main
from dmdd_core.config import DMDDConfig
from dmdd_core.runner import Rank, Task, make_tasks

CATEGORIES = ["brick", "grass"]


def smoke_config(**overrides: Any) -> DMDDConfig:
    return DMDDConfig.preset("smoke", teacher="tf_efficientnet_lite0", device="cpu", **overrides)


# --- tasks and ranks ------------------------------------------------------------------------------------------
def test_tasks_are_category_major_and_checked() -> None:
    assert make_tasks(["a", "b"], [0, 1]) == [Task("a", 0), Task("a", 1), Task("b", 0), Task("b", 1)]
    assert Task("metal_nut", 2).key == "metal_nut__seed2"
    with pytest.raises(ValueError, match="repeat"):
        make_tasks(["a"], [0, 0])
    with pytest.raises(ValueError, match="no categories"):
        make_tasks([], [0])


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_every_task_goes_to_exactly_one_rank(world: int) -> None:
    tasks = make_tasks([f"c{i}" for i in range(5)], [0, 1, 2])
    shards = [Rank(r, world, r).shard(tasks) for r in range(world)]
    assert sorted((t for s in shards for t in s), key=tasks.index) == tasks
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_rank_from_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert Rank.from_env() == Rank(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Rank.from_env() == Rank(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="does not fit"):
        Rank.from_env()
    assert Rank(0, 2, 0).device("cpu") == "cpu"


# --- tables from hand-made records ----------------------------------------------------------------------------
def fake_record(category: str, seed: int, value: float, kind: str = "mvtec") -> dict[str, Any]:
    """A task result whose every metric is ``value`` (a fraction)."""
    metrics = {k: value for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap", "image_f1_max", "pixel_f1_max",
                                  "aupro_per_image", "aupro_linear_200")}
    return {
        "category": category,
        "seed": seed,
        "preset": "paper",
        "config": DMDDConfig.preset("paper", seed=seed).to_dict(),
        "teacher": {"name": "resnet18", "source": "timm"},
        "evaluation": {
            "dmdd": metrics,
            "naive_baseline": {k: 0.5 for k in metrics},
            "data": {"kind": kind, "root": "/data"},
            "metric_resolution": "the model's input, 256x256",
            "num_images": 10,
            "num_defective": 5,
        },
        "train_seconds": 60.0,
        "eval_seconds": 5.0,
        "rank": 0,
        "world_size": 1,
        "device": "cpu",
        "versions": {"torch": "x"},
        "curves": {},
    }


def test_mean_and_std_over_seeds_by_hand() -> None:
    # category a: seeds give 0.90 and 0.94 -> 92 ± 2.83; b: 0.80, 0.82 -> 81 ± 1.41.
    # Dataset mean per seed: (90+80)/2 = 85, (94+82)/2 = 88 -> 86.5 ± 2.12.
    records = [fake_record("a", 0, 0.90), fake_record("a", 1, 0.94), fake_record("b", 0, 0.80), fake_record("b", 1, 0.82)]
    summary = summarise(records, ["image_auroc"])
    assert summary["seeds"] == [0, 1]
    assert summary["categories"]["a"]["image_auroc"] == pytest.approx((92.0, np.std([90, 94], ddof=1)))
    assert summary["categories"]["b"]["image_auroc"] == pytest.approx((81.0, np.std([80, 82], ddof=1)))
    assert summary["mean"]["image_auroc"] == pytest.approx((86.5, np.std([85, 88], ddof=1)))
    report = markdown_report(records)
    assert "| a | 92.00 ± 2.83 |" in report
    assert "| **mean** | **86.50 ± 2.12** |" in report
    assert "mean ± sample std over seeds" in report


def test_report_puts_published_numbers_beside_ours() -> None:
    report = markdown_report([fake_record("bottle", 0, 0.95)])
    assert "| **DMDD (this run)** | this package, paper preset, 1 seed | 95.00 | 95.00 | 95.00 |" in report
    assert "| DMDD | paper (Liu et al., ACM MM 2024) | – | 98.85 | 96.13 |" in report
    for p in PUBLISHED["mvtec"]:
        assert f"| {p.method} | {p.source} |" in report
    for needed in ("metrics computed at: the model's input, 256x256", "checkpoint rule: last step", "reference AUPRO",
                   "seeds: 0", "device: cpu", "wall time: 1.1 min", "versions: torch x"):
        assert needed in report
    assert "## The PRO variants on the same maps" in report
    mpdd = markdown_report([fake_record("tubes", 0, 0.9, kind="mpdd")])
    assert "| 98.10 | 98.96 | 97.66 |" in mpdd
    builtin = markdown_report([fake_record("brick", 0, 0.9, kind="builtin")])
    assert "no published numbers for this dataset (builtin)" in builtin
    assert "incomplete" not in builtin
    assert "**incomplete: 1 of 3 tasks done**" in markdown_report([fake_record("brick", 0, 0.9)], total=3)


# --- a real (smoke) benchmark, stopped midway and resumed -----------------------------------------------------
@pytest.fixture(scope="module")
def stopped_and_resumed(builtin_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run a two-category benchmark whose second training is stopped at step 2 (as Ctrl-C would), then run it
    again, recording which categories the second run trained."""
    out = tmp_path_factory.mktemp("benchmark")
    real_train = fit_module.fit
    monkeypatch = pytest.MonkeyPatch()

    def stopping_train(cfg, data, category, out_dir, **kwargs):
        if category == "grass":
            real_train(cfg, data, category, out_dir, stop_at_step=2, **kwargs)
            raise KeyboardInterrupt
        return real_train(cfg, data, category, out_dir, **kwargs)

    monkeypatch.setattr(fit_module, "fit", stopping_train)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(smoke_config(), builtin_root, out, categories=CATEGORIES, rank=Rank(), progress=False)
    after_stop = {
        "results": sorted(p.name for p in (out / "results").glob("*.json")),
        "grass_checkpoint": (out / "runs" / "grass" / "seed0" / "checkpoint.pt").is_file(),
        "grass_wall_time": json.loads((out / "runs" / "grass" / "seed0" / "wall_time.json").read_text()),
        "merged": (out / "results.md").exists(),
    }
    trained: list[str] = []

    def counting_train(cfg, data, category, out_dir, **kwargs):
        trained.append(category)
        return real_train(cfg, data, category, out_dir, **kwargs)

    monkeypatch.setattr(fit_module, "fit", counting_train)
    table = run_benchmark(smoke_config(), builtin_root, out, categories=CATEGORIES, rank=Rank(), progress=False)
    monkeypatch.undo()
    return {"out": out, "after_stop": after_stop, "trained": trained, "table": table}


def test_a_stopped_benchmark_resumes_where_it_stopped(stopped_and_resumed: dict[str, Any]) -> None:
    stop = stopped_and_resumed["after_stop"]
    assert stop["results"] == ["brick__seed0.json"]
    assert stop["grass_checkpoint"] and stop["grass_wall_time"]["train_seconds"] > 0
    assert not stop["merged"]
    # The finished category is not trained again; the stopped one goes on from its checkpoint.
    assert stopped_and_resumed["trained"] == ["grass"]
    out = stopped_and_resumed["out"]
    grass = json.loads((out / "results" / "grass__seed0.json").read_text())
    assert grass["resumed_from_step"] == 2
    assert grass["train_seconds"] >= stop["grass_wall_time"]["train_seconds"]


def test_benchmark_writes_tables_figures_and_metadata(stopped_and_resumed: dict[str, Any]) -> None:
    out = stopped_and_resumed["out"]
    assert stopped_and_resumed["table"] == out / "results.md"
    report = (out / "results.md").read_text()
    assert "# Benchmark: builtin, smoke preset" in report
    assert "| brick |" in report and "| grass |" in report and "| **mean** |" in report
    assert "no published numbers for this dataset (builtin)" in report
    assert "metrics computed at: the model's input, 64x64" in report
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["category"] for r in rows] == ["brick", "grass", "mean"]
    brick = json.loads((out / "results" / "brick__seed0.json").read_text())
    expected = 100 * brick["evaluation"]["dmdd"]["pixel_auroc"]
    assert float(rows[0]["pixel_auroc"]) == pytest.approx(expected, abs=1e-3)
    grass_pixel = 100 * json.loads((out / "results" / "grass__seed0.json").read_text())["evaluation"]["dmdd"]["pixel_auroc"]
    assert float(rows[2]["pixel_auroc"]) == pytest.approx((expected + grass_pixel) / 2, abs=1e-3)
    per_seed = list(csv.DictReader((out / "results_per_seed.csv").open()))
    assert {r["category"] for r in per_seed} == set(CATEGORIES) and all(float(r["train_seconds"]) > 0 for r in per_seed)
    merged = json.loads((out / "results.json").read_text())
    assert merged["complete"] and merged["tasks_total"] == 2
    for key in ("image_roc", "pixel_roc", "pro"):
        curve = brick["curves"][key]
        assert len(curve["x"]) == len(curve["y"]) >= 2 and np.all(np.diff(curve["x"]) >= 0)
    assert max(brick["curves"]["pro"]["x"]) <= 0.3
    for name in ("curves.png", "brick_seed0_examples.png", "grass_seed0_examples.png"):
        assert (out / "figures" / name).stat().st_size > 10_000
    assert brick["versions"]["torch"] and brick["device"].startswith("CPU")


def test_another_configuration_in_the_same_folder_is_refused(stopped_and_resumed: dict[str, Any], builtin_root: Path) -> None:
    with pytest.raises(ValueError, match="another configuration.*beta_max"):
        run_benchmark(smoke_config(beta_max=0.5), builtin_root, stopped_and_resumed["out"], categories=["brick"],
                      rank=Rank(), progress=False)


def test_other_evaluation_settings_evaluate_again_without_training(stopped_and_resumed: dict[str, Any], builtin_root: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(stopped_and_resumed["out"], out)
    run_benchmark(smoke_config(), builtin_root, out, categories=["brick"], pro_variants=False, rank=Rank(), progress=False)
    record = json.loads((out / "results" / "brick__seed0.json").read_text())
    assert record["pro_variants"] is False and "aupro_per_image" not in record["evaluation"]["dmdd"]
    assert record["resumed_from_step"] == smoke_config().total_steps  # the finished checkpoint, not trained again
    assert "## The PRO variants" not in (out / "results.md").read_text()


def test_merge_only_marks_missing_tasks(stopped_and_resumed: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "partial"
    (out / "results").mkdir(parents=True)
    source = stopped_and_resumed["out"] / "results" / "brick__seed0.json"
    (out / "results" / "brick__seed0.json").write_text(source.read_text())
    merge(out, [Task("brick", 0), Task("grass", 0)])
    assert "**incomplete: 1 of 2 tasks done**" in (out / "results.md").read_text()
    assert main(["benchmark", "--merge-only", "--out", str(stopped_and_resumed["out"])]) == 0
    assert main(["benchmark", "--merge-only", "--out", str(tmp_path / "nothing")]) == 2


# --- two processes under torchrun ------------------------------------------------------------------------------
def test_torchrun_shards_categories_over_two_processes_and_merges(builtin_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DMDD_FAST": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "dmdd_core", "benchmark", "--preset", "smoke", "--teacher", "tf_efficientnet_lite0",
        "--device", "cpu", "--data", str(builtin_root), "--categories", *CATEGORIES, "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert set(records) == {"brick__seed0", "grass__seed0"}
    assert records["brick__seed0"]["rank"] == 0 and records["grass__seed0"]["rank"] == 1
    assert all(r["world_size"] == 2 for r in records.values())
    report = (out / "results.md").read_text()
    assert "| brick |" in report and "| grass |" in report and "ranks: 2" in report
    assert "[rank 1/2]" in done.stdout and "[rank 0/2]" in done.stdout


# --- the gap to the paper ------------------------------------------------------------------------------------------
def test_gap_lines_compare_with_the_papers_dmdd_and_isolate_the_pro_definition() -> None:
    from dmdd_core.benchmark import gap_lines

    records = [fake_record(c, s, 0.90 + 0.01 * s) for c in ("bottle", "cable") for s in (0, 1)]
    for r in records:
        r["evaluation"]["dmdd"]["aupro_per_image"] = r["evaluation"]["dmdd"]["aupro"] + 0.02
    text = "\n".join(gap_lines(records))
    # pixel AUROC: mean of seeds 90 and 91 = 90.5; paper 98.85
    assert "| pixel AUROC | 90.50 ± 0.71 | 98.85 | -8.35 |" in text
    assert "| AUPRO (reference) | 90.50 ± 0.71 | 96.13 | -5.63 |" in text
    assert "(the definition alone moves it +2.00)" in text
    assert gap_lines([fake_record("brick", 0, 0.9, kind="builtin")]) == []


def test_category_figure_has_a_panel_per_metric_and_the_papers_line() -> None:
    from dmdd_core.benchmark import category_figure

    records = [fake_record(c, s, 0.90 + 0.01 * s) for c in ("bottle", "cable", "screw") for s in (0, 1, 2)]
    fig = category_figure(records)
    assert len(fig.axes) == 3
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["bottle", "cable", "screw"]
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["this run's mean", "DMDD paper (98.85)"]
    assert "DMDD paper" not in " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())


def test_auto_teacher_is_resolved_before_results_are_compared(tmp_path: Path) -> None:
    """A job asking for teacher "auto" is given the teacher it resolves to here (the offline one: the hub is
    off), and a result saved with "auto" is the same configuration as one naming the teacher it actually used,
    not as one naming another teacher."""
    from dmdd_core.model import OFFLINE_TEACHER
    from dmdd_core.runner import Job, is_done, resolve_teacher

    cfg = DMDDConfig.preset("smoke", device="cpu")
    assert cfg.teacher == "auto"
    named = Job(Task("brick", 1), cfg.replace(teacher="resnet18", teacher_pretrained=False), tmp_path)
    jobs, teacher = resolve_teacher([Job(Task("brick", 0), cfg, tmp_path), named])
    assert teacher.name == OFFLINE_TEACHER and jobs[0].cfg == cfg.replace(teacher=OFFLINE_TEACHER)
    assert jobs[1] is named
    assert resolve_teacher([named]) == ([named], None)
    path = tmp_path / "result.json"
    saved = {"config": cfg.to_dict(), "teacher": {"name": OFFLINE_TEACHER},
             "evaluation": {"metric_resolution_setting": "input"}, "pro_variants": False}
    assert is_done(saved, jobs[0].cfg, "input", False, path)
    with pytest.raises(ValueError, match="teacher: saved 'tf_efficientnet_lite0', now 'resnet18'"):
        is_done(saved, cfg.replace(teacher="resnet18"), "input", False, path)
