"""`covidcxr calibrate`, `lungs` and `pacs`: a run at a site, and the lung model it may use."""

from __future__ import annotations

import argparse
from pathlib import Path

from covidcxr.cli.args import COUNT_ARG, FRACTION_ARG, POSITIVE_ARG, POSITIVE_INT_ARG, Commands
from covidcxr.config import CANDIDATE_CHOICES, CalibrateSettings


def _calibrate(a: argparse.Namespace) -> int:
    from covidcxr.hospital.calibrate import calibrate
    settings = CalibrateSettings(fraction=a.fraction, candidates=tuple(a.candidates.split(",")), folds=a.folds,
                                 finetune_epochs=a.finetune_epochs, lr=a.lr, target_sensitivity=a.target_sensitivity,
                                 min_sensitivity=a.min_sensitivity, min_specificity=a.min_specificity, n_boot=a.n_boot,
                                 triage=a.triage, npv=a.npv, ppv=a.ppv, confidence=a.confidence)
    r = calibrate(a.run, a.data, a.out, settings)
    print(r["decision"])
    if r["triage"]:
        t = r["triage"]
        def bound(x: float | None) -> str:
            return "none (no threshold proves it)" if x is None else f"{x:.4f}"
        print(f"triage: rule-out at P <= {bound(t['rule_out_max'])}, rule-in at P >= {bound(t['rule_in_min'])} "
              f"(NPV >= {t['npv']}, PPV >= {t['ppv']}, each with probability {t['confidence']}; {t['method']}); "
              "every other image needs a reader")
    print(f"{r['summary']}; run: {Path(a.out) / 'run'}")
    return 0


def _validate(a: argparse.Namespace) -> int:
    from covidcxr.config import ValidateSettings
    from covidcxr.hospital.validate import validate
    settings = ValidateSettings(min_sensitivity=a.min_sensitivity, min_specificity=a.min_specificity,
                                prevalence=a.prevalence, n_boot=a.n_boot)
    r = validate(a.run, a.data, a.out, settings)
    print(f"{r['verdict']}: {r['reason']}; report: {Path(a.out) / 'report.html'}")
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
                     credentials=a.credentials, retries=a.retries, backoff_s=a.backoff, keep_images=a.keep_images)


def _pacs_listen(a: argparse.Namespace) -> int:
    from covidcxr.hospital.listen import run_listen
    return run_listen(a.run, a.port, a.ae_title, host=a.host, store_to=a.store_to, url=a.url, state_path=a.state,
                      cam=a.cam, credentials=a.credentials, retries=a.retries, backoff_s=a.backoff,
                      keep_images=a.keep_images)


def add_pacs_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder whose model scores the images")
    p.add_argument("--state", default="pacs-state.sqlite", help="SQLite file of what was scored or skipped and why, "
                   "and the prediction log that monitor and feedback read (default pacs-state.sqlite)")
    p.add_argument("--keep-images", dest="keep_images", metavar="DIR", help="keep each scored instance (the DICOM "
                   "file, named by its SHA-256) in DIR, so that feedback export can make a data set of those that get "
                   "a reader's verdict (default: keep none; the files hold patient data)")
    p.add_argument("--cam", action="store_true", help="also store a Grad-CAM Secondary Capture (default: the SR only)")
    p.add_argument("--credentials", help="JSON file {\"token\": ...} or {\"username\": ..., \"password\": ...} for "
                   "the DICOMweb PACS (default: $COVIDCXR_PACS_TOKEN, or $COVIDCXR_PACS_USER and "
                   "$COVIDCXR_PACS_PASSWORD, else none)")
    p.add_argument("--retries", type=int, default=5, help="retries while the PACS is unreachable (default 5)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubled each retry "
                   "(default 1)")


