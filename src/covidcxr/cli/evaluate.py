"""`covidcxr evaluate`, `compare` and `diagnose`: reports on a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from covidcxr.cli.args import POSITIVE_INT_ARG, Commands


def _evaluate(a: argparse.Namespace) -> int:
    from covidcxr.evaluation.evaluate import evaluate, evaluate_split_files
    from covidcxr.formatting import NA, value_ci
    options = {"n_boot": a.n_boot, "diagnostics": a.diagnose, "lung_model": a.lung_model}
    if a.split_file:
        metrics = evaluate_split_files(a.run, a.data, a.split_file, a.out, **options)
        sens, ppv = metrics["sensitivity"], metrics["ppv"]
        print(f"COVID-19 sensitivity {value_ci(sens['value'], sens['ci95'])}  PPV {value_ci(ppv['value'], ppv['ci95'])}"
              f"  beside published figures: {Path(a.out) / 'published_comparison.md'}")
    else:
        metrics = evaluate(a.run, a.data, a.split, a.out, **options)
    auc = metrics["auc"]
    shown = f"{NA} (one class)" if auc["value"] is None else value_ci(auc["value"], auc["ci95"])
    print(f"AUC {shown}  report: {Path(a.out) / 'report.html'}")
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


def add_lung_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lung-model", dest="lung_model", help="lung checkpoint (covidcxr lungs train) for the "
                   "diagnostics' lung fields (default: the run's own, else a heuristic)")


def add_evaluate(sub: Commands) -> None:
    """`covidcxr evaluate`: metrics with CIs, figures and a report."""
    p = sub.add_parser("evaluate", help="metrics with confidence intervals, figures and an HTML report")
    p.add_argument("run", help="run folder (covidcxr train --out)")
    p.add_argument("--data", required=True,
                   help="ingested data folder: the run's own, or another for external validation (required)")
    p.add_argument("--split", default="test", choices=["test", "all"],
                   help="test: the run's test part; all: every image, except that on the run's own data its train "
                        "and validation images are left out and counted in a printed line (default test)")
    p.add_argument("--split-file", dest="split_file", nargs="+", metavar="FILE",
                   help="score the images these published split files list instead (e.g. COVIDx's test.txt: lines "
                        "`patient_id filename class source`), and write published_comparison.md: COVID-19 "
                        "sensitivity and PPV beside COVID-Net's figures (default: none)")
    p.add_argument("--out", required=True, help="report folder (required)")
    p.add_argument("--n-boot", dest="n_boot", type=POSITIVE_INT_ARG, default=1000,
                   help="bootstrap resamples for the confidence intervals (default 1000)")
    p.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                   help="skip the shortcut diagnostics, about a minute of CPU per few hundred images "
                        "(default: run them)")
    add_lung_model_flag(p)
    p.set_defaults(func=_evaluate)



def add_compare(sub: Commands) -> None:
    """`covidcxr compare`: reports side by side."""
    p = sub.add_parser("compare", help="several reports side by side")
    p.add_argument("reports", nargs="+", help="report folders (covidcxr evaluate --out)")
    p.add_argument("--out", help="folder for the table and the ROC overlay (default: print the table only)")
    p.set_defaults(func=_compare)



def add_diagnose(sub: Commands) -> None:
    """`covidcxr diagnose`: shortcut diagnostics."""
    p = sub.add_parser("diagnose", help="does the model look at the disease or at the hospital?")
    p.add_argument("run", help="run folder (covidcxr train --out)")
    p.add_argument("--data", required=True, help="ingested data folder (required)")
    p.add_argument("--out", required=True, help="folder for the diagnostics (required)")
    add_lung_model_flag(p)
    p.set_defaults(func=_diagnose)
