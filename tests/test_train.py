"""Two-stage training, checkpoints and exact resumption."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import dmdd_core.train as train_module
from dmdd_core.config import DMDDConfig, resolve_precision
from dmdd_core.fit import TrainResult, fit
from dmdd_core.train import CHECKPOINT_NAME, LOG_NAME, load_checkpoint

CATEGORY = "brick"
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def random_teacher_smoke(**overrides: Any) -> DMDDConfig:
    return DMDDConfig.preset("smoke", teacher_pretrained=False, teacher="resnet18", **overrides)


def snapshot(result: TrainResult) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def losses_of(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in entry.items() if k not in ("seconds", "data_seconds")} for entry in log]


def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


# --- which parameters each stage trains ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage_snapshots(builtin_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Weights before training, after stage 1 and after stage 2 of one smoke run (2 + 2 steps)."""
    cfg = random_teacher_smoke()
    out = tmp_path_factory.mktemp("stages")
    initial = fit(cfg, builtin_root, CATEGORY, tmp_path_factory.mktemp("initial"), stop_at_step=0)
    after_stage1 = fit(cfg, builtin_root, CATEGORY, out, stop_at_step=cfg.stage1_steps)
    after_stage2 = fit(cfg, builtin_root, CATEGORY, out)
    model = after_stage2.model
    return {
        "initial": snapshot(initial),
        "stage1": snapshot(after_stage1),
        "stage2": snapshot(after_stage2),
        "log": after_stage2.log,
        "parameters": {name for name, _ in model.named_parameters()},
        "buffers": {name for name, _ in model.named_buffers() if name.endswith(BN_BUFFERS)},
    }


def keys(snapshots: dict[str, Any], part: str, kind: str) -> list[str]:
    found = sorted(k for k in snapshots[kind] if k.startswith(part + "."))
    assert found
    return found


def test_model_construction_is_seeded(builtin_root: Path, tmp_path: Path) -> None:
    cfg = random_teacher_smoke()
    a = fit(cfg, builtin_root, CATEGORY, tmp_path / "a", stop_at_step=0)
    b = fit(cfg, builtin_root, CATEGORY, tmp_path / "b", stop_at_step=0)
    assert a.log == [] and not a.checkpoint.exists()
    assert_same_state(snapshot(a), snapshot(b))


def test_stage1_trains_only_the_student(stage_snapshots: dict[str, Any]) -> None:
    before, after = stage_snapshots["initial"], stage_snapshots["stage1"]
    for kind in ("parameters", "buffers"):
        for part in ("teacher", "segmentation"):
            for k in keys(stage_snapshots, part, kind):
                assert torch.equal(before[k], after[k]), f"stage 1 changed {k}"
        for k in keys(stage_snapshots, "student", kind):
            assert not torch.equal(before[k], after[k]), f"stage 1 left {k} unchanged"
    for sub in ("student.plain.encoder", "student.plain.decoder1", "student.decouple_heads"):
        assert any(k.startswith(sub) for k in keys(stage_snapshots, "student", "parameters"))


def test_stage2_trains_only_the_segmentation_network(stage_snapshots: dict[str, Any]) -> None:
    before, after = stage_snapshots["stage1"], stage_snapshots["stage2"]
    for kind in ("parameters", "buffers"):
        for part in ("teacher", "student"):
            for k in keys(stage_snapshots, part, kind):
                assert torch.equal(before[k], after[k]), f"stage 2 changed {k}"
        for k in keys(stage_snapshots, "segmentation", kind):
            assert not torch.equal(before[k], after[k]), f"stage 2 left {k} unchanged"


def test_log_records_both_stages(stage_snapshots: dict[str, Any]) -> None:
    log = stage_snapshots["log"]
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert [e["stage"] for e in log] == [1, 1, 2, 2]
    for entry in log[:2]:
        assert {"ngm", "aim", "loss"} <= set(entry)
        assert entry["loss"] == pytest.approx(entry["ngm"] + entry["aim"], rel=1e-5)
    for entry in log[2:]:
        assert {"focal", "l1", "loss"} <= set(entry)
        assert entry["loss"] == pytest.approx(entry["focal"] + entry["l1"], rel=1e-5)
    assert all(math.isfinite(v) for e in log for k, v in e.items() if k not in ("step", "stage"))


