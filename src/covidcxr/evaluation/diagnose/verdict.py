"""When a check counts as evidence of shortcut learning, and the plain-words verdict for verdict.md and summary.md.

Each check ends in one of three states: flag (points at a shortcut), ok (its interval rules the shortcut out) or
None, inconclusive: too few images, a model no better than chance, or an interval that spans the line. A check is
ok only when its 95 % interval clears the line, so tens of images rarely give "ok"; "No sign of shortcut learning"
needs all four checks ok, anything short of that reads "inconclusive".
"""

from __future__ import annotations

import math
from typing import Any

from covidcxr.evaluation.diagnose import probe
from covidcxr.evaluation.diagnose.crossval import MIN_PER_CLASS
from covidcxr.evaluation.diagnose.imagestats import FEATURE_GROUPS
from covidcxr.formatting import is_defined, number, percent, value_ci

PROBE_LIFT = 0.5  # (balanced accuracy - chance) / (1 - chance) of the source probe, within labels
OCCLUSION_MARGIN = 0.05  # the AUC must fall by more than this with the lungs blanked
BLANKED_AUC = 0.75  # the classes are still separated this well with the lungs blanked
STATS_AUC = 0.80  # non-anatomical image statistics predict the label this well
CAM_ENRICHMENT = 1.0  # Grad-CAM lung share / lung area share below this: attribution is not drawn to the lungs
CAM_CLEAR = 1.2  # ... and at least this to be drawn to them (coarse, central maps give about 1 spread evenly)
MIN_CAM_IMAGES = 10  # Grad-CAM maps with evidence needed before their mean says anything
CHECKS = {"source_probe": "source probe", "occlusion": "occlusion", "image_stats": "image statistics",
          "cam": "Grad-CAM"}
Judgement = tuple[bool | None, str]  # (flag, why in one plain sentence)


def flags(result: dict[str, Any]) -> dict[str, bool | None]:
    """Which checks point at a shortcut (True), rule it out (False), or cannot tell (None)."""
    return {k: flag for k, (flag, _) in judgements(result).items()}


def judgements(result: dict[str, Any]) -> dict[str, Judgement]:
    """Each check's state and the reason for it."""
    return {"source_probe": _judge_probe(result["source_probe"]), "occlusion": _judge_occlusion(result["occlusion"]),
            "image_stats": _judge_stats(result["image_stats"]), "cam": _judge_cam(result["cam"]["overall"])}


def _lift(balanced_accuracy: Any, chance: float) -> float:
    """How far above chance, 0 (chance) to 1 (perfect)."""
    return (balanced_accuracy - chance) / (1 - chance) if is_defined(balanced_accuracy) else math.nan


def _judge_probe(source_probe: dict[str, Any]) -> Judgement:
    """The labels that span several sources count (within one label the disease cannot explain the source), else
    the overall probe. Flag: a lift of PROBE_LIFT whose interval is above chance; ok: every interval below it."""
    probes = list(source_probe.get("within_label", {}).values()) or [p for p in [source_probe.get("overall")] if p]
    if not probes:
        return None, f"inconclusive: fewer than two sources with {MIN_PER_CLASS} images each."
    lifts = [[_lift(b, p["chance"]) for b in (p["balanced_accuracy"], *p["balanced_accuracy_ci95"])] for p in probes]
    if any(point >= PROBE_LIFT and lo > 0 for point, lo, _ in lifts):
        return True, "the features encode the source, which the disease cannot explain."
    if all(hi < PROBE_LIFT for _, _, hi in lifts):
        return False, "the intervals rule out a strongly encoded source."
    return None, "inconclusive: the intervals are too wide to tell (too few images)."


def _judge_occlusion(occlusion: dict[str, Any]) -> Judgement:
    """Flag: a model above chance whose AUC does not fall by OCCLUSION_MARGIN with the lungs blanked (a rise
    included), or classes that stay separated without the lungs (BLANKED_AUC, interval above chance); ok: the paired
    interval of the fall lies above the margin. A model not above chance cannot show where it looks: inconclusive."""
    c, drop = occlusion["conditions"], occlusion["auc_drop"]
    intact, blanked = c["intact"], c["lungs blanked"]
    if not is_defined(intact["auc"]):
        return None, "not measurable: the images hold one class."
    above_chance = _above(intact["auc_ci95"][0], 0.5)
    if above_chance and drop["value"] < OCCLUSION_MARGIN:
        return True, f"the AUC does not fall by {OCCLUSION_MARGIN} without the lungs: the evidence lies elsewhere."
    if blanked["auc"] >= BLANKED_AUC and _above(blanked["auc_ci95"][0], 0.5):
        return True, "the classes stay well separated without the lungs: much of the evidence lies elsewhere."
    if not above_chance:
        return None, ("inconclusive: the model does not separate the classes better than chance on these images, "
                      "so blanking cannot show where it looks.")
    if _above(drop["ci95"][0], OCCLUSION_MARGIN):
        return False, "the AUC falls without the lungs, as it should for a model that reads them."
    return None, "inconclusive: the fall of the AUC is within its uncertainty (too few images)."


