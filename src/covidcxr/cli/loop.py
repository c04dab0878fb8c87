"""`covidcxr feedback` and `monitor`: readers' verdicts in, the images that carry one out, the log over time."""

from __future__ import annotations

import argparse
import sys

from covidcxr.cli.args import Commands


def _feedback_import(a: argparse.Namespace) -> int:
    from covidcxr.deploy.loop.feedback import import_verdicts
    report = import_verdicts(a.db, a.csv, a.reader)
    for problem in report.problems:
        print(f"covidcxr: {problem}", file=sys.stderr)
    print(f"{report.recorded} verdict(s) recorded, {report.unchanged} already recorded, "
          f"{len(report.problems)} row(s) not used")
    return 1 if report.problems else 0


def _feedback_export(a: argparse.Namespace) -> int:
    from covidcxr.data.ingest import summarize
    from covidcxr.deploy.loop.feedback import export_site
    report = export_site(a.db, a.out, a.since)
    for problem in report.problems:
        print(f"covidcxr: {problem}", file=sys.stderr)
    print(f"{report.images} image(s) with a verdict exported to {a.out}; {len(report.problems)} verdict(s) without "
          "a kept image")
    print(summarize(a.out, limit=None))
    unreadable = report.ingest is not None and bool(report.ingest.unreadable or report.ingest.bad_rows)
    return 1 if report.problems or unreadable else 0


def _monitor(a: argparse.Namespace) -> int:
    from covidcxr.config import MonitorConfig
    from covidcxr.deploy.loop.page import write_monitor
    result = write_monitor(a.db, a.out, MonitorConfig(window=a.window, since=a.since))
    latest = result["current"]
    print(f"{result.get('n_predictions', 0)} predictions in {len(result['windows'])} window(s) of {a.window}; "
          f"written to {a.out}/monitor.html")
    if latest:
        print(f"latest window ({latest['window']}): {latest['volume']} images; {latest['shift']['message']}")
    alarms = [w["window"] for w in result["windows"] if w["shift"]["alarm"]]
    if alarms:
        print(f"shift alarm in {len(alarms)} window(s), first in window {alarms[0]}")
    for seq in result["sequential"]:
        if seq["alerts"]:
            first = seq["alerts"][0]
            print(f"model {seq['model_id']}: {len(seq['alerts'])} alert(s) on the readers' disagreement; the first in "
                  f"window {first['window']}: {first['message']}")
    return 0


def add_feedback(sub: Commands) -> None:
    """`covidcxr feedback import|export`: readers' verdicts in, a data set out."""
    feedback = sub.add_parser("feedback", help="readers' verdicts in (CSV), the images that carry one out as data")
    feedback = feedback.add_subparsers(dest="feedback_command", required=True, metavar="COMMAND")
    p = feedback.add_parser("import", help="record verdicts from a CSV (e.g. from the radiology reports)")
    p.add_argument("db", help="prediction log (serve's --db, RUN/predictions.sqlite by default; or a pacs --state "
                   "file)")
    p.add_argument("csv", help="CSV with a label column (covid, normal, pneumonia, other) and one of prediction_id, "
                   "sha256 (of the image file) or sop_instance_uid; reader and comment columns are used when present")
    p.add_argument("--reader", help="reader recorded for rows without a reader column (default: none)")
    p.set_defaults(func=_feedback_import)
    p = feedback.add_parser("export", help="the kept images that carry a verdict, as an ingested data folder")
    p.add_argument("db", help="prediction log (as for import)")
    p.add_argument("--out", required=True, help="data folder to write (as covidcxr ingest writes; its images and "
                   "metadata.csv in OUT/images) (required)")
    p.add_argument("--since", help="only predictions on or after this date, YYYY-MM-DD (default: all)")
    p.set_defaults(func=_feedback_export)


def add_monitor(sub: Commands) -> None:
    """`covidcxr monitor`: the prediction log over time."""
    from covidcxr.config.monitor import IN_CONTROL_RUN, RISE, WINDOW
    p = sub.add_parser("monitor", help="the prediction log over time: volume, refusals, positive share, shift alarm, "
                       "agreement with readers, sequential alert")
    p.add_argument("db", help="prediction log (serve's --db, RUN/predictions.sqlite by default; or a pacs --state "
                   "file)")
    p.add_argument("--out", required=True, help="folder for monitor.json, monitor.html and the plots (required)")
    p.add_argument("--window", default=WINDOW, help=f"a time span (7d, 24h) or a number of predictions (500) per "
                   f"window (default {WINDOW})")
    p.add_argument("--since", help="only predictions on or after this date, YYYY-MM-DD (default: all)")
    p.set_defaults(func=_monitor)
    p.epilog = (f"The sequential test alerts when readers disagree with the model {RISE * 100:.0f} percentage points "
                f"more often than on its validation split; when they do not, at most once per {IN_CONTROL_RUN:,} "
                "verdicts on average.")
