"""`covidcxr validate RUN --data SITE --out REPORT`: a local validation report a hospital's AI committee can decide on.

It scores the site's labelled images with evaluate's pieces (the same predictions, metrics.json, figures and page) and
adds what a site needs: the model card, the site's data, PPV and NPV at the site's prevalence, subgroups, the wrong
predictions with their Grad-CAM, the triage classes when the run has them, and a verdict against the site's own
minimum sensitivity and specificity, judged on the lower ends of their patient-level 95 % CIs.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.config import ValidateSettings, save_json, to_dict
from covidcxr.data.cache import ImageCache
from covidcxr.evaluation.bootstrap import bootstrap_ci, patient_bootstrap_weights, patient_codes, percentile_interval
from covidcxr.evaluation.evaluate import predictions
from covidcxr.evaluation.metrics import as_arrays, binary_metrics, weighted_metrics
from covidcxr.evaluation.metrics_json import evaluate_predictions
from covidcxr.evaluation.report import write_report
from covidcxr.evaluation.trust import ood_summary, trust_html
from covidcxr.formatting import interval, number, percent
from covidcxr.hospital.triage import triage_summary
from covidcxr.model.spec import READER, RULE_IN, RULE_OUT
from covidcxr.scoring import Scorer

VALIDATED, NOT_VALIDATED, INSUFFICIENT = "validated", "not validated", "insufficient data"
MIN_PER_CLASS = 10  # labelled images of each class, at least, for any verdict
MIN_MARGIN = 0.01  # an estimate this close to the bar: more images would not show that it clears it
MIN_SUBGROUP = 20  # a subgroup with fewer images says "too few", not a number
SUBGROUP_FIELDS = ("sex", "age_group", "view", "modality", "manufacturer")
SUBGROUP_METRICS = ("sensitivity", "specificity", "ppv", "npv", "balanced_accuracy", "auc")
UNKNOWN = frozenset({"", "unknown", "nan", "none"})
THUMB = 192  # side of a failure's Grad-CAM thumbnail, pixels

INTENDED_USE = ("Research use: a second look at frontal chest radiographs (CR/DX) of adults and children for signs "
                "of COVID-19 pneumonia. Not a diagnosis; not for lateral views, CT or other body parts; every result "
                "is read by a clinician.")
LIMITATIONS = (
    "Trained on public collections whose COVID-19 and normal images largely come from different hospitals: part of "
    "what it learnt can be the hospital, not the disease (see reproduce's cross-source figures and the shortcut "
    "diagnostics).",
    "Under the cross-source protocol (a collection never seen in training) its AUC falls well below the "
    "in-distribution figure; a site must validate it on its own labelled images before use.",
    "Only frontal chest radiographs are scored; other images are refused.",
    "The threshold was chosen on the training data's validation split; its sensitivity and specificity at another "
    "site can differ (covidcxr calibrate adapts it when that demonstrably helps).",
)


def validate(run: str | Path, data: str | Path, out: str | Path, settings: ValidateSettings | None = None,
             images: list[str] | None = None, title: str | None = None) -> dict:
    """Write REPORT (evaluate's files plus validation.json; report.html holds it all); return validation.json."""
    run, data, out = Path(run), Path(data), Path(out)
    settings = settings or ValidateSettings()
    scored, meta, provenance = predictions(run, data, "all", "cpu", images=images)
    pred, refused = split_refused(scored)
    pred = with_site_fields(pred, ImageCache(data).manifest())
    scorer = Scorer.from_run(run, "cpu")
    spec, threshold = scorer.spec, scorer.spec.threshold
    metrics = evaluate_predictions(pred.drop(columns=["cache_index", "date", *SUBGROUP_FIELDS]), threshold,
                                   spec.threshold_method, n_boot=settings.n_boot, seed=settings.seed,
                                   provenance=provenance, positive_label=spec.positive_label)
    metrics["ood"] = ood_summary(pred, threshold, run, spec.positive_label)
    prevalence = settings.prevalence if settings.prevalence is not None else float(pred["y"].mean())
    verdict, reason, more = decide(metrics, pred["y"].to_numpy(), settings)
    record: dict[str, Any] = {
        "verdict": verdict, "reason": reason, "more_images_needed": more, "requirements": to_dict(settings),
        "model_card": model_card(run, scorer), "site": site_summary(pred, refused),
        "metrics": metrics,
        "at_prevalence": at_prevalence(pred, threshold, prevalence, settings, "given" if settings.prevalence else
                                       "the site's labelled images"),
        "subgroups": subgroups(pred, threshold, settings), "refused": refused, "shift": metrics["ood"]["shift"],
        "triage": triage_summary(pred["y"], pred["score"], spec.triage) if spec.triage else None,
        "failures": failures(pred, threshold, scorer, ImageCache(data), out / "failures", settings.max_failures),
    }
    sections = [("Verdict", verdict_html(record)), ("Model card", card_html(record["model_card"])),
                ("The site's data", site_html(record["site"])),
                ("PPV and NPV at the site's prevalence", prevalence_html(record["at_prevalence"])),
                ("Subgroups", subgroups_html(record["subgroups"])),
                *([("Triage", triage_html(record["triage"]))] if record["triage"] else []),
                ("Failures: the wrong predictions, most confident first", failures_html(record["failures"], out)),
                ("Shift alarm", trust_html(metrics["ood"]))]
    title = title or f"Local validation: {spec.model_id} on {data.name}"
    write_report(out, pred.drop(columns=["cache_index"]), metrics, title, provenance, sections)
    save_json(record, out / "validation.json")
    return json.loads((out / "validation.json").read_text())


def split_refused(pred: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """(the scored rows, {reason: count} of the images the gate refused); {} when predictions carry no status."""
    if "status" not in pred:
        return pred, {}
    refused = pred[pred["status"] != "scored"]
    counts = {str(k): int(v) for k, v in refused["reason"].fillna("").value_counts().items()}
    return pred[pred["status"] == "scored"].reset_index(drop=True), counts


def with_site_fields(pred: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """The predictions with each image's cache row and the subgroup fields its manifest knows ('' where not)."""
    fields = [f for f in (*SUBGROUP_FIELDS, "date") if f in manifest]
    rows = manifest.drop_duplicates("path").set_index("path")[["cache_index", *fields]]
    out = pred.join(rows, on="path")
    for f in (*SUBGROUP_FIELDS, "date"):
        out[f] = out[f].fillna("").astype(str).str.strip() if f in out else ""
    return out


def decide(metrics: dict, y: np.ndarray, s: ValidateSettings) -> tuple[str, str, dict[str, int]]:
    """(verdict, reason, {what: how many more labelled images}): validated only when the lower ends of the 95 % CIs of
    sensitivity and specificity meet the site's minimums."""
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        more = {"positive": max(0, MIN_PER_CLASS - n_pos), "negative": max(0, MIN_PER_CLASS - n_neg)}
        return INSUFFICIENT, (f"{n_pos} positive and {n_neg} negative labelled images; a verdict needs at least "
                              f"{MIN_PER_CLASS} of each (label {more['positive']} more positive and "
                              f"{more['negative']} more negative)"), more
    prevalence = n_pos / len(y)
    problems, more = [], {}
    for name, minimum, n_class, share in (("sensitivity", s.min_sensitivity, n_pos, prevalence),
                                          ("specificity", s.min_specificity, n_neg, 1 - prevalence)):
        value, (lo, hi) = metrics[name]["value"], metrics[name]["ci95"]
        if lo is not None and lo >= minimum:
            continue
        if value < minimum:
            problems.append(f"{name} {number(value, 2)} (95 % CI {interval((lo, hi), 2)}) is below the required "
                            f"{number(minimum, 2)}")
            continue
        if value - minimum < MIN_MARGIN:
            problems.append(f"{name} {number(value, 2)} is at the required {number(minimum, 2)} (95 % CI down to "
                            f"{number(lo, 2)}): no number of images can show that it clears the bar")
            continue
        # the interval's half-width shrinks as 1/sqrt(n): n' = n (half-width / margin)^2 puts its lower end on the bar
        extra = math.ceil(n_class * ((value - lo) / (value - minimum)) ** 2) - n_class
        more[name] = math.ceil(extra / share)
        problems.append(f"{name} {number(value, 2)} meets {number(minimum, 2)} but its 95 % CI reaches down to "
                        f"{number(lo, 2)}: about {more[name]} more labelled images (at this site's prevalence) would "
                        "narrow it enough")
    if not problems:
        return VALIDATED, (f"the lower ends of the 95 % CIs meet the requirements: sensitivity "
                           f"{number(metrics['sensitivity']['ci95'][0], 2)} >= {number(s.min_sensitivity, 2)}, "
                           f"specificity {number(metrics['specificity']['ci95'][0], 2)} >= "
                           f"{number(s.min_specificity, 2)}"), {}
    return NOT_VALIDATED, "; ".join(problems), more


def at_prevalence(pred: pd.DataFrame, threshold: float, prevalence: float, s: ValidateSettings, source: str) -> dict:
    """PPV and NPV at `prevalence` from sensitivity and specificity (Bayes), with patient-level bootstrap CIs."""
    y, score = as_arrays(pred["y"].to_numpy(), pred["score"].to_numpy())

    def bayes(se: Any, sp: Any) -> tuple[Any, Any]:
        se, sp = np.asarray(se, float), np.asarray(sp, float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (se * prevalence / (se * prevalence + (1 - sp) * (1 - prevalence)),
                    sp * (1 - prevalence) / (sp * (1 - prevalence) + (1 - se) * prevalence))

    point = binary_metrics(y, score, threshold)
    ppv, npv = bayes(point["sensitivity"], point["specificity"])
    reps = [bayes(m["sensitivity"], m["specificity"]) for m in
            (weighted_metrics(y, score, threshold, w)
             for w in patient_bootstrap_weights(patient_codes(pred), s.n_boot, s.seed))]
    boot_ppv, boot_npv = (np.concatenate([r[i] for r in reps]) for i in (0, 1))
    return {"prevalence": prevalence, "prevalence_from": source,
            "ppv": {"value": _finite(ppv), "ci95": list(percentile_interval(boot_ppv))},
            "npv": {"value": _finite(npv), "ci95": list(percentile_interval(boot_npv))}}


def _finite(x: Any) -> float | None:
    value = float(x)
    return value if math.isfinite(value) else None


def subgroups(pred: pd.DataFrame, threshold: float, s: ValidateSettings) -> dict:
    """{field: {value: {n, n_patients, metric: {value, ci95}}}} for each field some image knows; a value with fewer
    than MIN_SUBGROUP images gets {n, too_few: true} instead of numbers."""
    out: dict[str, dict] = {}
    for field in SUBGROUP_FIELDS:
        values = pred[field]
        known = ~values.str.lower().isin(UNKNOWN)
        if not known.any():
            continue
        out[field] = {}
        for value, sub in pred[known].groupby(values[known], sort=True):
            if len(sub) < MIN_SUBGROUP:
                out[field][str(value)] = {"n": len(sub), "too_few": True}
                continue
            point = binary_metrics(sub["y"], sub["score"], threshold)
            ci = bootstrap_ci(sub, threshold, s.n_boot, s.seed)
            out[field][str(value)] = {"n": len(sub), "n_patients": int(patient_codes(sub).max()) + 1,
                                      **{m: {"value": _finite(point[m]), "ci95": list(ci[m])}
                                         for m in SUBGROUP_METRICS}}
    return out


def model_card(run: Path, scorer: Scorer) -> dict:
    """What the model is, what it was trained on and for, and what it cannot do."""
    spec, meta = scorer.spec, scorer.meta
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    train_images: dict = {}
    if (run / "split.csv").is_file():
        split = pd.read_csv(run / "split.csv")
        train = split[split["split"] == "train"]
        train_images = {"by_label": {str(k): int(v) for k, v in train["label"].value_counts().items()},
                        "by_source": {str(k): int(v) for k, v in train["source"].value_counts().items()}}
    return {"intended_use": INTENDED_USE, "model_id": spec.model_id, "arch": spec.arch, "task": spec.task,
            "training": spec.training, "weights": spec.weights, "transfer_learning": spec.weights == "imagenet",
            "training_data": {"data": config.get("data"), "sources": config.get("train_sources"), **train_images},
            "threshold": spec.threshold, "threshold_method": spec.threshold_method,
            "adapted_at_a_site": meta.get("calibrated"), "triage": spec.triage, "limitations": list(LIMITATIONS)}


def site_summary(pred: pd.DataFrame, refused: dict[str, int]) -> dict:
    """Counts by label and source, patients, the subgroup fields' counts, and what the gate refused."""
    table = pd.crosstab(pred["source"].astype(str), pred["label"].astype(str))
    return {"n": int(len(pred)), "n_patients": int(patient_codes(pred).max()) + 1 if len(pred) else 0,
            "positives": int(pred["y"].sum()), "by_source_and_label": {
                str(src): {str(k): int(v) for k, v in row.items() if v} for src, row in table.iterrows()},
            "fields": {f: {str(k): int(v) for k, v in pred[f].replace("", "unknown").value_counts().items()}
                       for f in SUBGROUP_FIELDS if (~pred[f].str.lower().isin(UNKNOWN)).any()},
            "dates": dates(pred), "n_refused": int(sum(refused.values()))}


def dates(pred: pd.DataFrame) -> dict | None:
    """The first and last study date and how many images have one; None when no image has a date."""
    known = pred["date"][pred["date"] != ""] if "date" in pred else pd.Series(dtype=str)
    if known.empty:
        return None
    return {"first": str(known.min()), "last": str(known.max()), "n_with_date": int(len(known))}


def failures(pred: pd.DataFrame, threshold: float, scorer: Scorer, cache: ImageCache, out: Path,
             limit: int) -> list[dict]:
    """The wrong predictions, most confident first, each with a Grad-CAM thumbnail in REPORT/failures/."""
    called = pred["score"] >= threshold
    scored = pred.assign(confidence=np.where(called, pred["score"], 1 - pred["score"]))
    wrong = scored[called.astype(int) != pred["y"]]
    wrong = wrong.sort_values("confidence", ascending=False, kind="stable").head(limit)
    if wrong.empty:
        return []
    from covidcxr.model.cam import cam_overlay  # grad-cam brings OpenCV: only when there is something to show
    out.mkdir(parents=True, exist_ok=True)
    squares = cache.load(wrong["cache_index"].astype(int)).numpy()
    rows = []
    for i, (row, square) in enumerate(zip(wrong.itertuples(), squares)):
        thumb = out / f"{i:02d}.png"
        cam_overlay(scorer, square).resize((THUMB, THUMB)).save(thumb)
        rows.append({"path": row.path, "label": row.label, "score": float(row.score),
                     "called": scorer.spec.label_for(float(row.score)), "confidence": float(row.confidence),
                     "thumbnail": str(thumb.relative_to(out.parent))})
    return rows


# --- the report's sections (trusted HTML bodies for evaluate's page; every value escaped) ---

def _e(x: Any) -> str:
    return html.escape(str(x))


def verdict_html(r: dict) -> str:
    colour = {"validated": "#1a7f37", "not validated": "#b42318"}.get(r["verdict"], "#8a5a00")
    req = r["requirements"]
    return (f'<p style="font-size:1.3em;color:{colour}"><b>{_e(r["verdict"])}</b></p><p>{_e(r["reason"])}.</p>'
            f"<p>Requirements: sensitivity &ge; {number(req['min_sensitivity'], 2)} and specificity &ge; "
            f"{number(req['min_specificity'], 2)}, judged on the lower ends of their patient-level 95 % CIs.</p>")


def card_html(card: dict) -> str:
    data = card["training_data"]
    rows = {"intended use": card["intended_use"], "training": card["training"], "model id": card["model_id"],
            "task": card["task"], "training data": f"{data.get('data')} (sources {data.get('sources')}); train "
            f"images by label {data.get('by_label', {})}",
            "threshold": f"{number(card['threshold'])} ({card['threshold_method']})",
            "adapted at a site": _adapted(card["adapted_at_a_site"]), "triage": _triage_rule(card["triage"])}
    table = "".join(f'<tr><th class="k">{_e(k)}</th><td class="k">{_e(v)}</td></tr>' for k, v in rows.items())
    limits = "".join(f"<li>{_e(x)}</li>" for x in card["limitations"])
    return f"<table>{table}</table><p>Known limitations:</p><ul>{limits}</ul>"


def _adapted(calibrated: dict | None) -> str:
    if not calibrated:
        return "no"
    return (f"{calibrated.get('changed', 'yes')} (covidcxr calibrate, from {calibrated.get('from')}; temperature "
            f"{number(calibrated.get('temperature'), 2)})")


def _triage_rule(t: dict | None) -> str:
    if not t:
        return "none"
    cut = {k: "none" if t.get(k) is None else number(t[k], 4) for k in ("rule_out_max", "rule_in_min")}
    return (f"rule-out at P <= {cut['rule_out_max']} (NPV >= {t['npv']}), rule-in at P >= {cut['rule_in_min']} (PPV >= "
            f"{t['ppv']}), each with probability {t['confidence']}; {t['method']}")


def site_html(site: dict) -> str:
    rows = "".join(f'<tr><td class="k">{_e(src)}</td><td class="k">{_e(", ".join(f"{k} {v}" for k, v in c.items()))}'
                   "</td></tr>" for src, c in site["by_source_and_label"].items())
    fields = "".join(f"<li>{_e(f)}: {_e(', '.join(f'{k} {v}' for k, v in c.items()))}</li>"
                     for f, c in site["fields"].items())
    return (f"<p>{site['n']} images of {site['n_patients']} patients, {site['positives']} positive; "
            f"{site['n_refused']} refused by the gate (see validation.json's refused). Dates: {_dates(site['dates'])}."
            "</p>"
            f'<table><tr><th class="k">source</th><th class="k">images by label</th></tr>{rows}</table>'
            + (f"<ul>{fields}</ul>" if fields else "<p>No subgroup fields (sex, age, view, modality, manufacturer) "
               "are known for these images.</p>"))


def _dates(d: dict | None) -> str:
    return "not recorded" if d is None else f"{d['first']} to {d['last']} ({d['n_with_date']} images with a date)"


def prevalence_html(p: dict) -> str:
    return (f"<p>At a prevalence of {percent(p['prevalence'], 1)} ({_e(p['prevalence_from'])}): PPV "
            f"{number(p['ppv']['value'])} ({interval(p['ppv']['ci95'])}), NPV {number(p['npv']['value'])} "
            f"({interval(p['npv']['ci95'])}); 95 % CIs from the patient-level bootstrap of sensitivity and "
            "specificity.</p>")


def subgroups_html(groups: dict) -> str:
    if not groups:
        return "<p>No subgroup field is known for these images.</p>"
    head = "".join(f"<th>{_e(m)}</th>" for m in SUBGROUP_METRICS)
    rows = ""
    for field, values in groups.items():
        for value, g in values.items():
            cells = (f'<td colspan="{len(SUBGROUP_METRICS)}" class="k">too few (fewer than {MIN_SUBGROUP} images)</td>'
                     if g.get("too_few") else "".join(
                         f'<td>{number(g[m]["value"])}<br><span class="ci">{interval(g[m]["ci95"])}</span></td>'
                         for m in SUBGROUP_METRICS))
            rows += f'<tr><td class="k">{_e(field)}</td><td class="k">{_e(value)}</td><td>{g["n"]}</td>{cells}</tr>'
    return (f'<div class="scroll"><table><tr><th class="k">field</th><th class="k">value</th><th>n</th>{head}</tr>'
            f"{rows}</table></div>")


def triage_html(t: dict) -> str:
    out, rin, reader = t[RULE_OUT], t[RULE_IN], t[READER]
    return (f"<p>Of {t['n']} images: rule-out {percent(out['share'], 1)} (NPV {number(out['npv'])}, 95 % CI "
            f"{interval(out['npv_ci95'])}; promised {number(out['promised'], 2)}), rule-in {percent(rin['share'], 1)} "
            f"(PPV {number(rin['ppv'])}, 95 % CI {interval(rin['ppv_ci95'])}; promised {number(rin['promised'], 2)}), "
            f"needs a reader {percent(reader['share'], 1)}.</p>")


def failures_html(rows: list[dict], out: Path) -> str:
    if not rows:
        return "<p>No wrong predictions.</p>"

    def figure(r: dict) -> str:
        src = "data:image/png;base64," + base64.b64encode((out / r["thumbnail"]).read_bytes()).decode("ascii")
        return (f'<figure style="display:inline-block;margin:.3em;width:{THUMB}px"><img alt="Grad-CAM" src="{src}">'
                f'<figcaption class="sub">{_e(Path(r["path"]).name)}: {_e(r["label"])}, called {_e(r["called"])} '
                f"(P {number(r['score'])})</figcaption></figure>")
    return "<div>" + "".join(figure(r) for r in rows) + "</div>"
