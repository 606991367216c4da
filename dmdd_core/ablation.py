"""Ablations: which part of DMDD matters, and how much our own choices move the result.

Two groups of *variants*, each a set of config switches applied to one base config (a preset):

- ``paper``: the ablation in the form of the paper's table. DeSTSeg (every DMDD switch off), + decoupling,
  + decoupling and AIM, + decoupling and the multi-perception segmentation network, full DMDD. [paper: the three
  components; the rows: ours, as the paper's table is not available to us]
- ``ours``: one change each from full DMDD, for every choice METHOD.md marks [ours] (NGM's region, AIM's teacher
  image, margin and normal-region term, what the segmentation network reads).

Every variant is trained and evaluated with the same seeds on the same categories; the table gives, per variant,
the mean ± sample std over seeds of each metric (averaged over categories within a seed first), and the
difference *paired by seed* (same seed, same synthetic anomalies, same initialisation) to its reference, with the
p-value of a paired t-test: the paper-form rows against DeSTSeg, as a paper's ablation reads, our choices against
full DMDD. With three seeds only a large, consistent difference reaches p < 0.05; the table says "within seed
noise" for the rest rather than ranking them. The tests are not corrected for multiple comparisons: with ten
variants and two metrics, one p < 0.05 in twenty can come by chance.

Output folder::

    <variant>/runs/<category>/seed<k>/      checkpoint.pt, log.json   (the benchmark runner's layout)
    <variant>/results/<category>__seed<k>.json
    ablation.md, ablation.csv, ablation.json, figures/ablation.png

The runner is resumable like the benchmark's: a finished task is skipped, an interrupted one resumes. Tasks run
seed by seed (every variant for seed 0, then seed 1...), so a run stopped early already holds a complete, smaller
table.

A class (or several machines) can split one ablation: ``shard=(i, n)`` (``dmdd ablate --shard i/n``) runs the i-th
of n shares of the task list, each task in exactly one share; :func:`merge_ablation` (``dmdd ablate --merge``)
gathers the shares' folders into one table, refusing results of another configuration.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .config import DMDDConfig
from .data import DataSource, as_source
from .protocol import BASELINES, HEADLINE_METRICS, PRO_VARIANTS, label
from .runner import (
    FIGURES_DIR,
    RESULTS_DIR,
    RUNS_DIR,
    Job,
    Task,
    count,
    is_done,
    load_result,
    markdown_table,
    mean_std,
    resolve_teacher,
    run_jobs,
    run_metadata,
    stat_text,
    write_text_files,
)

ABLATION_METRICS: tuple[str, ...] = (*HEADLINE_METRICS, "pixel_ap")
"""The metrics of the ablation tables, in column order."""
REFERENCE = "dmdd"
"""The variant our own choices are compared with: full DMDD, the base config unchanged."""
BASELINE = "destseg"
"""The variant the paper-form rows are compared with, as in a paper's ablation: DeSTSeg."""


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table: config switches applied to the base config."""

    name: str
    label: str
    group: Literal["paper", "ours"]
    overrides: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    def config(self, base: DMDDConfig) -> DMDDConfig:
        """The base config with this variant's switches."""
        return base.replace(**dict(self.overrides))

    @property
    def components(self) -> tuple[bool, bool, bool]:
        """(decoupling, AIM, multi-perception segmentation): on unless switched off, as in the presets with every
        DMDD component (``paper``, ``fast``) that ablations start from."""
        o = self.overrides
        return bool(o.get("decouple", True)), bool(o.get("aim", True)), bool(o.get("msn", True))


