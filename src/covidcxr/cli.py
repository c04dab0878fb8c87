"""The `covidcxr` command: parses arguments and calls the pipeline modules, nothing else.

Exit codes: 0 all good; 1 the command ran but some inputs failed (each listed); 2 bad usage or unusable input
(one line on stderr; the traceback only with --debug).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import NoReturn

import yaml

from covidcxr.config import CROP_CHOICES, EQUALIZE_CHOICES, IngestConfig, TrainConfig, from_dict, to_dict


def _ingest(a: argparse.Namespace) -> int:
    from covidcxr.data.ingest import ingest, summarize
    report = ingest(a.sources, a.out, IngestConfig(size=a.size, workers=a.workers, layout=a.layout, square=a.square))
    for root, layout in report.layouts.items():
        print(f"{root}: layout {layout}")
    print(summarize(a.out))
    return 1 if report.unreadable else 0


def _summary(a: argparse.Namespace) -> int:
    from covidcxr.data.ingest import summarize
    print(summarize(a.data))
    return 0


def _download(a: argparse.Namespace) -> int:
    from covidcxr.data.download import download
    for path in download(Path(a.to), a.sources or None):
        print(path)
    return 0


def train_config(a: argparse.Namespace) -> TrainConfig:
    """Defaults <- --config YAML <- explicit flags."""
    values = to_dict(TrainConfig())
    if a.config:
        values.update(yaml.safe_load(Path(a.config).read_text()) or {})
    flags = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(a).items() if k in flags and v is not None})
    values["data"], values["out"] = str(a.data), str(a.out)
    if a.holdout:
        values["holdout_sources"] = a.holdout
    if a.target_sensitivity is not None:
        values["threshold_method"] = "sensitivity"
    preprocessing = {"equalize": a.equalize, "crop": a.crop, "lung_model": a.lung_model}
    values["augment"] = {**values["augment"], **{k: v for k, v in preprocessing.items() if v is not None}}
    return from_dict(TrainConfig, values)


def _train(a: argparse.Namespace) -> int:
    from covidcxr.training.trainer import train
    run = train(train_config(a), resume=a.resume)
    print(f"run written to {run}")
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from covidcxr.evaluation.evaluate import evaluate
    metrics = evaluate(a.run, a.data, a.split, a.out, n_boot=a.n_boot, diagnostics=a.diagnose, lung_model=a.lung_model)
    auc = metrics["auc"]
    print(f"AUC {auc['value']:.3f} [{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}]  report: {Path(a.out) / 'report.html'}")
    return 0


def _predict(a: argparse.Namespace) -> int:
    from covidcxr.deploy.predict import format_predictions, predict_files
    results = predict_files(a.run, a.inputs, a.cam, a.batch_size, a.reject_ood)
    print(format_predictions(results, a.format))
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"covidcxr: cannot score {r.path}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def _serve(a: argparse.Namespace) -> int:
    from covidcxr.deploy.serve.app import serve
    serve(a.run, a.host, a.port, a.db)
    return 0


def _export(a: argparse.Namespace) -> int:
    from covidcxr.deploy.export import export_run
    result = export_run(a.run, a.format, a.out)
    print(f"wrote {a.out} ({a.format}, {result['size_bytes'] / 1e6:.1f} MB); parity with covidcxr on images of "
          f"several sizes: max |diff| on probabilities = {result['max_abs_diff']:.2e}")
    print(result["contract"])
    return 0


def _reproduce(a: argparse.Namespace) -> int:
    from covidcxr.reproduce import reproduce
    summary = reproduce(a.data, a.out, weights=a.weights, quick=a.quick, device=a.device)
    print(f"summary: {summary}")
    return 0


def _calibrate(a: argparse.Namespace) -> int:
    from covidcxr.hospital.calibrate import CalibrateSettings, calibrate
    settings = CalibrateSettings(fraction=a.fraction, finetune_epochs=a.finetune_epochs, layers=a.finetune_layers,
                                 target_sensitivity=a.target_sensitivity)
    r = calibrate(a.run, a.data, a.out, settings, n_boot=a.n_boot)
    print(f"{r['summary']}; adapted run: {Path(a.out) / 'run'}")
    return 0


def _compare(a: argparse.Namespace) -> int:
    from covidcxr.evaluation.compare import compare_reports, to_markdown
    print(to_markdown(compare_reports([Path(r) for r in a.reports], Path(a.out) if a.out else None)))
    return 0


def _diagnose(a: argparse.Namespace) -> int:
    from covidcxr.evaluation.diagnose import diagnose
    diagnose(a.run, a.data, a.out, lung_model=a.lung_model)
    print(f"diagnostics written to {a.out}")
    return 0


def _experiment(a: argparse.Namespace) -> int:
    from covidcxr.experiment import run_experiment
    run_experiment(a.config, a.out, data=a.data)
    return 0


def _lungs_fetch(a: argparse.Namespace) -> int:
    from covidcxr.lungs.unet import fetch_masks
    print(fetch_masks(Path(a.out), a.find_links))
    return 0


def _lungs_train(a: argparse.Namespace) -> int:
    from covidcxr.lungs.unet import paired_images, train_lung_model
    m = train_lung_model(paired_images(Path(a.data), Path(a.masks)), Path(a.out), size=a.size, epochs=a.epochs,
                         seed=a.seed)["metrics"]
    print(f"val Dice {m['val_dice']:.3f} on {m['val_images']} held-out films ({m['train_images']} trained on); "
          f"model written to {a.out}")
    return 0


def _add_lung_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lung-model", dest="lung_model", help="lung checkpoint (covidcxr lungs train) for the diagnostics' "
                   "lung fields; default: the run's own, else a heuristic")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("data", help="ingested data folder (covidcxr ingest --out)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--config", help="YAML file with TrainConfig settings (flags override it)")
    p.add_argument("--arch", help=f"backbone (default {d.arch}; also resnet18, densenet121, efficientnet_b0)")
    p.add_argument("--weights", help="imagenet | none | PATH to a torchvision state dict or covidcxr checkpoint "
                                     f"(default {d.weights})")
    p.add_argument("--task", help=f"covid-vs-normal | covid-vs-rest | 3class (default {d.task})")
    p.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    p.add_argument("--batch-size", dest="batch_size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, help=f"learning rate of the new head (default {d.lr}); pretrained layers x0.1")
    p.add_argument("--image-size", dest="image_size", type=int, help=f"model input side (default {d.image_size})")
    p.add_argument("--device", help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic kernels (slower)")
    p.add_argument("--holdout", nargs="+", metavar="SOURCE", help="sources kept out of training (external test)")
    p.add_argument("--balance", help="class | source-class sampling (default class)")
    p.add_argument("--target-sensitivity", dest="target_sensitivity", type=float,
                   help="choose the threshold on validation data for this sensitivity (default: Youden's J)")
    p.add_argument("--domain-adversarial", dest="domain_adversarial", type=float,
                   help="weight of a gradient-reversal source head (0 = off)")
    p.add_argument("--max-train-images", dest="max_train_images", type=int, help="subsample training images")
    p.add_argument("--equalize", choices=EQUALIZE_CHOICES, help="histogram equalization of every image (default global)")
    p.add_argument("--crop", choices=CROP_CHOICES, help="crop to the content box less its border, or to the lungs "
                   "(default none)")
    p.add_argument("--lung-model", dest="lung_model", help="lung checkpoint for --crop lungs (covidcxr lungs train)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


class _Parser(argparse.ArgumentParser):
    """argparse with the exit-code contract's one-line usage error (the usage text stays in --help).

    Sub-command parsers are built from the parent's class, so this covers every sub-command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="covidcxr", description="Chest X-ray COVID-19 screening you can check.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="build the manifest and image cache from database folders")
    p.add_argument("sources", nargs="+", help="database folders (layout detected per folder)")
    p.add_argument("--out", required=True, help="data folder to create or update")
    p.add_argument("--layout", default="auto", help="auto or a layout name (see docs)")
    p.add_argument("--size", type=int, default=256, help="cached image side in pixels (default 256)")
    p.add_argument("--square", default="pad", choices=["pad", "squash", "crop"], help="how images are made square")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default: all cores)")
    p.set_defaults(func=_ingest)

    data = sub.add_parser("data", help="data set utilities").add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = data.add_parser("summary", help="counts label x source, patients, duplicates, unreadable files")
    p.add_argument("data")
    p.set_defaults(func=_summary)
    p = data.add_parser("download", help="download the public databases that need no credentials")
    p.add_argument("--to", required=True, help="folder to download into")
    p.add_argument("--sources", nargs="+", help="database names (default: all that need no credentials)")
    p.set_defaults(func=_download)

    p = sub.add_parser("train", help="fine-tune the gray model")
    _add_train_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="metrics with confidence intervals, figures and an HTML report")
    p.add_argument("run")
    p.add_argument("--data", required=True, help="ingested data folder (the run's own, or another for external validation)")
    p.add_argument("--split", default="test", choices=["test", "all"], help="test: the run's test part; all: every image")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--n-boot", dest="n_boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                   help="skip the shortcut diagnostics (about a minute of CPU per few hundred images)")
    _add_lung_model_flag(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="score image files or folders")
    p.add_argument("run")
    p.add_argument("inputs", nargs="+", help="images (PNG/JPEG/TIFF/BMP/DICOM) or folders")
    p.add_argument("--format", default="table", choices=["table", "json", "csv"])
    p.add_argument("--cam", help="folder for Grad-CAM overlays (one PNG per image)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    p.add_argument("--reject-ood", dest="reject_ood", action="store_true", help="withhold the label of images the run's guard calls out of distribution (default: label every image, flag them)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("serve", help="HTTP API and web page")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default="predictions.sqlite", help="SQLite prediction log")
    p.set_defaults(func=_serve)

    p = sub.add_parser("export", help="deployable model (ONNX or TorchScript), parity-checked")
    p.add_argument("run")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=_export)

    p = sub.add_parser("reproduce", help="the paper's experiment end to end, plus the checks it lacked")
    p.add_argument("--data", default="data/sources", help="database folder(s) root or an ingested data folder")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default="auto", help="auto | imagenet | none | PATH")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="smaller, faster settings (smoke test)")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("calibrate", help="adapt a run to a new site with some of its labelled images")
    p.add_argument("run")
    p.add_argument("--data", required=True, help="ingested data folder of the site's labelled images")
    p.add_argument("--out", required=True, help="folder for run/, before/, after/ and calibration.json")
    p.add_argument("--fraction", type=float, default=0.3, help="share of the site's patients used to adapt; the "
                   "rest is held back to measure (default 0.3)")
    p.add_argument("--finetune-epochs", dest="finetune_epochs", type=int, default=10,
                   help="fine-tuning passes over the site's images (default 10; 0: threshold and temperature only)")
    p.add_argument("--finetune-layers", dest="finetune_layers", default="head", choices=["head", "all"],
                   help="layers fine-tuning changes (default head)")
    p.add_argument("--target-sensitivity", dest="target_sensitivity", type=float,
                   help="choose the site's threshold for this sensitivity (default: Youden's J)")
    p.add_argument("--n-boot", dest="n_boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("compare", help="several reports side by side")
    p.add_argument("reports", nargs="+")
    p.add_argument("--out", help="folder for the table and the ROC overlay")
    p.set_defaults(func=_compare)

    p = sub.add_parser("diagnose", help="does the model look at the disease or at the hospital?")
    p.add_argument("run")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    _add_lung_model_flag(p)
    p.set_defaults(func=_diagnose)

    p = sub.add_parser("experiment", help="train a grid of settings under a cross-source protocol")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--data", help="ingested data folder (overrides the YAML's data)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_experiment)

    lungs = sub.add_parser("lungs", help="learned lung masks").add_subparsers(dest="lungs_command", required=True,
                                                                              metavar="COMMAND")
    p = lungs.add_parser("fetch", help="extract the hand-drawn lung masks from torchxrayvision's wheel (via pip)")
    p.add_argument("--out", required=True, help="folder to put semantic_masks_v7labs_lungs/ in")
    p.add_argument("--find-links", dest="find_links", help="folder holding the wheel (no package index is asked)")
    p.set_defaults(func=_lungs_fetch)
    p = lungs.add_parser("train", help="train the lung segmentation model on the masks")
    p.add_argument("data", help="raw data folder with metadata.csv (path, origin_path) whose images have masks")
    p.add_argument("--masks", required=True, help="mask folder (covidcxr lungs fetch prints it)")
    p.add_argument("--out", required=True, help="checkpoint file to write (a .json summary is written beside it)")
    p.add_argument("--size", type=int, default=128, help="model input side in pixels (default 128)")
    p.add_argument("--epochs", type=int, default=30, help="default 30")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.set_defaults(func=_lungs_train)
    return parser


USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("covidcxr: interrupted; finished work is saved (re-run, or --resume a training run)", file=sys.stderr)
        return 130
    except USAGE_ERRORS as exc:
        if args.debug:
            raise
        print(f"covidcxr: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever the message
        return 2


if __name__ == "__main__":
    sys.exit(main())
