"""When a check counts as evidence of shortcut learning, and the plain-words verdict for verdict.md and summary.md."""

from __future__ import annotations

import math
from typing import Any

from covidcxr.evaluation.diagnose import probe
from covidcxr.evaluation.diagnose.imagestats import FEATURE_GROUPS

# When a check counts as evidence of shortcut learning (see `flags`).
PROBE_LIFT = 0.5  # (balanced accuracy - chance) / (1 - chance) of the source probe, within labels
BLANKED_AUC = 0.75  # the classes are still separated this well with the lungs blanked
STATS_AUC = 0.80  # non-anatomical image statistics predict the label this well
CAM_ENRICHMENT = 1.0  # Grad-CAM lung share / lung area share below this: attribution is not drawn to the lungs
CHECKS = {"source_probe": "source probe", "occlusion": "occlusion", "image_stats": "image statistics",
          "cam": "Grad-CAM"}


def flags(result: dict[str, Any]) -> dict[str, bool | None]:
    """Which checks point at a shortcut (None: the check could not be made on these images)."""
    lift = _probe_lift(result["source_probe"])
    blanked = result["occlusion"]["conditions"]["lungs blanked"]["auc"]
    stats = result["image_stats"]["groups"].get("all", {}).get("auc")
    enrichment = result["cam"]["overall"]["enrichment"]
    return {"source_probe": None if lift is None else lift >= PROBE_LIFT,
            "occlusion": None if not finite(blanked) else blanked >= BLANKED_AUC,
            "image_stats": None if not finite(stats) else stats >= STATS_AUC,
            "cam": None if not finite(enrichment) else enrichment < CAM_ENRICHMENT}


def _probe_lift(source_probe: dict[str, Any]) -> float | None:
    """How far above chance the source is predicted, 0 (chance) to 1 (perfect): the highest over the labels that span
    several sources (within one label the disease cannot explain it), else the overall probe."""
    probes = list(source_probe.get("within_label", {}).values()) or [p for p in [source_probe.get("overall")] if p]
    if not probes:
        return None
    return float(max((p["balanced_accuracy"] - p["chance"]) / (1 - p["chance"]) for p in probes))


def finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def verdict(result: dict[str, Any]) -> str:
    """The plain-words verdict (Markdown: a headline, then one line per check) for summary.md and verdict.md."""
    f = result["flags"]
    raised = [CHECKS[k] for k, v in f.items() if v]
    made = sum(v is not None for v in f.values())
    if len(raised) >= 2:
        head = (f"**Shortcut learning is likely**: {len(raised)} of {made} checks point at it ({', '.join(raised)}). "
                "Do not trust this model's accuracy on images from other hospitals until a cross-source test "
                "shows it.")
    elif raised:
        head = f"**Possible shortcut**: 1 of {made} checks points at one ({raised[0]})."
    else:
        head = f"**No sign of shortcut learning** in these {made} checks (which cannot prove its absence)."
    return "\n\n".join([head] + [_sentence(k, result) for k in CHECKS])


def _sentence(check: str, r: dict[str, Any]) -> str:
    mark = {True: "(flag)", False: "(ok)", None: "(not measurable)"}[r["flags"][check]]
    pos = r["positive_label"]
    if check == "source_probe":
        return f"- Source probe {mark}: {probe.describe(r['source_probe'])}"
    if check == "occlusion":
        o = r["occlusion"]["conditions"]
        return (f"- Occlusion {mark}: AUC {fmt(o['intact']['auc'])} on intact images, "
                f"{fmt(o['lungs blanked']['auc'])} with the lung fields blanked and {fmt(o['lungs only']['auc'])} "
                "with only the lungs kept; "
                f"with the lungs blanked, {pct(o['lungs blanked']['sensitivity'])} of {pos} images are still "
                f"called {pos} (intact: {pct(o['intact']['sensitivity'])}). A model that reads the disease "
                "should drop to about 0.5 without the lungs.")
    if check == "image_stats":
        g = r["image_stats"]["groups"]
        if not g:
            return f"- Image statistics {mark}: {r['image_stats']['note']}."
        best = max(FEATURE_GROUPS, key=lambda k: g[k]["auc"])
        return (f"- Image statistics {mark}: size, padding, histogram and sharpness alone (no anatomy) predict the "
                f"label with AUC {fmt(g['all']['auc'])} (balanced accuracy {fmt(g['all']['balanced_accuracy'])}), "
                f"{best} alone {fmt(g[best]['auc'])}: the data "
                f"{'carry' if r['flags']['image_stats'] else 'carry little of'} this shortcut.")
    c = r["cam"]["overall"]
    return (f"- Grad-CAM {mark}: {pct(c['lung_share'])} of the {pos} attribution lies inside the lung fields, "
            f"which cover {pct(c['lung_area'])} of the image (ratio {fmt(c['enrichment'], 2)}). The maps are coarse "
            "and central, so a ratio somewhat above 1 proves little; one below 1 says the evidence lies elsewhere.")


def fmt(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if finite(x) else "n/a"


def pct(x: Any) -> str:
    return f"{100 * x:.0f} %" if finite(x) else "n/a"

