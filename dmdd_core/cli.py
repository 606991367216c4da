"""The command line: ``dmdd`` or ``python -m dmdd_core``. It only wires the package's pieces together."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import DATASET_KINDS, DOWNLOADS
from .config import AMP_MODES, PRESETS, DMDDConfig, runs_dir

if TYPE_CHECKING:
    from .data import DataSource

BUILTIN = "builtin"
AUTO_PRESET = "auto"
ELPV = "elpv"
DESCRIPTION = """\
DMDD: Dual-Modeling Decouple Distillation for unsupervised anomaly detection.

A frozen pretrained teacher and a student trained only on normal images (plus synthetic defects) disagree
where an image is anomalous; a segmentation network turns that disagreement into a pixel anomaly map.

Start here:
  dmdd quickstart                      train + evaluate on the built-in dataset (about 2 min per category on CPU)
  dmdd train --data DIR --category C   train on your data (MVTec AD, MPDD, VisA, ELPV, or a folder: see below);
                                       preset cpu without a GPU (256x256, at most 15 min on 2 cores), paper with one
  dmdd evaluate --checkpoint runs/C    image and pixel AUROC on DIR/C/test
  dmdd predict --checkpoint runs/C --input FOLDER --out preds   anomaly maps of any images
  dmdd export --checkpoint runs/C --format onnx --out model.onnx  a model for onnxruntime (or --format torch:
                                       weights only); dmdd predict --model model.onnx runs it
  dmdd benchmark --data DIR --preset paper --seeds 0 1 2    every category, resumable; tables beside the paper
  dmdd ablate --categories brick --seeds 0 1 2                the ablation table (dmdd ablate --list: variants)
  dmdd download mvtec                  fetch MVTec AD (also visa, dtd), then --data ~/.cache/dmdd/mvtec_anomaly_detection