PAPER_VARIANTS: tuple[Variant, ...] = (
    Variant("destseg", "DeSTSeg baseline", "paper", {"decouple": False, "aim": False, "msn": False},
            "one student, denoising loss on the whole image, DeSTSeg's segmentation head"),
    Variant("decouple", "+ decoupling", "paper", {"aim": False, "msn": False},
            "two branches; NGM on the normality branch; the abnormality branch is not trained and not read"),
    Variant("decouple_aim", "+ decoupling + AIM", "paper", {"msn": False},
            "the abnormality branch learns by AIM; the segmentation head still reads the normality branch only"),
    Variant("decouple_msn", "+ decoupling + MSN", "paper", {"aim": False},
            "the multi-perception network reads both branches; the abnormality branch is untrained (no AIM)"),
    Variant(REFERENCE, "full DMDD", "paper", {}, "decoupling + AIM + multi-perception segmentation"),
)
OUR_VARIANTS: tuple[Variant, ...] = (
    Variant("ngm_normal", "NGM over normal pixels only", "ours", {"ngm_region": "normal"},
            "ours: NGM averaged over every pixel (DeSTSeg's denoising loss)"),
    Variant("aim_teacher_original", "AIM teacher sees the normal image", "ours", {"aim_teacher_image": "original"},
            "ours: the teacher sees the anomalous image, as at test time"),
    Variant("aim_margin", "AIM margin 0.5", "ours", {"aim_margin": 0.5},
            "ours: margin 0 (push the cosine similarity inside the anomaly down to 0)"),
    Variant("aim_no_normal_term", "AIM without its normal-region term", "ours", {"aim_normal_term": False},
            "ours: the abnormality branch also mimics the teacher outside the anomaly"),
    Variant("seg_normality_only", "MSN reads the normality branch only", "ours", {"seg_branches": "normality"},
            "ours: both branches (the paper's figure)"),
)
_ALL_SOURCES = {"synth_texture": 0.4, "synth_patch": 0.2, "synth_stroke": 0.2, "synth_brightness": 0.2}
SYNTHESIS_VARIANTS: tuple[Variant, ...] = (
    Variant("synth_texture_only", "synthesis: textures only", "ours",
            {**dict.fromkeys(_ALL_SOURCES, 0.0), "synth_texture": 1.0}, "ours: the preset's shares"),
    Variant("synth_all", "synthesis: textures 0.4, patches, strokes, brightness 0.2 each", "ours", _ALL_SOURCES,
            "ours: the preset's shares"),
    *(Variant(f"synth_no_{name.removeprefix('synth_')}", f"synthesis: all but {plural}", "ours",
              {**_ALL_SOURCES, name: 0.0}, "ours: the preset's shares")
      for name, plural in (("synth_patch", "patches"), ("synth_stroke", "strokes"),
                           ("synth_brightness", "brightness changes"))),
)
"""The synthesis sources (METHOD.md section 1), each setting all four shares: textures alone (the paper's recipe),
all four, and all four but one. Judge them on data that did not choose them (ELPV poly, the built-in set)."""
VARIANTS: dict[str, Variant] = {v.name: v for v in PAPER_VARIANTS + OUR_VARIANTS + SYNTHESIS_VARIANTS}
DEFAULT_VARIANTS: tuple[Variant, ...] = PAPER_VARIANTS + OUR_VARIANTS
"""What an ablation runs unless variants are named: the synthesis variants are asked for by name
(``--variants synth_all synth_no_patch ...``)."""


