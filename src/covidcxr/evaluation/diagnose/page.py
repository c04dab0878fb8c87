"""The diagnostics as HTML: a section for report.html, and diagnose.html on its own."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from covidcxr.evaluation.diagnose.figures import FIGURES
from covidcxr.evaluation.diagnose.occlusion import CONDITIONS
from covidcxr.evaluation.diagnose.verdict import verdict
from covidcxr.formatting import interval, number, percent


def diagnostics_html(result: dict[str, Any], out_dir: str | Path) -> str:
    """HTML snippet (a report section body): the verdict, the key numbers and the figures embedded from out_dir."""
    head, *lines = verdict(result).split("\n\n")
    lm = result["lung_masks"]
    detail = (f'{percent(lm["sides_refined"])} of lungs also traced in the image (the rest: template only)'
              if "sides_refined" in lm else f'{lm["images_without_lungs"]} image(s) without lungs found')
    setup = (f'{result["n_images"]} images ({result["split"]} split of {Path(result["data"]).name}); lung fields: '
             f'{lm["method"]}, {detail}; blanked regions set to one gray level for all images '
             f'({result["occlusion"]["fill_level"]} of 255).')
    return (f'<div class="diagnostics"><p>{_md_inline(head)}</p>'
            f'<ul>{"".join(f"<li>{_md_inline(line)}</li>" for line in lines)}</ul>'
            f'<p class="sub">{html.escape(setup)}</p>'
            f"{_probe_table(result)}{_occlusion_table(result)}{_stats_table(result)}{_cam_table(result)}"
            f'<div class="figs">{_figures(Path(out_dir))}</div></div>')


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A table whose first column is a left-aligned label; cells are escaped."""
    def row(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(f'<{tag}{" class=k" if i == 0 else ""}>{html.escape(c)}</{tag}>'
                                for i, c in enumerate(cells)) + "</tr>"
    return "<table>" + row(header, "th") + "".join(row(r, "td") for r in rows) + "</table>"


def _probe_table(result: dict[str, Any]) -> str:
    """The source probe's figures, overall and within each label."""
    probes = {"all images": result["source_probe"].get("overall"), **result["source_probe"].get("within_label", {})}
    return _table(["source probe", "balanced accuracy", "95 % CI", "chance", "images", "sources"],
                  [[name, number(p["balanced_accuracy"]), interval(p["balanced_accuracy_ci95"]), number(p["chance"]),
                    str(p["n"]), ", ".join(p["classes"])] for name, p in probes.items() if p])


def _occlusion_table(result: dict[str, Any]) -> str:
    """AUC, sensitivity and specificity intact and occluded, and the fall of the AUC without the lungs."""
    occ, drop = result["occlusion"]["conditions"], result["occlusion"]["auc_drop"]
    return _table(["occlusion", "AUC", "95 % CI", "sensitivity", "specificity"],
                  [[c, number(occ[c]["auc"]), interval(occ[c]["auc_ci95"]), number(occ[c]["sensitivity"]),
                    number(occ[c]["specificity"])] for c in CONDITIONS]
                  + [["fall of the AUC with the lungs blanked", number(drop["value"]), interval(drop["ci95"]), "", ""]])


def _stats_table(result: dict[str, Any]) -> str:
    """How well image statistics alone (no anatomy) predict the label, per feature group."""
    return _table(["image statistics -> label", "AUC", "95 % CI", "balanced accuracy"],
                  [[k, number(v["auc"]), interval(v["auc_ci95"]), number(v["balanced_accuracy"])]
                   for k, v in result["image_stats"]["groups"].items()])


def _cam_table(result: dict[str, Any]) -> str:
    """Grad-CAM's share of attribution in the lungs, overall, per label and per source."""
    cam = result["cam"]
    parts = [("all", cam["overall"]), *cam["per_label"].items(), *cam["per_source"].items()]
    return _table(["Grad-CAM", "images", "with evidence", "share in lungs", "lung area", "ratio"],
                  [[k, str(v["sampled"]), str(v["with_evidence"]), percent(v["lung_share"]), percent(v["lung_area"]),
                    number(v["enrichment"], 2)]
                   for k, v in parts])


def _figures(out_dir: Path) -> str:
    """The figures present in out_dir, embedded so the page is one self-contained file."""
    return "".join(
        f'<figure><img alt="{alt}" src="data:image/png;base64,'
        f'{base64.b64encode((out_dir / name).read_bytes()).decode("ascii")}"><figcaption>{alt}</figcaption></figure>'
        for name, alt in FIGURES.items() if (out_dir / name).exists())


def _md_inline(text: str) -> str:
    """One line of the verdict's Markdown (bold, a leading list dash) as HTML."""
    parts = html.escape(text.removeprefix("- ")).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222;line-height:1.4;padding:0 1em}
table{border-collapse:collapse;margin:.8em 0}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td.k,th.k{text-align:left}.sub{color:#555}
.figs img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}
"""


def page(result: dict[str, Any], out_dir: Path) -> str:
    """diagnose.html: the diagnostics on a page of their own, for runs checked without a report."""
    title = f"Shortcut diagnostics: {Path(result['run']).name} on {Path(result['data']).name}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{diagnostics_html(result, out_dir)}</body></html>\n")

