"""`covidcxr monitor`'s files: monitor.json (every figure), the plots, and monitor.html that shows them in plain
words, alerts first."""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from covidcxr.config import MonitorConfig, save_json
from covidcxr.deploy.loop.monitor import QUANTILES, monitor, read_log
from covidcxr.formatting import percent, value_ci

plt.switch_backend("Agg")  # files only, no display


def write_monitor(db: str | Path, out: str | Path, cfg: MonitorConfig) -> dict:
    """Read the log, compute the windows and the sequential test, write monitor.json, the plots and monitor.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame, models = read_log(db, since=cfg.since)
    result = {"db": str(db), "written_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              **monitor(frame, models, cfg)}
    result["figures"] = {name: str(path.name) for name, path in _figures(result, out).items()}
    save_json(result, out / "monitor.json")
    (out / "monitor.html").write_text(render(result), encoding="utf-8")
    return result


def _segment_lines(ax: plt.Axes, windows: list[dict]) -> None:
    """A dotted line where a new model starts answering."""
    for before, after in zip(windows, windows[1:]):
        if after["segment"] != before["segment"]:
            ax.axvline(after["window"] - 0.5, color="0.4", linestyle=":", linewidth=1)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _rate_plot(ax: plt.Axes, x: np.ndarray, rates: list[dict], color: str, label: str) -> None:
    """Shares with their 95 % intervals as error bars (windows without cases left out)."""
    keep = [i for i, r in enumerate(rates) if r["value"] is not None]
    values = np.array([rates[i]["value"] for i in keep])
    lo = values - np.array([rates[i]["ci95"][0] for i in keep])
    hi = np.array([rates[i]["ci95"][1] for i in keep]) - values
    ax.errorbar(x[keep], values, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], fmt="o-", color=color, markersize=3,
                capsize=2, label=label)


def _figures(result: dict, out: Path) -> dict[str, Path]:
    windows = result["windows"]
    if not windows:
        return {}
    x = np.array([w["window"] for w in windows])
    figures = {}
    fig, ax = plt.subplots(figsize=(8, 3))
    scored = np.array([w["scored"] for w in windows])
    ax.fill_between(x, 0, scored, step="mid", color="#2457c5", label="scored")  # areas, not bars: 1,000s of windows
    ax.fill_between(x, scored, [w["volume"] for w in windows], step="mid", color="#e8a33d", label="not scored")
    ax.set(xlabel="window", ylabel="images", title="Volume")
    ax.legend(loc="upper left")
    _segment_lines(ax, windows)
    figures["volume"] = _save(fig, out / "volume.png")

    fig, ax = plt.subplots(figsize=(8, 3))
    _rate_plot(ax, x, [w["positive_rate"] for w in windows], "#b3261e", "here")
    reference = [w["reference_positive_rate"] for w in windows]
    ax.plot(x, [np.nan if r is None else r for r in reference], "--", color="0.3", label="validation")
    alarms = [w["window"] for w in windows if w["shift"]["alarm"]]
    ax.plot(alarms, [1.02] * len(alarms), "v", color="#b3261e", label="shift alarm")
    ax.set(xlabel="window", ylabel="share called positive", ylim=(0, 1.06), title="Share called positive")
    ax.legend(fontsize=8, loc="upper left")
    _segment_lines(ax, windows)
    figures["positive_rate"] = _save(fig, out / "positive_rate.png")

    fig, ax = plt.subplots(figsize=(8, 3))
    quant = np.array([w["score_quantiles"] or [np.nan] * len(QUANTILES) for w in windows])
    ref = np.array([w["reference_quantiles"] or [np.nan] * len(QUANTILES) for w in windows])
    ax.fill_between(x, quant[:, 0], quant[:, 4], color="#2457c5", alpha=0.15, label="10-90 % of scores here")
    ax.fill_between(x, quant[:, 1], quant[:, 3], color="#2457c5", alpha=0.35, label="25-75 %")
    ax.plot(x, quant[:, 2], color="#2457c5", label="median")
    ax.plot(x, ref[:, 2], "--", color="0.3", label="validation median")
    ax.plot(x, ref[:, 1], ":", color="0.3", label="validation 25 %, 75 %")
    ax.plot(x, ref[:, 3], ":", color="0.3")
    ax.set(xlabel="window", ylabel="score", ylim=(0, 1.3), yticks=np.linspace(0, 1, 6), title="Score distribution")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    _segment_lines(ax, windows)
    figures["scores"] = _save(fig, out / "scores.png")

    if any(w["readers"]["verdicts"] for w in windows):
        fig, ax = plt.subplots(figsize=(8, 3))
        _rate_plot(ax, x, [w["readers"]["agreement"] for w in windows], "#1e7b34", "agreement with readers")
        ax.set(xlabel="window", ylabel="share", ylim=(0, 1.02), title="Agreement with readers")
        _segment_lines(ax, windows)
        figures["agreement"] = _save(fig, out / "agreement.png")
        fig, ax = plt.subplots(figsize=(8, 3))
        offset = 0
        for seq in result["sequential"]:  # one model after the other, each verdict in the order of its prediction
            ax.plot(offset + np.arange(1, len(seq["path"]) + 1), seq["path"], linewidth=1,
                    label=f"model {seq['model_id']}")
            ax.axhline(seq["h"], color="#b3261e", linestyle="--", linewidth=1)
            alerts = [offset + a["verdicts_used"] for a in seq["alerts"]]
            ax.plot(alerts, [seq["h"]] * len(alerts), "v", color="#b3261e")
            offset += len(seq["path"])
        ax.set(xlabel="verdicts", ylabel="CUSUM", title="Readers' disagreement: CUSUM and its alert threshold h")
        ax.legend(fontsize=8, loc="upper left")
        figures["cusum"] = _save(fig, out / "cusum.png")
    return figures


def _rate(r: dict) -> str:
    return value_ci(r["value"], r["ci95"], digits=2, drop_unknown_ci=True) + f" (n={r['n']})" if r["n"] else "n/a"


def _window_row(w: dict) -> str:
    refused = "; ".join(f"{html.escape(k)}: {v}" for k, v in w["refused"].items()) or "none"
    shift = w["shift"]
    alarm = "<b>alarm</b>: " if shift["alarm"] else ""
    tests = f" (KS p {shift['p_ks']:.2g}, rate p {shift['p_rate']:.2g}, alpha {shift['alpha']:.3g})" \
        if "p_ks" in shift else ""
    readers = w["readers"]
    cells = [w["window"], html.escape(w["model_id"]), f"{w['start'][:16]} to {w['end'][:16]}", w["volume"], refused,
             _rate(w["positive_rate"]), alarm + html.escape(shift["message"]) + tests, readers["verdicts"],
             _rate(readers["agreement"]), _rate(readers["sensitivity"]), _rate(readers["specificity"]),
             _rate(w["readers_so_far"]["sensitivity"]), _rate(w["readers_so_far"]["specificity"])]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


HEADER = ("window", "model", "from - to (UTC)", "images", "not scored (why)", "called positive", "shift alarm",
          "verdicts", "agreement with readers", "sensitivity", "specificity", "sensitivity so far",
          "specificity so far")


def render(result: dict) -> str:
    """monitor.html: the alerts in plain words, then the windows, then the plots."""
    settings = result["settings"]
    alerts = [a for seq in result["sequential"] for a in seq["alerts"]]
    alarms = [w for w in result["windows"] if w["shift"]["alarm"]]
    notes = [f'<p class="alert"><b>Readers disagree more often:</b> window {a["window"]}: '
             f'{html.escape(a["message"])}</p>' for a in alerts]
    notes += [f'<p class="alert"><b>Shift alarm</b> in window {w["window"]}: {html.escape(w["shift"]["message"])}</p>'
              for w in alarms]
    seq = "".join(f"<li>model {html.escape(s['model_id'])}: {html.escape(s['test'])}, baseline disagreement "
                  f"{percent(s['p0'])} ({html.escape(s['baseline'])}), tuned to find {percent(s['p1'])}, alert at "
                  f"h = {s['h']:.2f} (a false alert at most once per {s['in_control_run']:,} verdicts on average); "
                  f"{s['verdicts']} verdicts, {len(s['alerts'])} alert(s)</li>" for s in result["sequential"])
    rows = "".join(_window_row(w) for w in result["windows"])
    figures = "".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(name)}"></figure>'
                      for name, f in result.get("figures", {}).items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>covidcxr monitor</title>
<style>body{{font:15px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1d2433}} table{{border-collapse:collapse;
font-size:.85rem}} td,th{{border:1px solid #d5dae3;padding:.25rem .4rem;vertical-align:top}}
.alert{{background:#fdecea;border:1px solid #f3b8b3;padding:.5rem .7rem;border-radius:6px}}
figure{{margin:.5rem 0}} img{{max-width:100%}}</style></head><body>
<h1>covidcxr monitor</h1>
<p>Log {html.escape(result["db"])}: {result.get("n_predictions", 0):,} predictions, windows of
{html.escape(settings["window"])}{f", since {html.escape(settings['since'])}" if settings["since"] else ""};
written {html.escape(result["written_utc"])}. A new model starts a new segment (its own reference and test).</p>
{"".join(notes) or "<p>No alert and no shift alarm.</p>"}
<h2>Sequential test on the readers' disagreement</h2><ul>{seq or "<li>no verdicts yet</li>"}</ul>
<p>Each window's shift alarm compares its scores with the model's validation scores (two-sample Kolmogorov-Smirnov
and Fisher's exact test on the share called positive) at a false-alarm rate of at most 5 % per 300 predictions
like validation's. Intervals are 95 % Wilson intervals; sensitivity and specificity take the readers' verdicts as
the truth.</p>
<h2>Windows</h2>
<table><tr>{"".join(f"<th>{h}</th>" for h in HEADER)}</tr>{rows}</table>
<h2>Plots</h2>{figures}
</body></html>
"""
