"""The `covidcxr` command: parses arguments and calls the pipeline modules, nothing else.

Exit codes: 0 all good; 1 the command ran but some inputs failed (each listed); 2 bad usage or an expected failure
(a `CovidcxrError`: one line on stderr naming the thing and the fix; the traceback only with --debug). Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from tqdm.contrib.logging import logging_redirect_tqdm

from covidcxr import __version__
from covidcxr.config import (ARCH_CHOICES, AUTO, BALANCE_CHOICES, COUNT, CROP_CHOICES, EQUALIZE_CHOICES, FRACTION,
                             IMAGE_SIZE, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SQUARE_CHOICES, IngestConfig, Rule,
                             TrainConfig, from_dict, read_yaml, to_dict)
from covidcxr.data.sources import LAYOUTS
from covidcxr.data.tasks import TASKS
from covidcxr.errors import CovidcxrError, CovidcxrWarning, one_line


def _ingest(a: argparse.Namespace) -> int:
    from covidcxr.data.ingest import changes, ingest, summarize
    cfg = IngestConfig(size=a.size, workers=a.workers, layout=a.layout, square=a.square)
    report = ingest(a.sources, a.out, cfg, replace=a.replace)
    for root, layout in report.layouts.items():
        print(f"{root}: layout {layout}")
    for line in changes(report):
        print(line)
    print(summarize(a.out, limit=None))
    return 1 if report.unreadable or report.bad_rows else 0


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
        values.update(read_yaml(a.config, "TrainConfig settings"))
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
    run = train(train_config(a), resume=a.resume, keep_last=a.keep_last)
    print(f"run written to {run}")
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from covidcxr.evaluation.evaluate import evaluate
    from covidcxr.formatting import NA, value_ci
    metrics = evaluate(a.run, a.data, a.split, a.out, n_boot=a.n_boot, diagnostics=a.diagnose, lung_model=a.lung_model)
    auc = metrics["auc"]
    shown = f"{NA} (one class)" if auc["value"] is None else value_ci(auc["value"], auc["ci95"])
    print(f"AUC {shown}  report: {Path(a.out) / 'report.html'}")
    return 0


def _predict(a: argparse.Namespace) -> int:
    from covidcxr.deploy.predict import format_predictions, predict_files, use_threads
    use_threads(a.threads)
    results = predict_files(a.run, a.inputs, a.cam, a.batch_size, a.reject_ood)
    print(format_predictions(results, a.format))
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"covidcxr: cannot score {r.path}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def _serve(a: argparse.Namespace) -> int:
    from covidcxr.config import ServeConfig
    from covidcxr.deploy.serve.server import serve
    serve(ServeConfig(run=a.run, host=a.host, port=a.port, db=a.db, token_file=a.token_file, no_auth=a.no_auth,
                      threads=a.threads, request_threads=a.request_threads, engine=a.engine,
                      reject_ood=a.reject_ood, access_log=a.access_log))
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
    summary = reproduce(a.data, a.out, weights=a.weights, quick=a.quick, device=a.device, image_size=a.image_size)
    print(f"summary: {summary}")
    return 0


def _calibrate(a: argparse.Namespace) -> int:
    from covidcxr.config import CalibrateSettings
    from covidcxr.hospital.calibrate import calibrate
    settings = CalibrateSettings(fraction=a.fraction, finetune_epochs=a.finetune_epochs, layers=a.finetune_layers,
                                 target_sensitivity=a.target_sensitivity, n_boot=a.n_boot)
    r = calibrate(a.run, a.data, a.out, settings)
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
    from covidcxr.lungs.fetch import fetch_masks
    print(fetch_masks(Path(a.out), a.find_links))
    return 0


def _lungs_train(a: argparse.Namespace) -> int:
    from covidcxr.lungs.fetch import paired_images
    from covidcxr.lungs.train import train_lung_model
    m = train_lung_model(paired_images(Path(a.data), Path(a.masks)), Path(a.out), size=a.size, epochs=a.epochs,
                         seed=a.seed)["metrics"]
    print(f"val Dice {m['val_dice']:.3f} on {m['val_images']} held-out films ({m['train_images']} trained on); "
          f"model written to {a.out}")
    return 0


def _pacs_watch(a: argparse.Namespace) -> int:
    from covidcxr.hospital.watch import run_watch
    return run_watch(a.run, a.url, once=a.once, interval_s=a.interval, state_path=a.state, since=a.since, cam=a.cam,
                     credentials=a.credentials, retries=a.retries, backoff_s=a.backoff)


def _pacs_listen(a: argparse.Namespace) -> int:
    from covidcxr.hospital.listen import run_listen
    return run_listen(a.run, a.port, a.ae_title, host=a.host, store_to=a.store_to, url=a.url, state_path=a.state,
                      cam=a.cam, credentials=a.credentials, retries=a.retries, backoff_s=a.backoff)


def _add_pacs_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder whose model scores the images")
    p.add_argument("--state", default="pacs-state.sqlite", help="SQLite file of what was scored or skipped and why "
                   "(default pacs-state.sqlite)")
    p.add_argument("--cam", action="store_true", help="also store a Grad-CAM Secondary Capture (default: the SR only)")
    p.add_argument("--credentials", help="JSON file {\"token\": ...} or {\"username\": ..., \"password\": ...} for "
                   "the DICOMweb PACS (default: $COVIDCXR_PACS_TOKEN, or $COVIDCXR_PACS_USER and "
                   "$COVIDCXR_PACS_PASSWORD, else none)")
    p.add_argument("--retries", type=int, default=5, help="retries while the PACS is unreachable (default 5)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubled each retry "
                   "(default 1)")
def _typed(convert: Callable[[str], Any], rule: Rule) -> Callable[[str], Any]:
    """An argparse type that converts and checks against one of config's rules, so a bad value is a usage error
    (exit 2, one line) before any work starts."""
    accepts, what = rule

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _image_size(text: str) -> int | str:
    return AUTO if text == AUTO else int(text)


POSITIVE_INT_ARG = _typed(int, POSITIVE_INT)
COUNT_ARG = _typed(int, COUNT)
POSITIVE_ARG = _typed(float, POSITIVE)
NON_NEGATIVE_ARG = _typed(float, NON_NEGATIVE)
FRACTION_ARG = _typed(float, FRACTION)
PORT_ARG = _typed(int, (lambda v: 0 <= v <= 65535, "a port number in [0, 65535]"))
IMAGE_SIZE_ARG = _typed(_image_size, IMAGE_SIZE)


def _add_lung_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lung-model", dest="lung_model", help="lung checkpoint (covidcxr lungs train) for the "
                   "diagnostics' lung fields (default: the run's own, else a heuristic)")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """Train's flags default to None, so that only the flags given override --config (see train_config)."""
    d = TrainConfig()
    aug = d.augment
    p.add_argument("data", help="ingested data folder (covidcxr ingest --out)")
    p.add_argument("--out", required=True, help="run folder to write (required)")
    p.add_argument("--config", help="YAML file with TrainConfig settings; flags override it (default: none)")
    p.add_argument("--arch", choices=ARCH_CHOICES, help=f"backbone (default {d.arch})")
    p.add_argument("--weights", help="auto | imagenet | none | PATH to a torchvision state dict or covidcxr checkpoint "
                   f"(default {d.weights}: ImageNet weights when cached or downloadable, else random initialisation "
                   "with a warning; imagenet insists)")
    p.add_argument("--task", choices=list(TASKS), help=f"classes to tell apart (default {d.task})")
    p.add_argument("--epochs", type=POSITIVE_INT_ARG,
                   help=f"most epochs; early stopping may end sooner (default {d.epochs})")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE_INT_ARG, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=POSITIVE_ARG, help=f"learning rate of the new head; pretrained layers get x"
                   f"{d.backbone_lr_scale} (default {d.lr})")
    p.add_argument("--image-size", dest="image_size", type=IMAGE_SIZE_ARG,
                   help=f"model input side in pixels, or auto: 224 on a GPU, 112 on a CPU (default {d.image_size})")
    p.add_argument("--device", help=f"auto | cpu | cuda | cuda:N | mps (default {d.device}: cuda when available)")
    p.add_argument("--seed", type=COUNT_ARG, help=f"default {d.seed}")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic kernels, slower (default off)")
    p.add_argument("--holdout", nargs="+", metavar="SOURCE",
                   help="sources kept out of training and validation: the test part is them (default: none)")
    p.add_argument("--balance", choices=BALANCE_CHOICES, help=f"how the sampler weights images (default {d.balance})")
    p.add_argument("--target-sensitivity", dest="target_sensitivity", type=FRACTION_ARG,
                   help="choose the threshold on validation data for this sensitivity (default: Youden's J)")
    p.add_argument("--domain-adversarial", dest="domain_adversarial", type=NON_NEGATIVE_ARG,
                   help=f"weight of a gradient-reversal source head, 0 = off (default {d.domain_adversarial:g})")
    p.add_argument("--max-train-images", dest="max_train_images", type=COUNT_ARG,
                   help="subsample training images to this many, 0 = all (default 0)")
    p.add_argument("--equalize", choices=EQUALIZE_CHOICES,
                   help=f"histogram equalization of every image (default {aug.equalize})")
    p.add_argument("--crop", choices=CROP_CHOICES,
                   help=f"crop to the content box less its border, or to the lungs (default {aug.crop})")
    p.add_argument("--lung-model", dest="lung_model",
                   help="lung checkpoint for --crop lungs (covidcxr lungs train; default: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (default off)")
    p.add_argument("--keep-last", dest="keep_last", action="store_true",
                   help="keep the finished run's last.pt with its optimizer state (~2x model.pt; default: only the "
                        "record that the run is finished, since nothing can resume it)")