# --- checkpoints --------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_gives_identical_predictions(smoke_run: TrainResult) -> None:
    loaded, state = load_checkpoint(smoke_run.checkpoint)
    assert not loaded.training and not smoke_run.model.training
    assert state["step"] == smoke_run.model.cfg.total_steps
    assert loaded.teacher.name == "tf_efficientnet_lite0"
    assert loaded.teacher.source == smoke_run.model.teacher.source
    assert_same_state(loaded.state_dict(), smoke_run.model.state_dict())
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = smoke_run.model(x), loaded(x)
    for name, a, b in zip(expected._fields, expected, actual):
        assert torch.equal(a, b), name

    from_folder, _ = load_checkpoint(smoke_run.checkpoint.parent)
    assert_same_state(from_folder.state_dict(), loaded.state_dict())


def test_checkpoint_is_plain_data_written_atomically(smoke_run: TrainResult) -> None:
    state = torch.load(smoke_run.checkpoint, map_location="cpu", weights_only=True)
    assert state["category"] == CATEGORY
    assert DMDDConfig.from_dict(state["config"]) == smoke_run.model.cfg
    out = smoke_run.checkpoint.parent
    assert sorted(p.name for p in out.iterdir()) == sorted([CHECKPOINT_NAME, LOG_NAME])
    assert not list(out.rglob("*.tmp*"))


def test_unreadable_or_missing_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    broken = tmp_path / CHECKPOINT_NAME
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=CHECKPOINT_NAME):
        load_checkpoint(broken)


# --- exact resumption ---------------------------------------------------------------------------------------------
def resume_config(**overrides: Any) -> DMDDConfig:
    values: dict[str, Any] = {"stage1_steps": 3, "stage2_steps": 3, "checkpoint_every": 1, **overrides}
    return random_teacher_smoke(**values)


