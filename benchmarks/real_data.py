"""DMDD on real images beside PaDiM and the mean-image baseline, with training times, over seeds.

Datasets: the ELPV solar cells (``elpv``: categories mono and poly, image labels only; needs the optional package,
``pip install -e '.[elpv]'``) and the built-in textures (``builtin``: brick, grass, gravel, with masks). For every
(dataset, category, seed) it trains DMDD with the chosen preset (default ``cpu``), evaluates it on the test split,
and records PaDiM (fitted on the same teacher and training images; its channel draw follows the seed) and the
mean-image baseline on the same split. Finished tasks are kept and skipped on a rerun (the benchmark runner's
result files), so an interrupted run resumes.

Which data chose the settings: the ``cpu`` preset's fields and the synthesis shares were chosen on ELPV mono, the
built-in data and validation splits only. ELPV poly is reported and never used to choose anything; no test split
chose a checkpoint (the last step is evaluated) or a threshold.

Run::

    python benchmarks/real_data.py                                   # both datasets, seeds 0 1 2, preset cpu
    python benchmarks/real_data.py --datasets elpv --categories mono --seeds 0
    python benchmarks/real_data.py --preset smoke --datasets builtin --categories brick --seeds 0   # seconds
    python benchmarks/real_data.py --report                          # the tables of what has finished

It writes ``OUT/<dataset>/`` (each the benchmark's results.md, results.csv, figures) and ``OUT/real_data.md`` /
``OUT/real_data.json``: per dataset and category, DMDD, PaDiM and the mean image, each metric as mean ± std over
the seeds (percent), with DMDD's training time and PaDiM's fit time per run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmdd_core.benchmark import run_benchmark
from dmdd_core.config import PRESETS, DMDDConfig
from dmdd_core.data import DataSource, elpv_root, ensure_builtin_dataset, open_source
from dmdd_core.protocol import BASELINES, HEADLINE_METRICS, label
from dmdd_core.runner import RESULTS_DIR, Task, load_result, markdown_table, mean_std, stat_text, versions

DATASETS = ("elpv", "builtin")
CHOSEN_ON = "ELPV mono, the built-in data and validation splits (ELPV poly never)"


def open_dataset(name: str) -> DataSource:
    """The source of ``elpv`` (the installed package) or ``builtin`` (generated offline)."""
    if name == "elpv":
        return open_source(elpv_root(), "elpv")
    if name == "builtin":
        return open_source(ensure_builtin_dataset(), "builtin")
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def table_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, category, method): each headline metric's mean ± std over seeds (percent, None when
    absent) and the mean seconds (DMDD: training; PaDiM: fitting)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["category"]), []).append(r)
    rows = []
    for (dataset, category), group in groups.items():
        for who, name in (("dmdd", "DMDD"), *BASELINES.items()):
            row: dict[str, Any] = {"dataset": dataset, "category": category, "method": name,
                                   "seeds": sorted(r["seed"] for r in group)}
            for key in HEADLINE_METRICS:
                values = [100 * r["evaluation"][who][key] for r in group if key in r["evaluation"].get(who, {})]
                row[key] = mean_std(values) if len(values) == len(group) else None
            seconds = [r["train_seconds"] if who == "dmdd" else r["evaluation"].get("padim_fit_seconds")
                       for r in group] if who != "naive_baseline" else []
            row["seconds"] = sum(seconds) / len(seconds) if seconds and None not in seconds else None
            if who == "dmdd":
                row["seconds_per_seed"] = {r["seed"]: r["train_seconds"] for r in group}
            rows.append(row)
    return rows


DIAGNOSIS = {
    "validation": "validation split (synthetic anomalies), DMDD",
    "dmdd": "test, DMDD (segmentation output)",
    "normality": "test, normality discrepancy",
    "abnormality": "test, abnormality discrepancy",
}
"""The columns of the table that tells what limits DMDD: image AUROC on the validation split against the test
split, and on the test split the model's output against the student's raw maps
(:data:`dmdd_core.infer.BRANCHES`). A high validation figure with a low test figure: the synthetic anomalies do not
resemble the real ones. Raw maps as low as the output: the student is a weak model of normality. Raw maps well
above the output: the segmentation network reads them badly."""


def diagnosis_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, category): each :data:`DIAGNOSIS` column as mean ± std (percent) and its number of seeds.
    Where some seeds recorded the raw maps' scores (results written before they were scored did not), every
    column is taken over those seeds only, so the columns compare the same models."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["category"]), []).append(r)
    rows = []
    for (dataset, category), group in groups.items():
        scored = [r for r in group if r["evaluation"].get("branch_image_auroc")]
        group = scored or group
        row: dict[str, Any] = {"dataset": dataset, "category": category, "seeds": sorted(r["seed"] for r in group)}
        for key in DIAGNOSIS:
            if key == "validation":
                values = [(r.get("validation") or {}).get("image_auroc") for r in group]
            elif key == "dmdd":
                values = [r["evaluation"]["dmdd"]["image_auroc"] for r in group]
            else:
                values = [r["evaluation"].get("branch_image_auroc", {}).get(key) for r in group]
            present = [100 * v for v in values if v is not None]
            row[key] = (mean_std(present), len(present)) if present else None
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any],
             diagnosis: Sequence[dict[str, Any]] = ()) -> str:
    lines = ["# DMDD on real images, beside PaDiM and the mean-image baseline", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    head = ["dataset", "category", "method", "seeds", "train or fit s", *map(label, HEADLINE_METRICS)]
    body = [[r["dataset"], r["category"], r["method"], " ".join(map(str, r["seeds"])),
             "–" if r["seconds"] is None else f"{r['seconds']:.0f}",
             *(stat_text(r[k], len(r["seeds"])) for k in HEADLINE_METRICS)] for r in rows]
    lines += markdown_table(head, body)
    lines += ["", "Percent, mean ± std over the seeds. '–': absent (ELPV has image labels only; the mean image "
              "needs no fitting worth timing)."]
    per_run = [f"{r['dataset']} {r['category']}: " + ", ".join(f"seed {k} {v:.0f} s" for k, v in sorted(r["seconds_per_seed"].items()))
               for r in rows if "seconds_per_seed" in r]
    if per_run:
        lines += ["", "DMDD's training time per run (a run that shared the cores with other work takes longer): "
                  + "; ".join(per_run) + "."]
    if diagnosis:
        lines += ["", "## What limits DMDD", "", "Image AUROC, percent, mean ± std over the seeds whose results "
                  "scored the raw maps (every seed where none did), their number in brackets."]
        body = [[r["dataset"], r["category"],
                 *("–" if r[k] is None else f"{stat_text(r[k][0], r[k][1])} ({r[k][1]})" for k in DIAGNOSIS)]
                for r in diagnosis]
        lines += [""] + markdown_table(["dataset", "category", *DIAGNOSIS.values()], body)
    return "\n".join(lines) + "\n"


def settings_text(records: Sequence[dict[str, Any]]) -> str:
    """The preset the records were made with and every field changed from it (seed, device and the resolved
    teacher aside), e.g. "cpu, synth_patch=0.2"; an error when the records do not share one configuration."""
    from dmdd_core.train import RESUMABLE_DIFFERENCES, config_differences

    first = DMDDConfig.from_dict(records[0]["config"])
    if first.teacher == "auto":  # compare by the teacher it resolved to
        first = first.replace(teacher=records[0]["teacher"]["name"])
    for r in records[1:]:
        differences = config_differences(r["config"], first, RESUMABLE_DIFFERENCES | {"seed"},
                                         (r.get("teacher") or {}).get("name"))
        if differences:
            raise ValueError(f"the results under one --out were made with different configurations "
                             f"({r['category']} seed {r['seed']}: {'; '.join(differences)}); use one --out per setting")
    preset = DMDDConfig.preset(records[0]["preset"]).to_dict()
    changed = [f"{k}={v}" for k, v in records[0]["config"].items()
               if k in preset and k not in {"seed", "device", "teacher", "preset_name"} and preset[k] != v]
    return ", ".join([records[0]["preset"], *changed])


def found_categories(out: Path, dataset: str) -> list[str]:
    """The categories with a finished result under ``out/dataset`` (what ``--report`` tabulates)."""
    return sorted({p.stem.split("__")[0] for p in (out / dataset / RESULTS_DIR).glob("*.json")})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--categories", nargs="+", help="only these categories (of every dataset given)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--teacher", default="auto")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="config fields over the preset, e.g. synth_stroke=0.2 student_pretrained=true (JSON values)")
    parser.add_argument("--out", default="results/real_data")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: write the tables from the results already under --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value
    cfg = DMDDConfig.preset(args.preset, teacher=args.teacher, **overrides)
    started = time.perf_counter()
    records = []
    for name in args.datasets:
        found = found_categories(out, name) if args.report else open_dataset(name).categories()
        categories = [c for c in found if not args.categories or c in args.categories]
        if not categories:
            continue
        if not args.report:
            run_benchmark(cfg, open_dataset(name), out / name, categories=categories, seeds=args.seeds, pro_variants=False,
                          show=False)
        for category in categories:
            for seed in args.seeds:
                record = load_result(out / name / RESULTS_DIR / f"{Task(category, seed).key}.json")
                if record is not None:
                    records.append({**record, "dataset": name})
    if not records:
        print(f"no finished results under {out} for {', '.join(args.datasets)}", file=sys.stderr)
        return 1
    rows = table_rows(records)
    meta = {"preset": settings_text(records), "seeds": " ".join(map(str, sorted({r["seed"] for r in records}))), "settings chosen on": CHOSEN_ON,
            "teacher": records[0]["teacher"]["name"],
            "input size": records[0]["config"]["image_size"], "machine": f"{platform.processor() or platform.machine()}, "
            f"{records[0]['device']}", "versions": versions(),
            "wall time of this call": f"{time.perf_counter() - started:.0f} s"}
    diagnosis = diagnosis_rows(records)
    text = markdown(rows, meta, diagnosis)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_data.md").write_text(text)
    (out / "real_data.json").write_text(json.dumps({"meta": meta, "rows": rows, "diagnosis": diagnosis}, indent=1))
    print(text)
    print(f"written {out / 'real_data.md'} and real_data.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
