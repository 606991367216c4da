"""The ablation runner: variants, paired differences, the table and figure, resuming, the CLI, and the switch of
what the segmentation network reads."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

import dmdd_core.ablation as ablation
import dmdd_core.runner as runner
from dmdd_core.ablation import (
    OUR_VARIANTS,
    PAPER_VARIANTS,
    REFERENCE,
    VARIANTS,
    ablation_rows,
    load_ablation,
    merge_ablation,
    paired_difference,
    reading,
    run_ablation,
    select_variants,
)
from dmdd_core.cli import main
from dmdd_core.config import DMDDConfig
from dmdd_core.model import DMDD


def smoke_config(**overrides: Any) -> DMDDConfig:
    return DMDDConfig.preset("smoke", teacher="tf_efficientnet_lite0", teacher_pretrained=False, device="cpu",
                             **overrides)


# --- variants ---------------------------------------------------------------------------------------------------
def test_paper_rows_switch_the_three_components_as_labelled() -> None:
    components = {v.name: v.components for v in PAPER_VARIANTS}
    assert components == {
        "destseg": (False, False, False),
        "decouple": (True, False, False),
        "decouple_aim": (True, True, False),
        "decouple_msn": (True, False, True),
        REFERENCE: (True, True, True),
    }
    base = DMDDConfig.preset("paper")
    for v in PAPER_VARIANTS:
        cfg = v.config(base)
        assert (cfg.decouple, cfg.aim, cfg.msn) == v.components
    assert VARIANTS["destseg"].config(base) == DMDDConfig.preset("destseg")


@pytest.mark.parametrize("variant", OUR_VARIANTS, ids=lambda v: v.name)
def test_each_of_our_choices_changes_exactly_one_field_of_full_dmdd(variant: ablation.Variant) -> None:
    base = DMDDConfig.preset("fast")
    changed = {k for k, v in variant.config(base).to_dict().items() if base.to_dict()[k] != v}
    assert changed == set(variant.overrides) and len(changed) == 1
    assert variant.components == (True, True, True)
    assert variant.note.startswith("ours:")


@pytest.mark.parametrize("variant", ablation.SYNTHESIS_VARIANTS, ids=lambda v: v.name)
def test_each_synthesis_variant_sets_the_four_shares_and_nothing_else(variant: ablation.Variant) -> None:
    base = DMDDConfig.preset("cpu")
    cfg = variant.config(base)
    changed = {k for k, v in cfg.to_dict().items() if base.to_dict()[k] != v}
    assert set(variant.overrides) == {"synth_texture", "synth_patch", "synth_stroke", "synth_brightness"}
    assert changed <= set(variant.overrides) and variant.components == (True, True, True)
    removed = variant.name.removeprefix("synth_no_")
    if removed != variant.name:
        assert getattr(cfg, f"synth_{removed}") == 0.0 and sum(variant.overrides.values()) > 0


def test_select_variants_keeps_table_order_adds_dmdd_and_names_unknown_ones() -> None:
    chosen = select_variants(["aim_margin", "destseg"])
    assert [v.name for v in chosen] == ["destseg", REFERENCE, "aim_margin"]
    assert [v.name for v in select_variants()] == [v.name for v in ablation.DEFAULT_VARIANTS]
    assert not {v.name for v in select_variants()} & {v.name for v in ablation.SYNTHESIS_VARIANTS}
    assert [v.name for v in select_variants(["synth_all"])] == [REFERENCE, "synth_all"]
    with pytest.raises(ValueError, match="no_such_variant"):
        select_variants(["no_such_variant"])


# --- statistics ---------------------------------------------------------------------------------------------------
def test_paired_difference_by_hand_and_against_scipy() -> None:
    variant = {0: 90.0, 1: 92.0, 2: 95.0, 5: 50.0}  # seed 5 has no reference: left out
    reference = {0: 89.0, 1: 90.0, 2: 92.0}
    diff = paired_difference(variant, reference)
    assert diff["seeds"] == [0, 1, 2]
    assert diff["mean"] == pytest.approx(2.0)  # differences 1, 2, 3
    assert diff["std"] == pytest.approx(1.0)
    expected = stats.ttest_rel([90, 92, 95], [89, 90, 92]).pvalue
    assert diff["p"] == pytest.approx(expected)
    assert diff["p"] == pytest.approx(2 * stats.t.sf(2.0 / (1.0 / np.sqrt(3)), df=2))


def test_paired_difference_with_one_seed_or_a_constant_gap_has_no_p_value() -> None:
    assert paired_difference({0: 3.0}, {0: 1.0}) == {"mean": 2.0, "std": 0.0, "p": None, "seeds": [0]}
    assert paired_difference({0: 3.0, 1: 4.0}, {0: 1.0, 1: 2.0})["p"] is None
    assert paired_difference({}, {0: 1.0})["mean"] is None


def test_reading_only_ranks_what_the_paired_test_supports() -> None:
    assert reading({"mean": 5.0, "p": 0.01}) == "higher"
    assert reading({"mean": -5.0, "p": 0.01}) == "lower"
    assert reading({"mean": 5.0, "p": 0.2}) == "within seed noise"
    assert reading({"mean": 5.0, "p": None}) == "within seed noise"
    assert reading({"mean": 5.0, "std": 0.0, "p": None, "seeds": [0]}) == "one seed: untested"
    assert reading({"mean": 5.0, "std": 0.0, "p": None, "seeds": [0, 1]}) == "within seed noise"
    assert reading(None) == "–"


def test_rows_hold_means_per_seed_values_and_differences_to_dmdd() -> None:
    table = {
        REFERENCE: {0: {"image_auroc": 80.0, "pixel_auroc": 90.0, "aupro": 70.0, "pixel_ap": 30.0},
                    1: {"image_auroc": 82.0, "pixel_auroc": 92.0, "aupro": 72.0, "pixel_ap": 32.0}},
        "destseg": {0: {"image_auroc": 70.0, "pixel_auroc": 85.0, "aupro": 60.0, "pixel_ap": 20.0}},
    }
    rows = ablation_rows(table, select_variants(["destseg"]))
    by_name = {r["name"]: r for r in rows}
    assert by_name[REFERENCE]["pixel_auroc"]["mean"] == pytest.approx((91.0, np.sqrt(2.0)))
    assert by_name[REFERENCE]["pixel_auroc"]["vs_dmdd"] is None
    assert by_name["destseg"]["seeds"] == [0]
    assert by_name["destseg"]["aupro"]["vs_dmdd"]["mean"] == pytest.approx(-10.0)
    assert by_name["destseg"]["aupro"]["per_seed"] == {0: 60.0}
    assert by_name[REFERENCE]["aupro"]["vs_destseg"]["mean"] == pytest.approx(10.0)  # seed 0 only is shared
    assert by_name["destseg"]["aupro"]["vs_destseg"] is None
    assert ablation_rows({REFERENCE: table[REFERENCE]}, select_variants([]))[0]["aupro"]["vs_destseg"] is None


# --- running ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ablation(builtin_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ablation")
    variants = select_variants(["destseg", "seg_normality_only"])
    table = run_ablation(smoke_config(), builtin_root, out, variants=variants, categories=["brick"], seeds=[0, 1],
                         progress=False)
    return {"out": out, "table": table, "variants": variants}


def test_run_ablation_writes_table_csv_json_figure_and_one_result_per_task(small_ablation: dict[str, Any]) -> None:
    out = small_ablation["out"]
    assert small_ablation["table"] == out / "ablation.md"
    for name in ("destseg", REFERENCE, "seg_normality_only"):
        for seed in (0, 1):
            record = json.loads((out / name / "results" / f"brick__seed{seed}.json").read_text())
            assert record["seed"] == seed
            assert record["config"]["seg_branches"] == ("normality" if name == "seg_normality_only" else "both")
            assert record["config"]["msn"] == (name != "destseg")
    text = small_ablation["table"].read_text()
    assert "| DeSTSeg baseline |  |  |  |" in text and "| full DMDD | ✓ | ✓ | ✓ |" in text
    assert "MSN reads the normality branch only" in text and "Our own choices" in text
    with (out / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted(
        (n, s) for n in ("destseg", REFERENCE, "seg_normality_only") for s in ("0", "1"))
    saved = load_ablation(out)
    reference_rows = [r for r in saved["rows"] if r["name"] == REFERENCE]
    pixel = [float(r["pixel_auroc"]) for r in rows if r["variant"] == REFERENCE]
    assert reference_rows[0]["pixel_auroc"]["mean"][0] == pytest.approx(np.mean(pixel), abs=1e-3)
    assert (out / "figures" / "ablation.png").stat().st_size > 10_000


def test_run_ablation_again_trains_nothing(small_ablation: dict[str, Any], builtin_root: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished task was run again")

    monkeypatch.setattr(runner, "run_task", no_training)
    run_ablation(smoke_config(), builtin_root, small_ablation["out"], variants=small_ablation["variants"],
                 categories=["brick"], seeds=[0, 1], progress=False)
    assert "6 done before" in capsys.readouterr().out


def test_run_ablation_refuses_another_base_configuration_in_the_same_folder(small_ablation: dict[str, Any],
                                                                            builtin_root: Path) -> None:
    with pytest.raises(ValueError, match="another configuration"):
        run_ablation(smoke_config(beta_max=0.5), builtin_root, small_ablation["out"], variants=small_ablation["variants"],
                     categories=["brick"], seeds=[0], progress=False)


def test_full_dmdd_taken_from_a_benchmark_folder_of_the_same_configuration(
        small_ablation: dict[str, Any], builtin_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``reference_from``: finished results of full DMDD's configuration are copied, not trained again; a folder
    of another configuration is refused, and so are a folder without results and resume=False."""
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("full DMDD was trained again")

    monkeypatch.setattr(runner, "run_task", no_training)
    finished = small_ablation["out"] / REFERENCE
    run_ablation(smoke_config(), builtin_root, tmp_path / "abl", variants=select_variants([]), categories=["brick"],
                 seeds=[0, 1], progress=False, show=False, reference_from=finished)
    for seed in (0, 1):
        name = f"results/brick__seed{seed}.json"
        assert json.loads((tmp_path / "abl" / REFERENCE / name).read_text()) == json.loads((finished / name).read_text())
    rows = {r["name"]: r for r in load_ablation(tmp_path / "abl")["rows"]}
    original = {r["name"]: r for r in load_ablation(small_ablation["out"])["rows"]}
    assert rows[REFERENCE]["image_auroc"]["per_seed"] == original[REFERENCE]["image_auroc"]["per_seed"]
    with pytest.raises(ValueError, match="another configuration"):
        run_ablation(smoke_config(beta_max=0.5), builtin_root, tmp_path / "other", variants=select_variants([]),
                     categories=["brick"], seeds=[0], progress=False, show=False, reference_from=finished)
    with pytest.raises(FileNotFoundError, match="holding results"):
        run_ablation(smoke_config(), builtin_root, tmp_path / "x", variants=select_variants([]), categories=["brick"],
                     seeds=[0], progress=False, show=False, reference_from=tmp_path)
    with pytest.raises(ValueError, match="one or the other"):
        run_ablation(smoke_config(), builtin_root, tmp_path / "x", variants=select_variants([]), categories=["brick"],
                     seeds=[0], progress=False, show=False, reference_from=finished, resume=False)