Datasets: --dataset auto detects MVTec AD / MPDD (ROOT/<category>/train/good ...), VisA (ROOT/split_csv/1cls.csv)
and a folder of your own (DIR/train/good, DIR/test/<type>, DIR/ground_truth/<type>/<stem>_mask.png).
"""


def _data_root(value: str) -> Path:
    if value == BUILTIN:
        from .data.builtin import ensure_builtin_dataset

        return ensure_builtin_dataset()
    if value == ELPV:
        from .data import elpv_root

        try:
            return elpv_root()
        except FileNotFoundError as err:
            raise SystemExit(f"error: --data elpv: {err}") from err
    root = Path(value).expanduser()
    if not root.is_dir():
        raise SystemExit(
            f"error: --data {value}: folder not found. Give a dataset root (MVTec AD, MPDD, VisA, or a folder of your "
            "own with --dataset folder), or 'builtin'; `dmdd download --help` fetches the public datasets"
        )
    return root


def _source(args: argparse.Namespace) -> DataSource:
    """The dataset of ``--data``/``--dataset``/``--mask-suffix``."""
    from .data import open_source

    if args.dataset == ELPV and args.data == BUILTIN:
        args.data = ELPV  # --dataset elpv alone reads the installed package
    kind = args.data if args.data in (BUILTIN, ELPV) else args.dataset
    return open_source(_data_root(args.data), kind, mask_suffix=args.mask_suffix)


def _config(args: argparse.Namespace) -> DMDDConfig:
    overrides: dict[str, Any] = {}
    for name in ("seed", "teacher", "teacher_weights", "device", "image_size", "batch_size", "amp", "val_fraction", "texture_dir"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "steps", None):
        overrides["stage1_steps"], overrides["stage2_steps"] = args.steps
    if getattr(args, "channels_last", False):
        overrides["channels_last"] = True
    for switch in ("decouple", "aim", "msn"):
        value = getattr(args, switch, None)
        if value is not None:
            overrides[switch] = value
    preset = args.preset
    if preset == AUTO_PRESET:
        from .train import select_device

        on_gpu = select_device(overrides.get("device", "auto")).type == "cuda"
        preset = "paper" if on_gpu else "cpu"
        print(f"preset: {preset} ({'training on a CUDA GPU' if on_gpu else 'no GPU found or chosen'}; --preset "
              "chooses another)", file=sys.stderr)
    try:
        return DMDDConfig.preset(preset, **overrides)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err


def _add_common(p: argparse.ArgumentParser, preset: str = AUTO_PRESET) -> None:
    p.add_argument("--preset", default=preset, choices=[AUTO_PRESET, *sorted(PRESETS)], help="settings preset: 'paper' is the full setting of the method card (GPU), 'cpu' trains at 256x256 in at most 15 min per category on 2 CPU cores, 'fast' at 128x128 in a few minutes (a first look), 'lab' at 256x256 in about 7 min per category on a T4, 'auto' is paper with a CUDA GPU, else cpu "
                   f"(default: {preset})")
    p.add_argument("--data", default=BUILTIN, help="dataset root, 'builtin' for the generated offline dataset (default), or 'elpv' for the ELPV solar cells of the installed elpv-dataset package (image labels only)")
    _add_data_options(p)
    p.add_argument("--texture-dir", dest="texture_dir", help="folder of texture images for the synthetic anomalies (the paper's setting: DTD's dtd/images, see `dmdd download dtd`); default: the offline textures")
    p.add_argument("--val-fraction", dest="val_fraction", type=float, help="share of the training images held out for validation (default 0.1; 0 for none)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'...")
    p.add_argument("--teacher", help="teacher backbone: auto (resnet18 if its weights can be had, else tf_efficientnet_lite0), resnet18, wide_resnet50_2, tf_efficientnet_lite0, or any timm CNN")
    p.add_argument("--teacher-weights", dest="teacher_weights", help="state dict file for the teacher, instead of downloading")
    p.add_argument("--image-size", dest="image_size", type=int, help="network input side (multiple of 32)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--steps", type=int, nargs=2, metavar=("STAGE1", "STAGE2"), help="steps of the distillation and segmentation stages")
    p.add_argument("--amp", choices=AMP_MODES, help="mixed precision: auto (default: bf16 on GPUs with native bf16, compute capability >= 8.0; fp16 with a gradient scaler below, e.g. T4; fp32 on CPU), or force bf16, fp16 or off (fp32)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", help="channels_last memory format (CUDA only)")
    for switch, text in (("decouple", "normality/abnormality decoupling"), ("aim", "Abnormality Inverse Mimicking"), ("msn", "multi-perception segmentation network")):
        p.add_argument(f"--{switch}", dest=switch, action="store_true", default=None, help=f"turn on {text}")
        p.add_argument(f"--no-{switch}", dest=switch, action="store_false", help=f"turn off {text} (all three off: DeSTSeg)")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="auto", choices=DATASET_KINDS, help="layout of --data: mvtec, mpdd, visa (its split_csv), builtin, elpv (labels.csv and images/, as the elpv-dataset package installs them), folder (one category of your own: DIR/train/good, DIR/test/<type>, DIR/ground_truth/<type>), or auto (detect; default)")
    p.add_argument("--mask-suffix", dest="mask_suffix", default="_mask", help="ground-truth mask name: <image stem><suffix>.png (default _mask; '' for the image's own name)")
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true", help="leave unreadable images and unpaired masks out (each is logged, and counted in the report) instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmdd", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train on one category (resumes an interrupted run in the same --out)")
    _add_common(p)
    p.add_argument("--category", help="category folder under --data (default: the first one found)")
    p.add_argument("--out", help="run folder for checkpoint.pt and log.json (default runs/<category>)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if --out holds a checkpoint")
    p.add_argument("--evaluate", action="store_true", help="evaluate on the test split after training")

    p = sub.add_parser("evaluate", help="image and pixel AUROC of a trained model on the test (or validation) split")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt, or the run folder holding it")
    p.add_argument("--data", help="dataset root (default: the one the model was trained on)")
    _add_data_options(p)
    p.add_argument("--category", help="category (default: the one the model was trained on)")
    p.add_argument("--split", default="test", choices=("test", "val"), help="test: the dataset's labelled test images (default); val: the held-out training images with synthetic anomalies")
    p.add_argument("--resolution", default="input", choices=("input", "original"), help="compute the metrics at the model's input size (default) or at each test image's original size, as MVTec AD's own evaluation does")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the metrics to this JSON file")

    p = sub.add_parser("predict", help="anomaly maps, overlays and scores for every image in a folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint.pt or a model file of dmdd export --format torch, or the run folder holding checkpoint.pt")
    which.add_argument("--model", help="an ONNX model of dmdd export --format onnx, run by onnxruntime on CPU (--device does not apply)")
    p.add_argument("--threads", type=int, help="with --model: onnxruntime's threads (default: its own choice)")
    p.add_argument("--input", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder: maps/*.npy, overlays/*.png, masks/*.png, scores.csv")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true", help="leave unreadable images out (listed in skipped.csv) instead of stopping")

    p = sub.add_parser("export", help="write a trained model for deployment: the inference graph as ONNX (normalisation inside, the input contract and thresholds in its metadata) or a weights-only torch file")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt, or the run folder holding it")
    p.add_argument("--format", default="onnx", choices=("onnx", "torch"), help="onnx (default): for onnxruntime; torch: weights, configuration and thresholds without the optimiser state (loads with weights_only=True)")
    p.add_argument("--out", required=True, help="the file to write (model.onnx, model.pt)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--verify", action="store_true", help="with --format onnx: run the torch model and the ONNX model over the test split of the data the model was trained on (or --data) and print their largest differences and image AUROCs")
    p.add_argument("--data", help="with --verify: dataset root (default: the one the model was trained on)")
    _add_data_options(p)
    p.add_argument("--category", help="with --verify: category (default: the one the model was trained on)")

    p = sub.add_parser("quickstart", help="train and evaluate every category of a dataset, print metrics beside PaDiM and the naive baseline, write figures")
    _add_common(p, preset="fast")
    p.add_argument("--categories", nargs="+", help="categories (default: all)")
    p.add_argument("--out", help="output folder (default runs/quickstart, under $DMDD_HOME when set)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="train again even where --out holds finished runs")
    p = sub.add_parser("benchmark", help="train and evaluate every category (several seeds), resumable, sharded over torchrun ranks; tables beside the published numbers")
    _add_common(p)
    p.add_argument("--categories", nargs="+", help="categories (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds: each category is trained once per seed, tables give mean ± std (default: 0)")
    p.add_argument("--out", help="output folder (default runs/benchmark/<dataset>_<preset>)")
    p.add_argument("--resolution", default="input", choices=("input", "original"), help="compute the metrics at the model's input size (default) or at each test image's original size, as MVTec AD's own evaluation does")
    p.add_argument("--no-pro-variants", dest="pro_variants", action="store_false", help="skip the per-image and 200-threshold PRO variants (the reference AUPRO is always computed)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="train and evaluate everything again, even tasks finished before")
    p.add_argument("--merge-only", dest="merge_only", action="store_true", help="only gather the finished tasks under --out into the tables (marked incomplete if some are missing)")

    p = sub.add_parser("ablate", help="train and evaluate the ablation variants (the paper's components, our own choices) with several seeds; a table of paired differences (the paper's rows against DeSTSeg, our choices against full DMDD)")
    _add_common(p)
    p.add_argument("--categories", nargs="+", help="categories (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--variants", nargs="+", help="variant names (default: all; full DMDD is always run); --list shows them")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--out", help="output folder (default runs/ablation/<dataset>_<preset>)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="train everything again, even tasks finished before")
    p.add_argument("--reference-from", dest="reference_from", metavar="DIR", help="a benchmark folder of the same configuration (dmdd benchmark --out, or results/real_data/<dataset>): its finished results stand for full DMDD's tasks instead of training them again")
    p.add_argument("--shard", metavar="I/N", help="run only the I-th of N shares of the tasks (a class or several machines split one ablation; each task is in exactly one share), then hand the --out folder back for --merge")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="train nothing: gather the results of these ablation folders (the shares) into --out and write the whole table; results of another configuration are refused")

    p = sub.add_parser("download", help="download and extract MVTec AD, VisA or DTD (needs internet; resumable, checksum-verified)")
    p.add_argument("dataset", choices=sorted(DOWNLOADS), help="mvtec, visa, dtd (textures for the synthesis), or mpdd (prints how to get it by hand)")
    p.add_argument("--root", help="folder to put it in (default: $DMDD_DATA or ~/.cache/dmdd)")
    p.add_argument("--keep-archive", dest="keep_archive", action="store_true", help="keep the downloaded archive after extraction")
    p.add_argument("--url", help="another address for the same archive (a mirror)")
    p.add_argument("--sha256", help="the archive's SHA-256, when --url serves another file")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the server (default 15)")
    p.add_argument("--categories", nargs="+", help="mvtec only: download just these categories, each its own archive (e.g. bottle carpet), instead of the 4.9 GiB of all fifteen")
    return parser


def cmd_download(args: argparse.Namespace) -> int:
    from .data.builtin import default_data_root
    from .download import DownloadError, download_dataset, download_mvtec_categories

    root = Path(args.root).expanduser() if args.root else default_data_root()
    if args.categories and (args.dataset != "mvtec" or args.url or args.sha256):
        raise ValueError("--categories is for `dmdd download mvtec` only, without --url and --sha256")
    try:
        if args.categories:
            folder = download_mvtec_categories(args.categories, root, keep_archive=args.keep_archive, timeout=args.timeout)
        else:
            folder = download_dataset(args.dataset, root, keep_archive=args.keep_archive, url=args.url, sha256=args.sha256, timeout=args.timeout)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    if args.dataset == "dtd":
        print(f"DTD is in {folder}: train with --texture-dir {folder / 'images'}")
    else:
        print(f"{args.dataset} is in {folder}: pass --data {folder}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .fit import fit
    from .train import precision_for, select_device

    cfg = _config(args)
    source = _source(args)
    categories = source.categories()
    if not categories:
        raise FileNotFoundError(f"no categories in {source.root} (read as {source.kind}); check --data and --dataset")
    category = args.category or categories[0]
    out = Path(args.out or runs_dir(category))
    device = select_device(cfg.device)
    print(f"training DMDD ({cfg.preset_name} preset) on {source.root} ({source.kind}), category {category} -> {out}; "
          f"{device}, precision {precision_for(cfg, device)} (--amp {cfg.amp})")
    result = fit(cfg, source, category, out, resume=args.resume, skip_bad=args.skip_bad)
    last = result.log[-1] if result.log else {}
    print(f"done: step {last.get('step', cfg.total_steps)}, checkpoint {result.checkpoint}, teacher {result.model.teacher.name} ({result.model.teacher.source}), trained in {result.precision}")
    if result.input_report.summary():
        print(f"input: {result.input_report.summary()} (listed in {out / 'log.json'})")
    history = result.validation.get("history", [])
    if history:
        v = history[-1]
        print(f"val split ({result.validation['num_images']} held-out images + synthetic anomalies): image AUROC {v['image_auroc']:.3f}, pixel AUROC {v['pixel_auroc']:.3f}")
    if args.evaluate:
        from .infer import evaluate

        print(evaluate(result.model, source, category, skip_bad=args.skip_bad).summary())
    return 0


def _trained_on(state: dict[str, Any]) -> DataSource:
    """The data source a checkpoint was trained on, from its description."""
    from .data import source_from_description

    return source_from_description(state.get("data") or {"root": state["data_root"]})


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .infer import evaluate
    from .train import load_checkpoint

    model, state = load_checkpoint(args.checkpoint, args.device)
    source = _source(args) if args.data else _trained_on(state)
    category = args.category or state["category"]
    result = evaluate(model, source, category, split=args.split, skip_bad=args.skip_bad, resolution=args.resolution)
    print(result.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .infer import predict_folder

    if args.checkpoint and Path(args.checkpoint).suffix == ".onnx":
        raise ValueError(f"{args.checkpoint} is an ONNX model: pass it as --model")
    if args.model:
        from .export import OnnxModel

        model: Any = OnnxModel(args.model, threads=args.threads)
        thresholds = model.thresholds
    else:
        from .train import load_checkpoint

        model, state = load_checkpoint(args.checkpoint, args.device)
        thresholds = (state.get("validation") or {}).get("thresholds")
    csv_path = predict_folder(model, args.input, args.out, thresholds=thresholds, skip_bad=args.skip_bad)
    if thresholds is None:
        print("no validation thresholds in this model (trained with --val-fraction 0?): no anomalous column, no masks")
    print(f"wrote maps, overlays and {csv_path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import ONNX_OPSET, contract, contract_text, export_onnx, export_torch, file_size_text
    from .train import CHECKPOINT_NAME, load_checkpoint

    source = Path(args.checkpoint)
    source = source / CHECKPOINT_NAME if source.is_dir() else source
    model, state = load_checkpoint(source, "cpu")
    if args.format == "torch":
        if args.opset is not None or args.verify:
            raise ValueError("--opset and --verify are for --format onnx (a torch model file holds the checkpoint's "
                             "own weights)")
        out = export_torch(state, args.out)
        info = contract(model, state)
        print(contract_text(info, onnx=False))
    else:
        if args.verify:  # find the data before the export, so a missing folder fails at once
            if not (args.data or state.get("data") or state.get("data_root")):
                raise ValueError(f"{source} does not say which data it was trained on: pass --data with --verify")
            data = _source(args) if args.data else _trained_on(state)
            category = args.category or state["category"]
        out = Path(args.out)
        info = export_onnx(model, state, out, opset=args.opset or ONNX_OPSET)
        print(contract_text(info))
    print(f"wrote {out} ({file_size_text(out)}; the checkpoint {source} is {file_size_text(source)})")
    if "check" in info:
        check = info["check"]
        print(f"onnxruntime against torch on {check['images']} random images: max |map difference| "
              f"{check['max_map_difference']:.1e}, max |score difference| {check['max_score_difference']:.1e}")
        if args.verify:
            from .data import TestDataset
            from .export import OnnxModel, compare

            dataset = TestDataset(data, category, model.cfg.image_size, skip_bad=args.skip_bad)
            agreement = compare(model, OnnxModel(out), dataset)
            print(f"onnxruntime against torch on the test split of {category}: {agreement.summary()}")
            if agreement.problems():
                print(f"error: {out} is not the same model: {'; '.join(agreement.problems())}", file=sys.stderr)
                return 1
        print(f"run it: dmdd predict --model {out} --input FOLDER --out preds")
    else:
        print(f"run it: dmdd predict --checkpoint {out} --input FOLDER --out preds")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .report import quickstart

    cfg = _config(args)
    source = _source(args)
    categories = args.categories or source.categories()
    quickstart(cfg, source, categories, Path(args.out or runs_dir("quickstart")), skip_bad=args.skip_bad, resume=args.resume)
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import merge, run_benchmark
    from .interrupt import sigterm_as_interrupt

    if args.merge_only:
        if not args.out:
            raise SystemExit("error: --merge-only needs --out, the benchmark folder")
        merge(Path(args.out))
        return 0
    cfg = _config(args)
    source = _source(args)
    out = Path(args.out or runs_dir("benchmark", f"{source.kind}_{cfg.preset_name}"))
    sigterm_as_interrupt()  # a scheduler's or torchrun's SIGTERM stops like Ctrl-C; a rerun resumes
    run_benchmark(cfg, source, out, categories=args.categories, seeds=args.seeds, resolution=args.resolution,
                  pro_variants=args.pro_variants, resume=args.resume, skip_bad=args.skip_bad)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .ablation import VARIANTS, merge_ablation, parse_shard, run_ablation, select_variants
    from .interrupt import sigterm_as_interrupt

    if args.list:
        for v in VARIANTS.values():
            switches = ", ".join(f"{k}={val!r}" for k, val in v.overrides.items()) or "the preset unchanged"
            print(f"{v.name:22s} {v.group:5s}  {v.label}: {switches}")
        return 0
    if args.merge:
        if not args.out:
            raise ValueError("--merge needs --out: the folder the merged table goes to")
        merge_ablation(args.merge, args.out)
        return 0
    variants = select_variants(args.variants)
    shard = parse_shard(args.shard) if args.shard else None
    cfg = _config(args)
    source = _source(args)
    out = Path(args.out or runs_dir("ablation", f"{source.kind}_{cfg.preset_name}"))
    sigterm_as_interrupt()
    run_ablation(cfg, source, out, variants=variants, categories=args.categories, seeds=args.seeds, resume=args.resume,
                 reference_from=args.reference_from, shard=shard)
    return 0


COMMANDS = {
    "ablate": cmd_ablate,
    "benchmark": cmd_benchmark,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "export": cmd_export,
    "quickstart": cmd_quickstart,
    "download": cmd_download,
}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from .export import MissingExtra

    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    started = time.perf_counter()
    try:
        code = COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, RuntimeError, MissingExtra) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped.", file=sys.stderr)
        return 130
    print(f"({args.command} took {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
