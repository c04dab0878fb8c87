"""`covidcxr ingest` and `covidcxr data`: database folders in, the manifest and cache out."""

from __future__ import annotations

import argparse
from pathlib import Path

from covidcxr.cli.args import COUNT_ARG, POSITIVE_INT_ARG, Commands
from covidcxr.config import SQUARE_CHOICES, IngestConfig
from covidcxr.data.sources import LAYOUTS
from covidcxr.errors import InputError


def _ingest(a: argparse.Namespace) -> int:
    from covidcxr.data.ingest import changes, ingest, summarize
    cfg = IngestConfig(size=a.size, workers=a.workers, layout=a.layout, square=a.square)
    check = None
    if a.gate:
        from covidcxr.trust.gate import Gate
        gate = Gate.load(a.gate)
        if gate is None:
            raise InputError(f"{a.gate}: this run has no gate (RUN/gate.json); fit one with covidcxr train")
        check = gate.reasons
    report = ingest(a.sources, a.out, cfg, replace=a.replace, gate=check, keep_refused=a.keep_refused)
    for root, layout in report.layouts.items():
        print(f"{root}: layout {layout}")
    for line in changes(report):
        print(line)
    print(summarize(a.out, limit=None))
    if report.refused:
        kept = sum(r["kept"] for r in report.refused)
        print(f"refused {len(report.refused)} file(s) as not frontal chest radiographs"
              + (f" ({kept} kept: --keep-refused)" if kept else "") + f"; listed in {a.out}/ingest_report.json")
    return 1 if report.unreadable or report.bad_rows or report.refused else 0


def _summary(a: argparse.Namespace) -> int:
    from covidcxr.data.ingest import summarize
    print(summarize(a.data))
    return 0


def _download(a: argparse.Namespace) -> int:
    from covidcxr.data.download import download
    for path in download(Path(a.to), a.sources or None):
        print(path)
    return 0


def add_ingest(sub: Commands) -> None:
    """`covidcxr ingest`: decode every image once into the manifest and cache."""
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
    p.add_argument("--gate", metavar="RUN_OR_FILE",
                   help="a run folder (or its gate.json) whose gate refuses what is not a frontal chest radiograph: "
                        "refused files are listed in ingest_report.json and left out (default: none; a gate is "
                        "fitted by train, on frontal films ingested first)")
    p.add_argument("--keep-refused", dest="keep_refused", action="store_true",
                   help="with --gate: list refused files but keep them in the manifest (default: leave them out)")
    p.set_defaults(func=_ingest)



def add_data(sub: Commands) -> None:
    """`covidcxr data summary|download`."""
    data = sub.add_parser("data", help="data set utilities").add_subparsers(dest="data_command", required=True,
                                                                             metavar="COMMAND")
    p = data.add_parser("summary", help="counts label x source, patients, duplicates, unreadable files")
    p.add_argument("data", help="ingested data folder (covidcxr ingest --out)")
    p.set_defaults(func=_summary)
    p = data.add_parser("download", help="download the public databases that need no credentials")
    p.add_argument("--to", required=True, help="folder to download into (required)")
    p.add_argument("--sources", nargs="+", help="database names (default: all that need no credentials)")
    p.set_defaults(func=_download)