def test_shards_hold_every_task_exactly_once_and_differ_in_size_by_at_most_one() -> None:
    jobs = ablation.ablation_jobs(smoke_config(), Path("abl"), select_variants(["destseg", "aim_margin"]),
                                  ["brick", "grass"], [0, 1, 2])
    every = sorted((j.folder.name, j.task.key) for j in jobs)
    assert len(set(every)) == 18
    for total in (1, 2, 4, 5, 18):
        shares = [ablation.shard_jobs(jobs, i, total) for i in range(1, total + 1)]
        assert sorted((j.folder.name, j.task.key) for share in shares for j in share) == every
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="only 18 tasks"):
        ablation.shard_jobs(jobs, 19, 19)
    assert ablation.parse_shard("2/30") == (2, 30)
    for bad in ("0/3", "4/3", "3", "a/b", "1/2/3"):
        with pytest.raises(ValueError, match="--shard"):
            ablation.parse_shard(bad)


def _split_into_shares(small: dict[str, Any], folder: Path, total: int) -> list[Path]:
    """The small ablation's results handed back as ``total`` shares would hand them: share i holds its tasks."""
    jobs = ablation.ablation_jobs(smoke_config(), small["out"], small["variants"], ["brick"], [0, 1])
    for i in range(1, total + 1):
        for job in ablation.shard_jobs(jobs, i, total):
            target = folder / f"share{i}" / job.folder.name / "results" / job.result_path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(job.result_path, target)
    return [folder / f"share{i}" for i in range(1, total + 1)]