def select_variants(names: Sequence[str] | None = None) -> list[Variant]:
    """Variants by name, in table order (those of :data:`DEFAULT_VARIANTS` when ``names`` is None); full DMDD is
    always included."""
    if names is None:
        return list(DEFAULT_VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    wanted = set(names) | {REFERENCE}
    return [v for v in VARIANTS.values() if v.name in wanted]


# --- running ----------------------------------------------------------------------------------------------------
def run_ablation(
    base: DMDDConfig,
    data: str | Path | DataSource,
    out: str | Path,
    *,
    variants: Sequence[Variant] | None = None,
    categories: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    resume: bool = True,
    progress: bool | None = None,
    show: bool = True,
    reference_from: str | Path | None = None,
    shard: tuple[int, int] | None = None,
) -> Path:
    """Train and evaluate every variant on every category with every seed; write the table (printed unless
    ``show`` is False); return its path. ``reference_from``: a benchmark folder (``dmdd benchmark --out``, or a
    dataset folder of ``benchmarks/real_data.py``) whose finished results of the same configuration stand for
    full DMDD's tasks instead of training them again (:func:`reuse_reference`). ``shard=(i, n)``: run only the
    i-th of n shares of the tasks (:func:`shard_jobs`); the table then holds the rows this share completed, and
    :func:`merge_ablation` joins the shares."""
    from .train import select_device

    out = Path(out)
    source = as_source(data)
    chosen = list(variants) if variants is not None else select_variants()
    if REFERENCE not in {v.name for v in chosen}:
        chosen.append(VARIANTS[REFERENCE])
    cats = list(categories or source.categories())
    base = base.replace(device=str(select_device(base.device)))
    jobs = ablation_jobs(base, out, chosen, cats, seeds)
    what = f"{count(len(jobs), 'task')} ({count(len(chosen), 'variant')} x {count(len(cats), 'category')} x " \
           f"{count(len(seeds), 'seed')})"
    if shard is not None:
        write_share_plan(out, jobs, *shard)
        jobs = shard_jobs(jobs, *shard)
        what = f"share {shard[0]}/{shard[1]}: {count(len(jobs), 'task')} of {what}"
    if reference_from is not None:
        if not resume:
            raise ValueError("reference_from (--reference-from) takes finished results, and resume=False "
                             "(--no-resume) trains everything again: pass one or the other")
        jobs, _ = resolve_teacher(jobs)  # a result names the teacher it used: compare with this machine's "auto"
        reused = reuse_reference([j for j in jobs if j.folder == out / REFERENCE], Path(reference_from), source)
        if reused:
            print(f"full DMDD: {count(len(reused), 'result')} taken from {reference_from} "
                  f"({', '.join(j.task.key for j in reused)})", file=sys.stderr)
    run_jobs(jobs, source, pro_variants=False, resume=resume, progress=progress, what=f"ablation: {what}")
    if shard is None:
        return write_ablation(out, chosen, cats, seeds, show=show)
    print(f"share {shard[0]}/{shard[1]} finished in {out}: hand this folder back; the whole table: "
          f"dmdd ablate --merge FOLDER [FOLDER ...] --out ALL", file=sys.stderr)
    try:
        return write_ablation(out, chosen, cats, seeds, show=show)
    except FileNotFoundError:  # no variant has every category of a seed in this share: no row to show yet
        return out


def ablation_jobs(base: DMDDConfig, out: Path, variants: Sequence[Variant], categories: Sequence[str],
                  seeds: Sequence[int]) -> list[Job]:
    """Every task of an ablation in run order: seed by seed, then variant by variant, then category."""
    configs = {v.name: v.config(base) for v in variants}  # raises on an impossible combination before any work
    return [Job(Task(c, seed), configs[v.name].replace(seed=seed), out / v.name, f"seed {seed} {v.label} ({c})")
            for seed in seeds for v in variants for c in categories]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (the i-th of n shares, counted from 1) as ``(i, n)``; a clear error for anything else."""
    try:
        index, total = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 2/30 (the second of 30 shares)") from None
    if not 1 <= index <= total:
        raise ValueError(f"--shard {text!r}: i must be between 1 and n")
    return index, total


def shard_jobs(jobs: Sequence[Job], index: int, total: int) -> list[Job]:
    """The ``index``-th of ``total`` shares (counted from 1): every ``total``-th job from the ``index``-th, so each
    job is in exactly one share and the shares differ in size by at most one. A share with no job is an error
    (more shares than tasks)."""
    if not 1 <= index <= total:
        raise ValueError(f"share {index}/{total}: the index must be between 1 and {total}")
    share = list(jobs[index - 1 :: total])
    if not share:
        raise ValueError(f"share {index}/{total} has no task: the ablation has only {count(len(jobs), 'task')}; "
                         f"split it into at most {len(jobs)} shares")
    return share


SHARE_PLAN = "share_plan.json"
"""Written by a share into its folder: the whole ablation's task list and this share's index, so that a merge can
name the tasks no folder handed back, and the share that holds each."""


def write_share_plan(out: Path, jobs: Sequence[Job], index: int, total: int) -> None:
    """Record in ``out`` the whole task list of a sharded ablation and which share this folder runs."""
    tasks = [[job.folder.name, job.task.category, job.task.seed] for job in jobs]
    write_text_files(out, {SHARE_PLAN: json.dumps({"share": [index, total], "tasks": tasks}, indent=1)})


def missing_tasks(plans: Sequence[Mapping[str, Any]], found: set[tuple[str, str]]) -> list[str]:
    """The tasks of the ablation the ``plans`` (share_plan.json contents) describe that are not in ``found``
    ({(variant, "<category>__seed<k>")}), each with the share that runs it ("share 3/30: seed 1, synth_all,
    brick"). Plans of different task lists are an error: they are shares of different ablations."""
    if not plans:
        return []
    tasks, total = plans[0]["tasks"], plans[0]["share"][1]
    for plan in plans[1:]:
        if plan["tasks"] != tasks or plan["share"][1] != total:
            raise ValueError("the folders are shares of different ablations (their share_plan.json task lists "
                             "differ): merge the shares of one `dmdd ablate` command at a time")
    return [f"share {i % total + 1}/{total}: seed {seed}, {name}, {category}"
            for i, (name, category, seed) in enumerate(tasks) if (name, Task(category, seed).key) not in found]


def merge_ablation(folders: Sequence[str | Path], out: str | Path, show: bool = True) -> Path:
    """Gather the results of several ablation folders (the shares of one ablation, ``dmdd ablate --shard i/n``, run
    by different people or machines) into ``out`` and write its table; return its path. Results already in
    ``out`` count as one more folder.

    Every result must belong to one ablation: full DMDD's first result found fixes the configuration, and each
    variant's result must have that configuration with the variant's switches (device, precision and seed aside),
    on the same kind of data, evaluated at the same resolution; anything else is an error naming the file. A task
    found in several folders is taken from the first one and the others are named."""
    from .train import RESUMABLE_DIFFERENCES, config_differences, saved_config

    out = Path(out)
    found: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}
    plans: list[dict[str, Any]] = []
    for folder in dict.fromkeys(Path(f).resolve() for f in [out, *folders]):
        if folder != out.resolve() and not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: --merge takes the folders of `dmdd ablate --out`")
        if (folder / SHARE_PLAN).is_file():
            plans.append(json.loads((folder / SHARE_PLAN).read_text()))
        unknown = sorted(p.parent.parent.name for p in folder.glob(f"*/{RESULTS_DIR}/*.json")
                         if p.parent.parent.name not in VARIANTS)
        for name in dict.fromkeys(unknown):
            print(f"{folder / name}: left out, not a variant of `dmdd ablate --list` (a variant of your own is "
                  f"merged by gathering its folders and calling write_ablation with it)", file=sys.stderr)
        paths = sorted(p for name in VARIANTS for p in (folder / name / RESULTS_DIR).glob("*.json"))
        if not paths and folder != out.resolve():
            raise FileNotFoundError(f"{folder} holds no ablation results (<variant>/{RESULTS_DIR}/*.json)")
        for path in paths:
            result = load_result(path)
            if result is None:
                raise ValueError(f"{path} cannot be read as a result: run its share again (it resumes)")
            key = (path.parent.parent.name, path.stem)
            if key in found:
                print(f"{key[0]} {key[1]}: {path} left out, {found[key][0]} taken", file=sys.stderr)
                continue
            found[key] = (path, result)
    references = [(path, r) for (name, _), (path, r) in found.items() if name == REFERENCE]
    if not references:
        raise FileNotFoundError(f"no full DMDD result in {', '.join(map(str, folders))}: every difference in the "
                                f"table is taken to it; run the share that holds it")
    first_path, first = references[0]
    base = DMDDConfig.from_dict(saved_config(first["config"]))
    teacher = (first.get("teacher") or {}).get("name")
    if base.teacher == "auto" and teacher:
        base = base.replace(teacher=teacher)

    def setting(r: Mapping[str, Any]) -> tuple[Any, ...]:
        ev = r["evaluation"]
        return ({k: v for k, v in ev.get("data", {}).items() if k != "root"}, ev.get("metric_resolution_setting"))

    for (name, _), (path, result) in found.items():
        expected = VARIANTS[name].config(base)
        saved = result.get("config", {})
        # texture_dir is a path on the machine that ran the share: compare the folder's name, not where it was
        differences = config_differences(saved, expected, RESUMABLE_DIFFERENCES | {"seed", "texture_dir"},
                                         (result.get("teacher") or {}).get("name"))
        textures = [Path(t).name if t else None for t in (saved.get("texture_dir"), expected.texture_dir)]
        if textures[0] != textures[1]:
            differences.append(f"texture_dir: saved {saved.get('texture_dir')!r}, now {expected.texture_dir!r}")
        if setting(result) != setting(first):
            differences.append(f"data and resolution {setting(result)}, not {setting(first)}")
        if differences:
            raise ValueError(f"{path} is not of the ablation of {first_path} ({'; '.join(differences)}): results "
                             f"of another configuration cannot share one table")
    missing = missing_tasks(plans, set(found))
    if missing:
        print(f"{count(len(missing), 'task')} of the ablation not handed back yet (the table holds the rest; run "
              f"these shares, or ask for their folders, and merge again):\n  " + "\n  ".join(missing),
              file=sys.stderr)
    for (name, stem), (path, result) in found.items():
        target = out / name / RESULTS_DIR / f"{stem}.json"
        if path.resolve() != target.resolve():
            write_text_files(target.parent, {target.name: json.dumps(result, indent=1)})
    chosen = select_variants(sorted({name for name, _ in found}))
    cats = sorted({r["category"] for _, r in found.values()})
    seeds = sorted({int(r["seed"]) for _, r in found.values()})
    print(f"merged {count(len(found), 'result')} of {count(len(chosen), 'variant')} into {out}", file=sys.stderr)
    return write_ablation(out, chosen, cats, seeds, show=show)


def reuse_reference(jobs: Sequence[Job], folder: Path, source: DataSource) -> list[Job]:
    """Copy into each of full DMDD's ``jobs`` with no result yet the finished result of the same task from
    ``folder`` (its ``results/`` files: a ``dmdd benchmark --out`` folder, or a dataset folder of
    ``benchmarks/real_data.py``). A result is taken only when it was made with the same configuration (teacher
    included; another one is an error, not a silent mix, :func:`~dmdd_core.runner.is_done`) on the same kind of
    dataset, evaluated at the input resolution; the PRO variants of a benchmark's result are dropped, as the
    ablation computes none. Each result not taken is named with the reason. Returns the jobs given a result.

    The reused tasks have no checkpoint under the ablation folder: :class:`VariantMaps` cannot show full DMDD's
    maps for them."""
    if not (folder / RESULTS_DIR).is_dir():
        raise FileNotFoundError(f"{folder / RESULTS_DIR} does not exist: --reference-from takes a benchmark folder "
                                f"(dmdd benchmark --out DIR, or results/real_data/<dataset>) holding results/*.json")
    reused = []
    wanted = {k: v for k, v in source.describe().items() if k != "root"}
    for job in jobs:
        target = job.result_path
        found = folder / RESULTS_DIR / f"{job.task.key}.json"
        result = load_result(found)
        if target.exists() or result is None:
            continue
        data = {k: v for k, v in result["evaluation"].get("data", {}).items() if k != "root"}
        why = (f"another dataset ({data}, not {wanted})" if data != wanted else
               "evaluated at another resolution" if not is_done(result, job.cfg, "input", bool(result.get("pro_variants")), found)
               else "")
        if why:
            print(f"full DMDD {job.task.key}: {found} not taken: {why}", file=sys.stderr)
            continue
        if result.get("pro_variants"):
            result = {**result, "pro_variants": False, "evaluation": without_pro_variants(result["evaluation"])}
        write_text_files(target.parent, {target.name: json.dumps(result, indent=1)})
        reused.append(job)
    return reused


def without_pro_variants(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation record as ``pro_variants=False`` would have written it: the two PRO variants left out of
    every metrics dict and of the metric names."""
    variants = set(PRO_VARIANTS) - {"aupro"}
    return {key: ({k: v for k, v in value.items() if k not in variants}
                  if key in ("dmdd", "naive_baseline", "padim", "metric_keys") and isinstance(value, dict) else value)
            for key, value in evaluation.items()}


# --- the table ----------------------------------------------------------------------------------------------------
def collect(out: str | Path, variants: Sequence[Variant], categories: Sequence[str],
            seeds: Sequence[int]) -> dict[str, dict[int, dict[str, float]]]:
    """variant -> seed -> metric -> percent, averaged over categories; only seeds where every category of
    the variant is finished."""
    out = Path(out)
    table: dict[str, dict[int, dict[str, float]]] = {}
    for v in variants:
        per_seed: dict[int, dict[str, float]] = {}
        for seed in seeds:
            records = [load_result(out / v.name / RESULTS_DIR / f"{Task(c, seed).key}.json") for c in categories]
            if all(r is not None for r in records):
                per_seed[seed] = category_means([r for r in records if r is not None], "dmdd")
        table[v.name] = per_seed
    return table


def category_means(records: Sequence[Mapping[str, Any]], who: str) -> dict[str, float]:
    """metric -> percent averaged over the records (one per category) of ``who`` ("dmdd", or a baseline's key
    of :data:`~dmdd_core.protocol.BASELINES`); a metric absent from any record (image labels only) is left out."""
    return {key: float(np.mean([100 * r["evaluation"][who][key] for r in records])) for key in ABLATION_METRICS
            if all(key in r["evaluation"].get(who, {}) for r in records)}


def baseline_rows(out: str | Path, categories: Sequence[str], seeds: Sequence[int]) -> list[list[str]]:
    """The baselines on the same test splits, from full DMDD's records (PaDiM's channel draw follows the seed):
    per baseline its mean ± std over seeds of the category means (percent) and its mean fit time."""
    out = Path(out)
    per_seed = {s: [load_result(out / REFERENCE / RESULTS_DIR / f"{Task(c, s).key}.json") for c in categories]
                for s in seeds}
    finished = {s: [r for r in found if r is not None] for s, found in per_seed.items()
                if all(r is not None for r in found)}
    rows = []
    for who, name in BASELINES.items():
        means = [category_means(records, who) for records in finished.values()]
        if not means or not means[0]:
            continue
        fits = [r["evaluation"].get("padim_fit_seconds") for records in finished.values() for r in records]
        fit = f"{np.mean(fits):.1f}" if who == "padim" and all(f is not None for f in fits) else "–"
        rows.append([name, *(stat_text(mean_std([m[k] for m in means]) if all(k in m for m in means) else None,
                                       len(means)) for k in ABLATION_METRICS), fit])
    return rows


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float]) -> dict[str, Any]:
    """Mean and std over the shared seeds of (variant - reference), and a paired t-test's two-sided p-value
    (None with fewer than two seeds, or when every difference is the same)."""
    from scipy import stats

    shared = sorted(set(values) & set(reference))
    diffs = np.array([values[s] - reference[s] for s in shared], dtype=np.float64)
    if len(diffs) == 0:
        return {"mean": None, "std": None, "p": None, "seeds": []}
    mean, std = mean_std(diffs.tolist())
    p = None
    if len(diffs) > 1 and std > 0:
        p = float(stats.ttest_rel([values[s] for s in shared], [reference[s] for s in shared]).pvalue)
    return {"mean": mean, "std": std, "p": p, "seeds": shared}


def ablation_rows(table: Mapping[str, Mapping[int, Mapping[str, float]]],
                  variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """One row per variant: per metric the mean, std and per-seed values, and the paired differences to full
    DMDD (``vs_dmdd``) and to DeSTSeg (``vs_destseg``, None when DeSTSeg was not run)."""
    reference = table.get(REFERENCE, {})
    baseline = table.get(BASELINE, {})
    rows = []
    for v in variants:
        per_seed = table.get(v.name, {})
        row: dict[str, Any] = {"name": v.name, "label": v.label, "group": v.group, "overrides": dict(v.overrides),
                               "note": v.note, "components": v.components, "seeds": sorted(per_seed)}
        for key in ABLATION_METRICS:
            values = {s: m[key] for s, m in per_seed.items() if key in m}
            row[key] = {"mean": mean_std(list(values.values())) if values else None,
                        "per_seed": values,
                        "vs_dmdd": paired_difference(values, {s: m[key] for s, m in reference.items() if key in m})
                        if v.name != REFERENCE else None,
                        "vs_destseg": paired_difference(values, {s: m[key] for s, m in baseline.items() if key in m})
                        if v.name != BASELINE and baseline else None}
        rows.append(row)
    return rows


def reading(diff: Mapping[str, Any] | None, alpha: float = 0.05) -> str:
    """A plain-words reading of a paired difference: 'higher'/'lower' only when the paired test says so."""
    if not diff or diff.get("mean") is None:
        return "–"
    if len(diff.get("seeds") or ()) == 1:
        return "one seed: untested"
    p = diff.get("p")
    if p is None or p >= alpha:
        return "within seed noise"
    return "higher" if diff["mean"] > 0 else "lower"


DELTA_METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro")
"""The metrics with a Δ column and a reading; pixel AUROC and AUPRO are absent on image-label-only data."""


def _readings(row: Mapping[str, Any], against: str) -> str:
    found = {label(k): reading(row[k][against]) for k in DELTA_METRICS if row[k]["mean"] is not None}
    if len(set(found.values())) <= 1:
        return next(iter(found.values()), "–")
    return "; ".join(f"{name} {text}" for name, text in found.items())


def _deltas(row: Mapping[str, Any], against: str) -> list[str]:
    return [_delta(row[k][against]) for k in DELTA_METRICS]


def _delta(diff: Mapping[str, Any] | None) -> str:
    if not diff or diff.get("mean") is None:
        return "–"
    p = diff.get("p")
    if len(diff.get("seeds") or ()) == 1:  # one paired difference: no spread to show
        return f"{diff['mean']:+.2f}"
    return f"{diff['mean']:+.2f} ± {diff['std']:.2f}" + (f" (p={p:.2f})" if p is not None else "")


def ablation_markdown(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
                      baselines: Sequence[Sequence[str]] = ()) -> str:
    """The two tables (paper form, our choices), then the baselines on the same test splits (``baselines``:
    :func:`baseline_rows`), with their metadata."""
    lines = [f"# Ablation: {meta.get('data', '')}, {meta.get('preset_name', '')} preset", ""]
    for key, value in meta.items():
        if key not in ("data", "preset_name"):
            lines.append(f"- {key}: {value}")
    lines.append("")
    tick = {True: "✓", False: ""}
    heads = [label(k) for k in ABLATION_METRICS]
    deltas = {group: [f"Δ {label(k)} vs {ref}" for k in DELTA_METRICS] for group, ref in
              (("paper", "DeSTSeg"), ("ours", "DMDD"))}
    paper = [[r["label"], *(tick[c] for c in r["components"]),
              *(stat_text(r[k]["mean"], len(r["seeds"])) for k in ABLATION_METRICS),
              *_deltas(r, "vs_destseg"), _readings(r, "vs_destseg")] for r in rows if r["group"] == "paper"]
    lines += ["## In the paper's form (percent, mean ± std over seeds; Δ: against the DeSTSeg baseline)", ""]
    lines += markdown_table(["variant", "decoupling", "AIM", "MSN", *heads, *deltas["paper"], "reading"], paper,
                            ["---", ":-:", ":-:", ":-:"] + ["---"] * (len(heads) + len(DELTA_METRICS) + 1))
    ours = [[r["label"], r["note"].removeprefix("ours: "),
             *(stat_text(r[k]["mean"], len(r["seeds"])) for k in ABLATION_METRICS),
             *_deltas(r, "vs_dmdd"), _readings(r, "vs_dmdd")] for r in rows if r["group"] == "ours"]
    if ours:
        lines += ["", "## Our own choices, one change each from full DMDD (percent)", ""]
        lines += markdown_table(["change", "default", *heads, *deltas["ours"], "reading"], ours)
    if baselines:
        lines += ["", "## The baselines on the same test splits (percent; no training)", ""]
        lines += markdown_table(["baseline", *heads, "fit s per category"], baselines)
    lines += ["", "Δ: the variant minus the reference (DeSTSeg for the paper's form, full DMDD for our choices), paired "
              "by seed: mean ± std of the per-seed differences (the difference alone with one seed, untested); p: paired "
              "t-test, two-sided. 'within seed noise': "
              "p ≥ 0.05, or too few seeds to tell."]
    return "\n".join(lines)


def ablation_figure(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("pixel_auroc", "aupro", "image_auroc")):
    """One panel per metric: each variant's seeds as dots, the mean ± std as a bar, full DMDD's mean as a line."""
    from .plots import figure

    fig, axes = figure(1, len(metrics), size=(4.2 * len(metrics), 0.45 * len(rows) + 1.4), sharey=True)
    axes = axes[0]
    ys = np.arange(len(rows))[::-1]
    colours = {"paper": "tab:blue", "ours": "tab:orange"}
    for ax, key in zip(axes, metrics):
        for y, r in zip(ys, rows):
            stat = r[key]["mean"]
            if stat is None:
                continue
            seeds = list(r[key]["per_seed"].values())
            ax.scatter(seeds, [y] * len(seeds), s=14, color=colours[r["group"]], alpha=0.5, zorder=2)
            ax.errorbar(stat[0], y, xerr=stat[1], fmt="D", color=colours[r["group"]], ms=6, capsize=3, zorder=3)
            if r["name"] == REFERENCE:
                ax.axvline(stat[0], color="grey", lw=1, ls="--", zorder=1)
        ax.set_title(label(key))
        ax.set_xlabel("percent")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [r["label"] for r in rows])
    n_paper = sum(r["group"] == "paper" for r in rows)
    if 0 < n_paper < len(rows):
        for ax in axes:
            ax.axhline(ys[n_paper - 1] - 0.5, color="black", lw=0.6)
    fig.suptitle("Ablation: seeds (dots), mean ± std (diamond); dashed: full DMDD; blue: the paper's components, "
                 "orange: our choices", fontsize=9)
    fig.tight_layout()
    return fig


def write_ablation(out: str | Path, variants: Sequence[Variant], categories: Sequence[str],
                   seeds: Sequence[int], show: bool = True) -> Path:
    """Gather the finished tasks under ``out`` into ablation.md/.csv/.json and figures/ablation.png."""
    import matplotlib.pyplot as plt

    from .plots import save_figure

    out = Path(out)
    rows = ablation_rows(collect(out, variants, categories, seeds), variants)
    if not any(r["seeds"] for r in rows):
        raise FileNotFoundError(f"no finished ablation tasks under {out}")
    records = _records(out, variants, categories, seeds)
    title = {"data": str(records[0]["evaluation"].get("data", {}).get("kind", "?")), "preset_name": records[0]["preset"]}
    meta = {**title, **run_metadata(records),
            "seeds": ", ".join(map(str, seeds)) + " (table rows use the seeds finished for every category)"}
    text = ablation_markdown(rows, meta, baseline_rows(out, categories, seeds))
    write_text_files(out, {"ablation.md": text, "ablation.csv": _csv(rows),
                           "ablation.json": json.dumps({"meta": meta, "rows": rows}, indent=1, default=_jsonable)})
    fig = ablation_figure(rows)
    save_figure(fig, "ablation", out / FIGURES_DIR)
    plt.close(fig)
    if show:
        print(text, flush=True)
    print(f"ablation table in {out}/ (ablation.md, ablation.csv, ablation.json, {FIGURES_DIR}/ablation.png)",
          file=sys.stderr)
    return out / "ablation.md"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _records(out: Path, variants: Sequence[Variant], categories: Sequence[str],
             seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every finished task record of the ablation."""
    found = (load_result(out / v.name / RESULTS_DIR / f"{Task(c, s).key}.json")
             for v in variants for c in categories for s in seeds)
    return [r for r in found if r is not None]


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per variant and seed (percent), the long format a notebook or a spreadsheet plots from."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["variant", "group", "seed"] + [key for key in ABLATION_METRICS])
    for r in rows:
        for seed in r["seeds"]:
            values = [r[k]["per_seed"].get(seed) for k in ABLATION_METRICS]  # absent: image labels only
            writer.writerow([r["name"], r["group"], seed] + ["" if v is None else f"{v:.4f}" for v in values])
    return buffer.getvalue()


def load_ablation(out: str | Path) -> dict[str, Any]:
    """The ablation.json of a finished (or partly finished) run."""
    path = Path(out) / "ablation.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dmdd ablate --out {out}` (or run_ablation) first")
    return json.loads(path.read_text())