@pytest.fixture(scope="module")
def uninterrupted(builtin_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return fit(resume_config(), builtin_root, CATEGORY, tmp_path_factory.mktemp("run_a"))


def optimizer_buffers(checkpoint: Path) -> list[Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return [
        v["momentum_buffer"]
        for opt in ("opt_student", "opt_seg")
        for v in state[opt]["state"].values()
        if v.get("momentum_buffer") is not None
    ]


RESUME_STOPS = (2, 3, 4)
"""Interruptions inside stage 1, at the stage boundary, and inside stage 2 (3 + 3 steps)."""


@pytest.fixture(scope="module")
def resumed_runs(builtin_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """For each stop: the interrupted run's log length and checkpoint step, and the resumed run."""
    cfg = resume_config()
    runs = {}
    for stop in RESUME_STOPS:
        out = tmp_path_factory.mktemp(f"run_b_{stop}")
        first = fit(cfg, builtin_root, CATEGORY, out, stop_at_step=stop)
        saved_step = torch.load(first.checkpoint, weights_only=True)["step"]
        runs[stop] = {
            "first_log": first.log,
            "saved_step": saved_step,
            "resumed": fit(cfg, builtin_root, CATEGORY, out),
        }
    return runs


@pytest.mark.parametrize("stop", RESUME_STOPS)
def test_resumed_run_continues_from_the_interruption(
    resumed_runs: dict[int, dict[str, Any]], uninterrupted: TrainResult, stop: int
) -> None:
    run = resumed_runs[stop]
    assert len(run["first_log"]) == stop and run["saved_step"] == stop
    resumed: TrainResult = run["resumed"]
    assert resumed.resumed_from == stop
    assert [e["step"] for e in resumed.log] == [1, 2, 3, 4, 5, 6]
    kept = [i for i, e in enumerate(uninterrupted.log) if e["stage"] == 1 or e["step"] <= stop]
    assert [losses_of(resumed.log)[i] for i in kept] == [losses_of(uninterrupted.log)[i] for i in kept]
    a, b = snapshot(resumed), snapshot(uninterrupted)
    student = [k for k in a if k.startswith(("teacher.", "student."))]
    assert_same_state({k: a[k] for k in student}, {k: b[k] for k in student})


@pytest.mark.parametrize("stop", RESUME_STOPS)
def test_interrupted_and_resumed_run_equals_uninterrupted_run(
    resumed_runs: dict[int, dict[str, Any]], uninterrupted: TrainResult, stop: int
) -> None:
    resumed: TrainResult = resumed_runs[stop]["resumed"]
    assert losses_of(resumed.log) == losses_of(uninterrupted.log)
    assert_same_state(snapshot(resumed), snapshot(uninterrupted))
    a, b = optimizer_buffers(resumed.checkpoint), optimizer_buffers(uninterrupted.checkpoint)
    assert len(a) == len(b) > 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_ctrl_c_saves_a_checkpoint_to_resume_from(
    builtin_root: Path, tmp_path: Path, uninterrupted: TrainResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_step = train_module.segmentation_step

    def interrupted_on_second_call(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "segmentation_step", interrupted_on_second_call)
    cfg = resume_config(checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, builtin_root, CATEGORY, tmp_path)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 4
    assert losses_of(saved["log"]) == losses_of(uninterrupted.log)[:4]
    monkeypatch.setattr(train_module, "segmentation_step", real_step)
    resumed = fit(cfg, builtin_root, CATEGORY, tmp_path)
    assert resumed.resumed_from == 4
    assert [e["step"] for e in resumed.log] == [1, 2, 3, 4, 5, 6]


def signal_after_optimizer_step(monkeypatch: pytest.MonkeyPatch, at_call: int, signals: int) -> None:
    """Make the ``at_call``-th training step send itself SIGINT ``signals`` times once its optimizer has
    stepped: the moment where stopping at once would save weights one step ahead of the step count."""
    calls = []
    real_step = train_module.train_step

    def signalling(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
        losses = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == at_call:
            for _ in range(signals):
                signal.raise_signal(signal.SIGINT)
        return losses

    monkeypatch.setattr(train_module, "train_step", signalling)


def test_ctrl_c_mid_step_stops_after_it_and_resumes_exactly(
    builtin_root: Path, tmp_path: Path, uninterrupted: TrainResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    signal_after_optimizer_step(monkeypatch, at_call=4, signals=1)
    cfg = resume_config(checkpoint_every=100)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started in the background
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, builtin_root, CATEGORY, tmp_path)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 4 and losses_of(saved["log"]) == losses_of(uninterrupted.log)[:4]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    monkeypatch.undo()
    resumed = fit(cfg, builtin_root, CATEGORY, tmp_path)
    assert resumed.resumed_from == 4
    assert losses_of(resumed.log) == losses_of(uninterrupted.log)
    assert_same_state(snapshot(resumed), snapshot(uninterrupted))


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_whole_checkpoint(
    builtin_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signal_after_optimizer_step(monkeypatch, at_call=5, signals=2)
    cfg = resume_config(checkpoint_every=100)  # checkpoints at step 3 (end of stage 1) and at the end only
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, builtin_root, CATEGORY, tmp_path)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 3


def test_a_passed_teacher_and_a_built_one_give_the_same_run(builtin_root: Path, tmp_path: Path) -> None:
    from dmdd_core.model import build_teacher

    cfg = DMDDConfig.preset("smoke", teacher="tf_efficientnet_lite0")  # pretrained: the same weights both times
    built_here = fit(cfg, builtin_root, CATEGORY, tmp_path / "built")
    passed_in = fit(cfg, builtin_root, CATEGORY, tmp_path / "passed", teacher=build_teacher(cfg))
    assert losses_of(built_here.log) == losses_of(passed_in.log)


def test_resuming_with_another_configuration_is_refused(builtin_root: Path, uninterrupted: TrainResult) -> None:
    with pytest.raises(ValueError, match="another --out") as info:
        fit(resume_config(lr_student=0.1), builtin_root, CATEGORY, uninterrupted.checkpoint.parent)
    assert "lr_student" in str(info.value)


def test_finished_run_is_loaded_not_retrained(builtin_root: Path, uninterrupted: TrainResult) -> None:
    checkpoint = uninterrupted.checkpoint
    written = checkpoint.stat().st_mtime_ns
    started = time.perf_counter()
    again = fit(resume_config(), builtin_root, CATEGORY, checkpoint.parent)
    assert time.perf_counter() - started < 20
    assert again.resumed_from == resume_config().total_steps
    assert checkpoint.stat().st_mtime_ns == written
    assert losses_of(again.log) == losses_of(uninterrupted.log)
    assert not again.model.training
    assert_same_state(snapshot(again), snapshot(uninterrupted))


# --- the full preset ----------------------------------------------------------------------------------------------
def test_paper_preset_runs_both_stages_on_cpu(builtin_root: Path, tmp_path: Path) -> None:
    # batch_size 2 instead of the preset's 32 and one step per stage: at 32 a step takes most of a minute on two
    # CPU cores. What is checked is that every piece of the full-size model runs, in both stages.
    cfg = DMDDConfig.preset(
        "paper", stage1_steps=1, stage2_steps=1, teacher_pretrained=False, teacher="resnet18", batch_size=2
    )
    assert cfg.image_size == 256 and cfg.decouple and cfg.aim and cfg.msn
    result = fit(cfg, builtin_root, CATEGORY, tmp_path, progress=False)
    assert [e["stage"] for e in result.log] == [1, 2]
    assert all(math.isfinite(e["loss"]) for e in result.log)
    assert torch.load(result.checkpoint, weights_only=True)["step"] == 2


# --- mixed precision chosen by the hardware -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "amp,device,capability,expected",
    [
        ("auto", "cuda", (7, 5), "fp16"),  # T4: bf16 only emulated
        ("auto", "cuda", (7, 0), "fp16"),  # V100
        ("auto", "cuda", (8, 0), "bf16"),  # A100
        ("auto", "cuda", (8, 6), "bf16"),  # RTX 30xx
        ("auto", "cuda", (9, 0), "bf16"),  # H100
        ("auto", "cpu", None, "fp32"),
        ("off", "cuda", (9, 0), "fp32"),
        ("fp16", "cuda", (9, 0), "fp16"),
        ("bf16", "cuda", (7, 5), "bf16"),
        ("bf16", "cpu", None, "bf16"),
    ],
)
def test_precision_follows_the_hardware(amp: str, device: str, capability: tuple[int, int] | None, expected: str) -> None:
    assert resolve_precision(amp, device, capability) == expected


def test_auto_precision_asks_the_gpu_its_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = random_teacher_smoke()
    assert cfg.amp == "auto"
    for capability, expected in (((7, 5), "fp16"), ((8, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert train_module.precision_for(cfg, torch.device("cuda")) == expected
    assert train_module.precision_for(cfg, torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_precision("fp8", "cuda", (9, 0))
    with pytest.raises(ValueError, match="amp must be one of"):
        random_teacher_smoke(amp="half")


def test_only_fp16_gets_a_gradient_scaler() -> None:
    cpu = torch.device("cpu")
    assert train_module.grad_scaler_for("fp16", cpu).is_enabled()
    assert not train_module.grad_scaler_for("bf16", cpu).is_enabled()
    assert not train_module.grad_scaler_for("fp32", cpu).is_enabled()
    assert train_module.autocast_for("fp16", cpu).fast_dtype == torch.float16
    assert train_module.autocast_for("bf16", cpu).fast_dtype == torch.bfloat16


def test_configs_saved_with_a_boolean_amp_still_load() -> None:
    assert DMDDConfig.from_dict({**random_teacher_smoke().to_dict(), "amp": True}).amp == "bf16"
    assert DMDDConfig.from_dict({**random_teacher_smoke().to_dict(), "amp": False}).amp == "off"
    assert train_module.saved_config({"amp": False})["amp"] == "off"


def test_the_precision_is_in_the_log_the_checkpoint_and_the_report(builtin_root: Path, smoke_run: TrainResult) -> None:
    from dmdd_core.infer import evaluate

    assert smoke_run.precision == "fp32"  # a CPU run in auto mode
    state = torch.load(smoke_run.checkpoint, weights_only=True)
    assert state["precision"] == "fp32" and state["sessions"][0]["precision"] == "fp32"
    log = json.loads((smoke_run.checkpoint.parent / LOG_NAME).read_text())
    assert log["precision"] == "fp32"
    model, _ = load_checkpoint(smoke_run.checkpoint)
    ev = evaluate(model, builtin_root, CATEGORY)
    assert "trained in fp32" in ev.summary() and ev.to_dict()["training_precision"] == "fp32"


def test_fp16_with_a_gradient_scaler_trains_and_resumes_exactly(builtin_root: Path, tmp_path: Path) -> None:
    """Forced fp16 on the CPU (autocast and the scaler run there too): the scaler's state is checkpointed, so an
    interrupted fp16 run resumes to the same weights."""
    cfg = random_teacher_smoke(amp="fp16", stage1_steps=1, stage2_steps=1)  # fp16 on a CPU is slow: one step each
    whole = fit(cfg, builtin_root, CATEGORY, tmp_path / "whole", progress=False)
    assert whole.precision == "fp16" and all(math.isfinite(e["loss"]) for e in whole.log)
    state = torch.load(whole.checkpoint, weights_only=True)
    assert state["precision"] == "fp16" and state["scaler"]["scale"] > 0
    fit(cfg, builtin_root, CATEGORY, tmp_path / "split", stop_at_step=1, progress=False)
    resumed = fit(cfg, builtin_root, CATEGORY, tmp_path / "split", progress=False)
    assert resumed.resumed_from == 1
    assert_same_state(snapshot(resumed), snapshot(whole))
    assert losses_of(resumed.log) == losses_of(whole.log)
    assert whole.log[0]["loss"] != pytest.approx(
        fit(cfg.replace(amp="off"), builtin_root, CATEGORY, tmp_path / "fp32", stop_at_step=1, progress=False).log[0]["loss"],
        abs=1e-7
    )


def test_a_checkpoint_from_before_precisions_and_batched_synthesis_resumes_with_a_warning(
    builtin_root: Path, tmp_path: Path
) -> None:
    cfg = random_teacher_smoke()
    fit(cfg, builtin_root, CATEGORY, tmp_path, stop_at_step=1, progress=False)
    path = tmp_path / CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    for key in ("sessions", "precision", "synthesis_version", "scaler"):
        del state[key]
    state["config"] = {**state["config"], "amp": False, "num_workers": -1}  # as the earlier version saved it
    torch.save(state, path)
    assert load_checkpoint(path)[0].training_precision == "fp32"
    with pytest.warns(UserWarning, match="synthesis version 1"):
        resumed = fit(cfg, builtin_root, CATEGORY, tmp_path, progress=False)
    assert resumed.resumed_from == 1 and resumed.precision == "fp32"
    state = torch.load(path, weights_only=True)
    assert [s["start_step"] for s in state["sessions"]] == [0, 1] and state["synthesis_version"] == 2


def test_resuming_with_another_rotation_policy_warns(builtin_root: Path, tmp_path: Path) -> None:
    """The rotation policy comes from the data source; a run resumed where the source gives another one (data
    reopened as one's own, say) trains on other batches than it would have, and says so."""
    cfg = random_teacher_smoke()
    fit(cfg, builtin_root, CATEGORY, tmp_path, stop_at_step=1, progress=False)
    path = tmp_path / CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    assert state["rotation"] == "right_angle_small"  # the built-in dataset's textures turn freely
    state["rotation"] = "none"
    torch.save(state, path)
    with pytest.warns(UserWarning, match="rotation policy 'none'"):
        fit(cfg, builtin_root, CATEGORY, tmp_path, progress=False)


def test_concurrent_writes_of_one_file_each_land_whole(tmp_path: Path) -> None:
    """Two ranks that finish together both merge the benchmark tables: every write must rename a whole file of
    its own, never one another writer has just renamed away."""
    from concurrent.futures import ThreadPoolExecutor

    from dmdd_core.train import atomic_write_text

    path = tmp_path / "results.md"
    texts = [f"writer {i}\n" * 2000 for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda text: [atomic_write_text(text, path) for _ in range(25)], texts))
    assert path.read_text() in texts
    assert not list(tmp_path.glob("*.tmp"))