def test_merging_the_shares_gives_the_unsplit_table(small_ablation: dict[str, Any], tmp_path: Path) -> None:
    shares = _split_into_shares(small_ablation, tmp_path, 4)
    assert all(len(list(share.glob("*/results/*.json"))) in (1, 2) for share in shares)
    table = merge_ablation(shares, tmp_path / "all", show=False)
    assert table.read_text() == (small_ablation["out"] / "ablation.md").read_text()
    assert load_ablation(tmp_path / "all") == load_ablation(small_ablation["out"])


def test_merge_refuses_another_configuration_and_needs_full_dmdd(small_ablation: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    shares = _split_into_shares(small_ablation, tmp_path, 2)
    changed = next(shares[1].glob("destseg/results/*.json"))
    record = json.loads(changed.read_text())
    record["config"]["beta_max"] = 0.5
    changed.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"destseg.*not of the ablation.*beta_max"):
        merge_ablation(shares, tmp_path / "all", show=False)
    for path in tmp_path.glob(f"share*/{REFERENCE}"):
        shutil.rmtree(path)
    with pytest.raises(FileNotFoundError, match="no full DMDD result"):
        merge_ablation(shares, tmp_path / "all2", show=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_ablation([tmp_path / "nowhere"], tmp_path / "all3", show=False)


def test_a_benchmarks_pro_variants_are_dropped_from_a_reused_result() -> None:
    evaluation = {"dmdd": {"aupro": 0.5, "aupro_per_image": 0.6, "aupro_linear_200": 0.55, "pixel_auroc": 0.9},
                  "padim": {"aupro": 0.4, "aupro_per_image": 0.3}, "naive_baseline": {},
                  "metric_keys": {"aupro": "a", "aupro_per_image": "b"}, "num_images": 8}
    assert ablation.without_pro_variants(evaluation) == {
        "dmdd": {"aupro": 0.5, "pixel_auroc": 0.9}, "padim": {"aupro": 0.4}, "naive_baseline": {},
        "metric_keys": {"aupro": "a"}, "num_images": 8}


def test_missing_table_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dmdd ablate"):
        load_ablation(tmp_path)
    with pytest.raises(FileNotFoundError, match="no finished ablation tasks"):
        ablation.write_ablation(tmp_path, select_variants([]), ["brick"], [0])


def test_cli_lists_variants_and_runs_an_ablation(builtin_root: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ablate", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in VARIANTS) and "aim_margin=0.5" in listed
    out = tmp_path / "abl"
    code = main(["ablate", "--preset", "smoke", "--teacher", "tf_efficientnet_lite0", "--device", "cpu", "--data",
                 str(builtin_root), "--categories", "brick", "--seeds", "0", "--variants", "aim_margin", "--out", str(out)])
    assert code == 0
    assert "AIM margin 0.5" in (out / "ablation.md").read_text()
    assert main(["ablate", "--variants", "nope", "--out", str(out)]) == 2
    # the same ablation in two shares: share 2/2 trains the AIM-margin task only; the merge equals the unsplit table
    share = tmp_path / "share2"
    assert main(["ablate", "--preset", "smoke", "--teacher", "tf_efficientnet_lite0", "--device", "cpu", "--data",
                 str(builtin_root), "--categories", "brick", "--seeds", "0", "--variants", "aim_margin", "--out",
                 str(share), "--shard", "2/2"]) == 0
    assert [p.relative_to(share).as_posix() for p in share.glob("*/results/*.json")] == [
        "aim_margin/results/brick__seed0.json"]
    shutil.copytree(out / REFERENCE / "results", tmp_path / "share1" / REFERENCE / "results")
    assert main(["ablate", "--merge", str(tmp_path / "share1"), str(share), "--out", str(tmp_path / "all")]) == 0
    merged = {r["name"]: r for r in load_ablation(tmp_path / "all")["rows"]}
    unsplit = {r["name"]: r for r in load_ablation(out)["rows"]}
    assert merged["aim_margin"]["pixel_auroc"]["per_seed"] == unsplit["aim_margin"]["pixel_auroc"]["per_seed"]
    assert main(["ablate", "--merge", str(share)]) == 2  # --out is needed


def test_ablation_tasks_run_seed_by_seed(builtin_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[tuple[str, int]] = []

    def fake_task(job: runner.Job, source: Any, **kwargs: Any) -> dict[str, Any]:
        order.append((job.folder.name, job.task.seed))
        if len(order) == 4:
            raise KeyboardInterrupt
        return {"evaluation": {"dmdd": {"image_auroc": 0.5, "pixel_auroc": 0.5, "aupro": 0.1}}}

    monkeypatch.setattr(runner, "run_task", fake_task)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(smoke_config(), builtin_root, tmp_path, variants=select_variants(["destseg"]),
                     categories=["brick"], seeds=[3, 4], progress=False)
    assert order == [("destseg", 3), (REFERENCE, 3), ("destseg", 4), (REFERENCE, 4)]


# --- what the segmentation network reads ------------------------------------------------------------------------
def test_seg_branches_normality_ignores_the_abnormality_branch() -> None:
    torch.manual_seed(0)
    both = DMDD(smoke_config()).eval()
    torch.manual_seed(0)
    normal_only = DMDD(smoke_config(seg_branches="normality")).eval()
    def size(model: DMDD) -> int:
        return sum(p.numel() for p in model.segmentation.parameters())

    assert size(normal_only) < size(both)
    x = torch.rand(1, 3, 64, 64)
    teacher = both.teacher_features(x)
    normality, abnormality = normal_only.student_features(x)
    assert abnormality is not None
    scrambled = [torch.randn_like(a) for a in abnormality]
    with torch.no_grad():
        a = normal_only.segment(teacher, normality, abnormality)
        b = normal_only.segment(teacher, normality, scrambled)
        c = both.segment(teacher, normality, abnormality)
        d = both.segment(teacher, normality, scrambled)
    assert torch.equal(a, b)
    assert not torch.allclose(c, d)
    with pytest.raises(ValueError, match="seg_branches"):
        smoke_config(seg_branches="abnormality")


def test_a_run_saved_before_seg_branches_existed_still_resumes() -> None:
    from dmdd_core.train import RESUMABLE_DIFFERENCES, config_differences, saved_config

    old = DMDDConfig.preset("fast").to_dict()
    del old["seg_branches"]
    assert saved_config(old) == DMDDConfig.preset("fast").to_dict()
    assert not config_differences(old, DMDDConfig.preset("fast"), RESUMABLE_DIFFERENCES | {"seed"})


def test_variant_maps_compare_one_test_image_across_variants(small_ablation: dict[str, Any], builtin_root: Path) -> None:
    from dmdd_core.ablation import VariantMaps

    explorer = VariantMaps(small_ablation["out"], builtin_root, "brick")
    maps = explorer.maps(["destseg", REFERENCE], seed=1, index=0)
    assert set(maps) == {"destseg", REFERENCE}
    size = explorer.model(REFERENCE, 1).cfg.image_size
    assert all(m.shape == (size, size) and 0 <= m.min() and m.max() <= 1 for m in maps.values())
    assert not np.allclose(maps["destseg"], maps[REFERENCE])
    assert explorer.model("destseg", 1) is explorer.model("destseg", 1)  # loaded once
    defective = next(i for i in range(len(explorer.test)) if explorer.test[i].label == 1)
    fig = explorer.figure(["destseg", REFERENCE], seed=0, index=defective, own_scale=True)
    assert len(fig.axes) == 4 and "pixel AUROC" in fig.axes[2].get_title()
    with pytest.raises(FileNotFoundError, match="aim_margin"):
        explorer.model("aim_margin", 0)


def test_merge_compares_the_texture_folder_not_where_each_machine_keeps_it(small_ablation: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    shares = _split_into_shares(small_ablation, tmp_path, 2)
    for i, share in enumerate(shares):
        for path in share.glob("*/results/*.json"):
            record = json.loads(path.read_text())
            record["config"]["texture_dir"] = f"/machine{i}/cache/dtd/images"
            path.write_text(json.dumps(record))
    merge_ablation(shares, tmp_path / "all", show=False)  # the same folder on two machines: accepted
    changed = next(shares[1].glob("*/results/*.json"))
    record = json.loads(changed.read_text())
    record["config"]["texture_dir"] = "/machine1/my_own_textures"
    changed.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="texture_dir"):
        merge_ablation(shares, tmp_path / "all2", show=False)


def test_a_merge_names_the_tasks_no_share_handed_back(small_ablation: dict[str, Any], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    jobs = ablation.ablation_jobs(smoke_config(), small_ablation["out"], small_ablation["variants"], ["brick"], [0, 1])
    shares = _split_into_shares(small_ablation, tmp_path, 4)
    for i, share in enumerate(shares, start=1):
        ablation.write_share_plan(share, jobs, i, 4)
    lost = ablation.shard_jobs(jobs, 3, 4)
    (shares[0] / "mine" / "results").mkdir(parents=True)  # a variant of someone's own: named, left out
    shutil.copy(lost[0].result_path, shares[0] / "mine" / "results" / lost[0].result_path.name)
    capsys.readouterr()
    merge_ablation([shares[0], shares[1], shares[3]], tmp_path / "all", show=False)
    err = capsys.readouterr().err
    assert f"{len(lost)} task" in err and "not handed back" in err
    for job in lost:
        assert f"share 3/4: seed {job.task.seed}, {job.folder.name}, brick" in err
    assert err.count("share 3/4:") == len(lost) and "share 1/4:" not in err
    assert "mine: left out, not a variant" in err
    merge_ablation(shares, tmp_path / "every", show=False)
    assert "not handed back" not in capsys.readouterr().err
    ablation.write_share_plan(shares[1], jobs[:-1], 2, 4)
    with pytest.raises(ValueError, match="different ablations"):
        merge_ablation(shares, tmp_path / "other", show=False)