# --- looking at the maps ------------------------------------------------------------------------------------------
class VariantMaps:
    """The trained variants of an ablation folder, loaded on first use and kept, to compare their anomaly maps of
    one test image (what the notebook's explorer shows)."""

    def __init__(self, out: str | Path, data: str | Path | DataSource, category: str, device: str = "cpu") -> None:
        self.out, self.category, self.device = Path(out), category, device
        self.source = as_source(data)
        self._models: dict[tuple[str, int], Any] = {}
        self._test: Any = None

    def model(self, name: str, seed: int) -> Any:
        """The trained model of variant ``name`` and ``seed`` (FileNotFoundError naming what to run if absent)."""
        from .train import load_checkpoint

        key = (name, seed)
        if key not in self._models:
            path = self.out / name / RUNS_DIR / self.category / f"seed{seed}" / "checkpoint.pt"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the ablation in {self.out} has not trained {name} "
                                        f"on {self.category} with seed {seed}")
            self._models[key] = load_checkpoint(path, self.device)[0]
        return self._models[key]

    @property
    def test(self) -> Any:
        """The category's test split at the models' input size (that of the first model loaded)."""
        from .data import TestDataset

        if self._test is None:
            if not self._models:
                raise RuntimeError("load a model first (VariantMaps.model)")
            size = next(iter(self._models.values())).cfg.image_size
            self._test = TestDataset(self.source, self.category, size)
        return self._test

    def maps(self, names: Sequence[str], seed: int, index: int) -> dict[str, np.ndarray]:
        """variant -> (S,S) anomaly map of test image ``index``."""
        import torch

        models = {name: self.model(name, seed) for name in names}
        item = self.test[index]
        with torch.no_grad():
            return {name: m(item.image[None].to(self.device)).anomaly_map[0, 0].cpu().numpy() for name, m in models.items()}

    def figure(self, names: Sequence[str], seed: int, index: int, own_scale: bool = False):
        """One row: the test image, its ground truth, then each variant's map (a shared 0..1 scale, or each its
        own with ``own_scale``), titled with the variant and its pixel AUROC on this image when defective."""
        from .metrics import pixel_auroc
        from .plots import figure, show_image

        maps = self.maps(names, seed, index)
        item = self.test[index]
        mask = item.mask[0].numpy()
        fig, axes = figure(1, 2 + len(maps), size=(2.4 * (2 + len(maps)), 2.8))
        show_image(axes[0, 0], item.image, f"test image {index}: {item.defect_type}")
        show_image(axes[0, 1], mask, "ground truth", vmin=0, vmax=1)
        for ax, (name, anomaly_map) in zip(axes[0, 2:], maps.items()):
            scale = {} if own_scale else {"vmin": 0, "vmax": 1}
            score = f"\npixel AUROC {pixel_auroc(mask[None], anomaly_map[None]):.3f}" if 0 < mask.mean() < 1 else ""
            show_image(ax, anomaly_map, VARIANTS[name].label + score if name in VARIANTS else name, cmap="jet", **scale)
        fig.suptitle(f"seed {seed}; maps on {'each their own' if own_scale else 'one 0..1'} scale", fontsize=9, y=1.04)
        fig.tight_layout()
        return fig