class _Parser(argparse.ArgumentParser):
    """argparse with the exit-code contract's one-line usage error (the usage text stays in --help).

    Sub-command parsers are built from the parent's class, so this covers every sub-command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="covidcxr", description="Chest X-ray COVID-19 screening you can check.")
    parser.add_argument("--version", action="version", version=f"covidcxr {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error (default off)")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="log warnings and errors only (default: also progress "
                          "notes)")
    loudness.add_argument("--verbose", action="store_true", help="log debugging detail too (default off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="build or add to the manifest and image cache from database folders")
    p.add_argument("sources", nargs="+", help="database folders (layout detected per folder)")
    p.add_argument("--out", required=True,
                   help="data folder to create or add to; re-ingesting a folder updates only its rows (required)")
    p.add_argument("--replace", action="store_true",
                   help="keep only the given folders' rows, dropping (and listing) the others (default: add)")
    p.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], metavar="LAYOUT",
                   help=f"database layout of every folder: auto (detected per folder) or one of {', '.join(LAYOUTS)} "
                        "(default auto)")
    p.add_argument("--size", type=POSITIVE_INT_ARG, default=256, help="cached image side in pixels (default 256)")
    p.add_argument("--square", default="pad", choices=SQUARE_CHOICES,
                   help="how images are made square (default pad)")
    p.add_argument("--workers", type=COUNT_ARG, default=0, help="decoding processes, 0 = all cores (default 0)")
    p.set_defaults(func=_ingest)

    data = sub.add_parser("data", help="data set utilities").add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = data.add_parser("summary", help="counts label x source, patients, duplicates, unreadable files")
    p.add_argument("data", help="ingested data folder (covidcxr ingest --out)")
    p.set_defaults(func=_summary)
    p = data.add_parser("download", help="download the public databases that need no credentials")
    p.add_argument("--to", required=True, help="folder to download into (required)")
    p.add_argument("--sources", nargs="+", help="database names (default: all that need no credentials)")
    p.set_defaults(func=_download)

    p = sub.add_parser("train", help="fine-tune the gray model")
    _add_train_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="metrics with confidence intervals, figures and an HTML report")
    p.add_argument("run", help="run folder (covidcxr train --out)")
    p.add_argument("--data", required=True,
                   help="ingested data folder: the run's own, or another for external validation (required)")
    p.add_argument("--split", default="test", choices=["test", "all"],
                   help="test: the run's test part; all: every image, except that on the run's own data its train "
                        "and validation images are left out and counted in a printed line (default test)")
    p.add_argument("--out", required=True, help="report folder (required)")
    p.add_argument("--n-boot", dest="n_boot", type=POSITIVE_INT_ARG, default=1000,
                   help="bootstrap resamples for the confidence intervals (default 1000)")
    p.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                   help="skip the shortcut diagnostics, about a minute of CPU per few hundred images "
                        "(default: run them)")
    _add_lung_model_flag(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="score image files or folders")
    p.add_argument("run", help="run folder (covidcxr train --out)")
    p.add_argument("inputs", nargs="+", help="images (PNG/JPEG/TIFF/BMP/DICOM) or folders")
    p.add_argument("--format", default="table", choices=["table", "json", "csv"], help="output format (default table)")
    p.add_argument("--cam", help="folder for Grad-CAM overlays, one PNG per image (default: none)")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE_INT_ARG, default=32,
                   help="images scored at once (default 32)")
    p.add_argument("--threads", type=POSITIVE_INT_ARG, default=os.cpu_count() or 1,
                   help=f"CPU threads for the model (default: one per core, {os.cpu_count() or 1} here)")
    p.add_argument("--reject-ood", dest="reject_ood", action="store_true",
                   help="withhold the label of images the run's guard calls out of distribution (default: label "
                        "every image, flag them)")
    p.set_defaults(func=_predict)

    from covidcxr.config import ENGINES, REQUEST_THREADS, SERVE_THREADS
    p = sub.add_parser("serve", help="HTTP API and web page")
    p.add_argument("run", help="run folder (covidcxr train --out)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "any other needs an access token)")
    p.add_argument("--port", type=PORT_ARG, default=8000, help="TCP port (default 8000)")
    p.add_argument("--db", help="SQLite prediction log (default RUN/predictions.sqlite)")
    p.add_argument("--token-file", dest="token_file", help="file holding the access token clients must send as "
                   "'Authorization: Bearer TOKEN' (default: $COVIDCXR_TOKEN; none on loopback)")
    p.add_argument("--no-auth", dest="no_auth", action="store_true",
                   help="serve beyond loopback without an access token (default: refused)")
    p.add_argument("--threads", type=POSITIVE_INT_ARG, default=SERVE_THREADS,
                   help=f"CPU threads for the model's batched forward passes (default {SERVE_THREADS})")
    p.add_argument("--request-threads", dest="request_threads", type=POSITIVE_INT_ARG, default=REQUEST_THREADS,
                   help=f"threads reading and decoding uploads (default {REQUEST_THREADS})")
    p.add_argument("--reject-ood", dest="reject_ood", action="store_true",
                   help="withhold the label of images the run's guard calls out of distribution (default: label "
                        "every image, flag them)")
    p.add_argument("--access-log", dest="access_log", action="store_true",
                   help="print one line per HTTP request (default off: every prediction is in the SQLite log "
                        "already, and a line per request slows the service)")
    p.add_argument("--engine", choices=ENGINES, default=ENGINES[0],
                   help="onnx: score with the run's exported graphs on onnxruntime (RUN/serving, exported on first "
                        "use), no torch in the server until a Grad-CAM is asked for; torch: score with torch "
                        f"(default {ENGINES[0]})")
    p.set_defaults(func=_serve)

    p = sub.add_parser("export", help="deployable model (ONNX or TorchScript), parity-checked")
    p.add_argument("run", help="run folder (covidcxr train --out)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "serving"],
                   help="onnx or torchscript: one file with the whole path; serving: the folder covidcxr serve scores "
                        "with on onnxruntime (RUN/serving, made by serve itself when missing) (required)")
    p.add_argument("--out", required=True, help="file (a folder for serving) to write (required)")
    p.set_defaults(func=_export)

    p = sub.add_parser("reproduce", help="the paper's experiment end to end, plus the checks it lacked")
    p.add_argument("--data", default="data/sources",
                   help="database folder(s) root or an ingested data folder (default data/sources)")
    p.add_argument("--out", required=True, help="folder for everything it writes (required)")
    p.add_argument("--weights", default="auto", help="auto | imagenet | none | PATH, as for train (default auto)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--image-size", dest="image_size", type=IMAGE_SIZE_ARG, default="auto",
                   help="model input side for every run: auto = 224 on a GPU, 112 on a CPU (default auto)")
    p.add_argument("--quick", action="store_true", help="smaller, faster settings: a smoke test (default off)")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("calibrate", help="adapt a run to a new site with some of its labelled images")
    p.add_argument("run", help="run folder to adapt (covidcxr train --out)")
    p.add_argument("--data", required=True, help="ingested data folder of the site's labelled images (required)")
    p.add_argument("--out", required=True, help="folder for run/, before/, after/ and calibration.json (required)")
    p.add_argument("--fraction", type=FRACTION_ARG, default=0.3, help="share of the site's patients used to adapt; "
                   "the rest is held back to measure (default 0.3)")
    p.add_argument("--finetune-epochs", dest="finetune_epochs", type=COUNT_ARG, default=10,
                   help="fine-tuning passes over the site's images (default 10; 0: threshold and temperature only)")
    p.add_argument("--finetune-layers", dest="finetune_layers", default="head", choices=["head", "all"],
                   help="layers fine-tuning changes (default head)")
    p.add_argument("--target-sensitivity", dest="target_sensitivity", type=FRACTION_ARG,
                   help="choose the site's threshold for this sensitivity (default: Youden's J)")
    p.add_argument("--n-boot", dest="n_boot", type=POSITIVE_INT_ARG, default=1000,
                   help="bootstrap resamples for the CIs (default 1000)")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("compare", help="several reports side by side")
    p.add_argument("reports", nargs="+", help="report folders (covidcxr evaluate --out)")
    p.add_argument("--out", help="folder for the table and the ROC overlay (default: print the table only)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("diagnose", help="does the model look at the disease or at the hospital?")
    p.add_argument("run", help="run folder (covidcxr train --out)")
    p.add_argument("--data", required=True, help="ingested data folder (required)")
    p.add_argument("--out", required=True, help="folder for the diagnostics (required)")
    _add_lung_model_flag(p)
    p.set_defaults(func=_diagnose)

    p = sub.add_parser("experiment", help="train a grid of settings under a cross-source protocol")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--data", help="ingested data folder (default: the YAML's data)")
    p.add_argument("--out", required=True, help="folder for runs and results (required)")
    p.set_defaults(func=_experiment)

    lungs = sub.add_parser("lungs", help="learned lung masks").add_subparsers(dest="lungs_command", required=True,
                                                                              metavar="COMMAND")
    p = lungs.add_parser("fetch", help="extract the hand-drawn lung masks from torchxrayvision's wheel (via pip)")
    p.add_argument("--out", required=True, help="folder to put semantic_masks_v7labs_lungs/ in (required)")
    p.add_argument("--find-links", dest="find_links",
                   help="folder holding the wheel, so no package index is asked (default: pip's index)")
    p.set_defaults(func=_lungs_fetch)
    p = lungs.add_parser("train", help="train the lung segmentation model on the masks")
    p.add_argument("data", help="raw data folder with metadata.csv (path, origin_path) whose images have masks")
    p.add_argument("--masks", required=True, help="mask folder, as covidcxr lungs fetch prints it (required)")
    p.add_argument("--out", required=True,
                   help="checkpoint file to write; a .json summary is written beside it (required)")
    p.add_argument("--size", type=POSITIVE_INT_ARG, default=128, help="model input side in pixels (default 128)")
    p.add_argument("--epochs", type=POSITIVE_INT_ARG, default=30, help="default 30")
    p.add_argument("--seed", type=COUNT_ARG, default=0, help="default 0")
    p.set_defaults(func=_lungs_train)

    pacs = sub.add_parser("pacs", help="read chest radiographs from a PACS, write DICOM Structured Reports back")
    pacs = pacs.add_subparsers(dest="pacs_command", required=True, metavar="COMMAND")
    p = pacs.add_parser("watch", help="poll a DICOMweb PACS (QIDO-RS/WADO-RS), store an SR per image (STOW-RS)")
    _add_pacs_flags(p)
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://orthanc:8042/dicom-web (required)")
    p.add_argument("--once", action="store_true", help="one poll, then exit (for cron and CI; default: keep polling)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between polls (default 60)")
    p.add_argument("--since", help="only studies on or after this date, YYYY-MM-DD (default: all)")
    p.set_defaults(func=_pacs_watch)
    p = pacs.add_parser("listen", help="DICOM C-STORE receiver for modalities that push; sends an SR per image")
    _add_pacs_flags(p)
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on (required)")
    p.add_argument("--ae-title", dest="ae_title", default="COVIDCXR", help="this receiver's AE title, also the "
                   "calling AE title when sending reports (default COVIDCXR)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for the network "
                   "(default 127.0.0.1)")
    p.add_argument("--store-to", dest="store_to", metavar="AET@HOST:PORT",
                   help="send reports by C-STORE to this DICOM node (default: none; this or --url is required)")
    p.add_argument("--url", help="send reports by STOW-RS to this DICOMweb root (default: none; this or --store-to "
                   "is required)")
    p.set_defaults(func=_pacs_listen)
    return parser


def _one_line_warnings(default: Callable[..., None]) -> Callable[..., None]:
    """A warnings.showwarning that prints covidcxr's own warnings as one line on stderr, others as `default` does."""
    def show(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
        if issubclass(category, CovidcxrWarning):
            print(f"covidcxr: warning: {one_line(message)}", file=sys.stderr)  # type: ignore[arg-type]
        else:
            default(message, category, *rest, **kwargs)
    return show


DAEMONS = {"serve", "pacs"}  # long-running commands: their log lines carry a timestamp


class _PlainFormatter(logging.Formatter):
    """A command's log line as the CLI's own lines look: info as it is, warnings and errors after `covidcxr: `."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"covidcxr: {record.levelname.lower()}: {message}"


def configure_logging(command: str, quiet: bool, verbose: bool) -> None:
    """One stderr handler on the package's logger: plain lines for commands, timestamped ones for the daemons."""
    logger = logging.getLogger("covidcxr")
    for handler in [h for h in logger.handlers if getattr(h, "covidcxr_cli", False)]:
        logger.removeHandler(handler)  # main() called again in one process (tests): one handler, today's stderr
    handler = logging.StreamHandler(sys.stderr)
    handler.covidcxr_cli = True  # type: ignore[attr-defined]  # marks the handler this function owns
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s") if command in DAEMONS
                         else _PlainFormatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.command, args.quiet, args.verbose)
    with warnings.catch_warnings(), logging_redirect_tqdm([logging.getLogger("covidcxr")]):  # lines above bars
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print("covidcxr: interrupted; finished work is saved (re-run, or --resume a training run)", file=sys.stderr)
            return 130
        except CovidcxrError as exc:  # expected failures only: a bug (KeyError, OSError, ...) keeps its traceback
            if args.debug:
                raise
            print(f"covidcxr: error: {one_line(exc)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