def _judge_stats(image_stats: dict[str, Any]) -> Judgement:
    """Flag: all statistics together reach STATS_AUC with an interval above chance; ok: the interval is below it."""
    everything = image_stats["groups"].get("all")
    if not everything:
        return None, f"{image_stats['note']}."
    lo, hi = everything["auc_ci95"]
    if everything["auc"] >= STATS_AUC and _above(lo, 0.5):
        return True, "the data carry this shortcut."
    if is_defined(hi) and hi < STATS_AUC:
        return False, "the data carry little of this shortcut."
    return None, "inconclusive: the interval is too wide to tell (too few images)."


def _judge_cam(overall: dict[str, Any]) -> Judgement:
    """Flag: attribution less concentrated in the lungs than an even spread; ok: CAM_CLEAR times more; needs
    MIN_CAM_IMAGES maps."""
    if overall["with_evidence"] < MIN_CAM_IMAGES or not is_defined(overall["enrichment"]):
        return None, (f"inconclusive (too few images): {overall['with_evidence']} map(s) with evidence, "
                      f"{MIN_CAM_IMAGES} needed.")
    if overall["enrichment"] < CAM_ENRICHMENT:
        return True, "the evidence lies mostly outside the lungs."
    if overall["enrichment"] >= CAM_CLEAR:
        return False, "the attribution is drawn to the lungs."
    return None, (f"inconclusive: the maps are coarse and central, so a ratio below {CAM_CLEAR} is about what an "
                  "even spread gives.")


def _above(x: Any, line: float) -> bool:
    """x is a number (not None/NaN, as undefined ends of an interval are) above the line."""
    return is_defined(x) and x > line


def verdict(result: dict[str, Any]) -> str:
    """The plain-words verdict (Markdown: a headline, then one line per check) for summary.md and verdict.md."""
    judged = judgements(result)
    raised = [CHECKS[k] for k, (flag, _) in judged.items() if flag]
    unsure = [CHECKS[k] for k, (flag, _) in judged.items() if flag is None]
    if len(raised) >= 2:
        head = (f"**Shortcut learning is likely**: {len(raised)} of {len(CHECKS)} checks point at it "
                f"({', '.join(raised)}). Do not trust this model's accuracy on images from other hospitals until a "
                "cross-source test shows it.")
    elif raised:
        head = f"**Possible shortcut**: 1 of {len(CHECKS)} checks points at one ({raised[0]})."
    elif unsure:
        rest = len(CHECKS) - len(unsure)
        head = (f"**Inconclusive**: {len(unsure)} of {len(CHECKS)} checks cannot tell ({', '.join(unsure)})"
                + (f"; the other {rest} show no sign of a shortcut" if rest else "")
                + ". These images cannot rule shortcut learning out.")
    else:
        head = f"**No sign of shortcut learning** in these {len(CHECKS)} checks (which cannot prove its absence)."
    return "\n\n".join([head] + [_sentence(k, result, judged[k]) for k in CHECKS])


def _sentence(check: str, r: dict[str, Any], judged: Judgement) -> str:
    """One check's line: its state, its numbers with their intervals, and why it reads so."""
    flag, why = judged
    mark = {True: "(flag)", False: "(ok)", None: "(inconclusive)"}[flag]
    why = why[:1].upper() + why[1:]
    pos = r["positive_label"]
    if check == "source_probe":
        return f"- Source probe {mark}: {probe.describe(r['source_probe'])} {why}"
    if check == "occlusion":
        o, drop = r["occlusion"]["conditions"], r["occlusion"]["auc_drop"]
        return (f"- Occlusion {mark}: AUC {_ci(o['intact'])} on intact images, {_ci(o['lungs blanked'])} with the "
                f"lung fields blanked (a fall of {value_ci(drop['value'], drop['ci95'], 2)}) and "
                f"{_ci(o['lungs only'])} with only the lungs kept; with the lungs blanked, "
                f"{percent(o['lungs blanked']['sensitivity'])} of {pos} images are still called {pos} (intact: "
                f"{percent(o['intact']['sensitivity'])}). A model that reads the disease should drop to about 0.5 "
                f"without the lungs. {why}")
    if check == "image_stats":
        g = r["image_stats"]["groups"]
        if not g:
            return f"- Image statistics {mark}: {why}"
        best = max(FEATURE_GROUPS, key=lambda k: g[k]["auc"])
        return (f"- Image statistics {mark}: size, padding, histogram and sharpness alone (no anatomy) predict the "
                f"label with AUC {value_ci(g['all']['auc'], g['all']['auc_ci95'], 2)} (balanced accuracy "
                f"{number(g['all']['balanced_accuracy'], 2)}), {best} alone {number(g[best]['auc'], 2)}. {why}")
    c = r["cam"]["overall"]
    return (f"- Grad-CAM {mark}: {percent(c['lung_share'])} of the {pos} attribution lies inside the lung fields, "
            f"which cover {percent(c['lung_area'])} of the image (ratio {number(c['enrichment'], 2)}; "
            f"{c['with_evidence']} maps with evidence). {why}")


def _ci(condition: dict[str, Any]) -> str:
    """A condition's AUC with its interval."""
    return value_ci(condition["auc"], condition["auc_ci95"], 2)