def add_calibrate(sub: Commands) -> None:
    """`covidcxr calibrate`: adapt a run to a site."""
    p = sub.add_parser("calibrate", help="adapt a run to a new site with some of its labelled images")
    d = CalibrateSettings()  # the defaults, said in one place
    p.add_argument("run", help="run folder to adapt (covidcxr train --out)")
    p.add_argument("--data", required=True, help="ingested data folder of the site's labelled images (required)")
    p.add_argument("--out", required=True, help="folder for run/, before/, after/ and calibration.json (required)")
    p.add_argument("--fraction", type=FRACTION_ARG, default=d.fraction, help="share of the site's patients used to "
                   f"adapt; the rest is held back to measure (default {d.fraction})")
    p.add_argument("--candidates", default=",".join(d.candidates),
                   help="what may change, comma-separated, chosen by patient-grouped cross-validation inside the "
                   f"calibration images; nothing is always a candidate (default {','.join(d.candidates)}; choices: "
                   f"{','.join(CANDIDATE_CHOICES)})")
    p.add_argument("--folds", type=POSITIVE_INT_ARG, default=d.folds, help=f"cross-validation folds (default "
                   f"{d.folds}; fewer when a class has fewer images)")
    p.add_argument("--finetune-epochs", dest="finetune_epochs", type=COUNT_ARG, default=d.finetune_epochs,
                   help=f"fine-tuning passes of the head / all candidates (default {d.finetune_epochs}; 0: they are "
                   "not tried)")
    p.add_argument("--lr", type=POSITIVE_ARG, default=d.lr,
                   help=f"fine-tuning's learning rate, SGD with momentum 0.9 (default {d.lr})")
    p.add_argument("--min-sensitivity", dest="min_sensitivity", type=FRACTION_ARG, default=d.min_sensitivity,
                   help="the site's requirement, as validate's: the threshold is set where sensitivity and "
                   "specificity clear both requirements by the widest common margin, and the before/after reports' "
                   f"verdicts use them (default {d.min_sensitivity})")
    p.add_argument("--min-specificity", dest="min_specificity", type=FRACTION_ARG, default=d.min_specificity,
                   help=f"the site's other requirement (default {d.min_specificity})")
    p.add_argument("--target-sensitivity", dest="target_sensitivity", type=FRACTION_ARG,
                   help="set the site's threshold for this sensitivity instead (default: none, aim at the "
                        "requirements)")
    p.add_argument("--n-boot", dest="n_boot", type=POSITIVE_INT_ARG, default=d.n_boot,
                   help=f"bootstrap resamples for a candidate's noise and the CIs (default {d.n_boot})")
    p.add_argument("--triage", action="store_true", help="also set rule-out and rule-in thresholds with a guarantee "
                   "(Learn-then-Test, exact two-sample tests of the next batch's rate) on the calibration images; "
                   "the rest needs a reader. "
                   "Fine-tuning is then not tried: its weights train on every calibration image (default off)")
    p.add_argument("--npv", type=FRACTION_ARG, default=d.npv, help=f"triage: promised NPV of rule-out (default "
                   f"{d.npv:.2f})")
    p.add_argument("--ppv", type=FRACTION_ARG, default=d.ppv, help=f"triage: promised PPV of rule-in (default "
                   f"{d.ppv:.2f})")
    p.add_argument("--confidence", type=FRACTION_ARG, default=d.confidence,
                   help=f"triage: probability that each promise holds (default {d.confidence})")
    p.set_defaults(func=_calibrate)



def add_validate(sub: Commands) -> None:
    """`covidcxr validate`: a local validation report."""
    p = sub.add_parser("validate", help="local validation report on a site's labelled images, with a verdict")
    p.add_argument("run", help="run folder to validate (covidcxr train or calibrate --out)")
    p.add_argument("--data", required=True, help="ingested data folder of the site's labelled images (required)")
    p.add_argument("--out", required=True, help="report folder: report.html, validation.json and evaluate's files "
                   "(required)")
    p.add_argument("--min-sensitivity", dest="min_sensitivity", type=FRACTION_ARG, default=0.85,
                   help="the lower end of sensitivity's 95 %% CI must reach this for 'validated' (default 0.85)")
    p.add_argument("--min-specificity", dest="min_specificity", type=FRACTION_ARG, default=0.70,
                   help="the lower end of specificity's 95 %% CI must reach this for 'validated' (default 0.70)")
    p.add_argument("--prevalence", type=FRACTION_ARG, help="PPV and NPV at this prevalence (default: the site's "
                   "labelled images' own)")
    p.add_argument("--n-boot", dest="n_boot", type=POSITIVE_INT_ARG, default=1000,
                   help="bootstrap resamples for the CIs (default 1000)")
    p.set_defaults(func=_validate)


def add_lungs(sub: Commands) -> None:
    """`covidcxr lungs fetch|train`: the lung segmentation model."""
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



def add_pacs(sub: Commands) -> None:
    """`covidcxr pacs watch|listen`: a run on a PACS."""
    pacs = sub.add_parser("pacs", help="read chest radiographs from a PACS, write DICOM Structured Reports back")
    pacs = pacs.add_subparsers(dest="pacs_command", required=True, metavar="COMMAND")
    p = pacs.add_parser("watch", help="poll a DICOMweb PACS (QIDO-RS/WADO-RS), store an SR per image (STOW-RS)")
    add_pacs_flags(p)
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://orthanc:8042/dicom-web (required)")
    p.add_argument("--once", action="store_true", help="one poll, then exit (for cron and CI; default: keep polling)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between polls (default 60)")
    p.add_argument("--since", help="only studies on or after this date, YYYY-MM-DD (default: all)")
    p.set_defaults(func=_pacs_watch)
    p = pacs.add_parser("listen", help="DICOM C-STORE receiver for modalities that push; sends an SR per image")
    add_pacs_flags(p)
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
