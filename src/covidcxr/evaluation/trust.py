"""The trust part of a report: how many images the guard accepts, how the model does on those, how many of its
wrong calls the guard flags, and whether the batch as a whole has shifted away from the validation split."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.evaluation.metrics import binary_metrics
from covidcxr.formatting import number, percent
from covidcxr.trust.guard import Guard
from covidcxr.trust.shift import reference_scores, shift_test


def ood_summary(pred: pd.DataFrame, threshold: float, run: str | Path, positive_label: str) -> dict:
    """metrics.json's `ood`: coverage, metrics on accepted images, share of wrong predictions flagged, and `shift`."""
    has_reference = (Path(run) / "val_predictions.csv").is_file()  # runs trained before it was written lack it
    reference = reference_scores(run) if has_reference else np.zeros(0)
    shift = shift_test(reference, pred["score"].to_numpy(), threshold, positive_label)
    if "in_distribution" not in pred or pred["in_distribution"].isna().all():
        return {"guard": False, "note": "this run has no member guard (opt-in: reproduce --guard); the gate decides "
                "which images are scored", "shift": shift}
    accepted = pred["in_distribution"].astype(bool).to_numpy()
    wrong = ((pred["score"] >= threshold).astype(int) != pred["y"]).to_numpy()
    kept = pred[accepted]
    guard = Guard.load(run)
    about = {"members": len(guard.members), "density": guard.density is not None, "threshold": guard.threshold,
             **guard.info} if guard else {}
    return {"guard": True, "about_guard": about, "coverage": float(accepted.mean()), "n_accepted": int(accepted.sum()),
            "accepted": binary_metrics(kept["y"], kept["score"], threshold) if len(kept) else None,
            "n_wrong": int(wrong.sum()), "wrong_flagged": float((~accepted[wrong]).mean()) if wrong.any() else None,
            "right_flagged": float((~accepted[~wrong]).mean()) if (~wrong).any() else None, "shift": shift}


def trust_html(ood: dict) -> str:
    """The report section: the alarm in plain words first, then the guard's figures."""
    shift = ood["shift"]
    alarm = (f'<p class="note"><b>Shift alarm:</b> {html.escape(shift["message"])}</p>' if shift["alarm"]
             else f"<p>{html.escape(shift['message'])}.</p>")
    tests = (f"<p>Tests: {html.escape(shift['test'])}; alpha {shift['alpha']}, "
             f"{html.escape(shift['multiple_testing'])}; an alarm also needs a rate gap or a KS distance "
             f"of at least {shift['min_shift']:.2f} (share of images). "
             + (f"p(rate) = {shift['p_rate']:.2g}, p(KS) = {shift['p_ks']:.2g}.</p>" if "p_rate" in shift else "</p>"))
    if not ood["guard"]:
        return alarm + tests + f"<p>{html.escape(ood['note'])}.</p>"
    return alarm + tests + _guard_html(ood)


def _guard_html(ood: dict) -> str:
    """The per-image guard's figures: what it accepts, what it flags, how the model does on what it accepts."""
    acc = ood["accepted"] or {}
    guard = (f"<p>Per-image guard: {percent(ood['coverage'], 1)} of images accepted as in-distribution "
             f"({ood['n_accepted']}); it flags {percent(ood['wrong_flagged'], 1)} of the {ood['n_wrong']} wrong "
             f"predictions and {percent(ood['right_flagged'], 1)} of the right ones. On accepted images: sensitivity "
             f"{percent(acc.get('sensitivity'), 1)}, specificity {percent(acc.get('specificity'), 1)}, AUC "
             f"{number(acc.get('auc'))}. "
             "The columns in_distribution and ood_score of predictions.csv hold it per image.</p>")
    about = ood.get("about_guard") or {}
    if about.get("members"):
        seconds = about.get("cpu_seconds_per_image_run_and_members", 0)
        guard += (f"<p>The guard's {about['members']} member models are stored with the run (RUN/guard/, "
                  f"{about.get('stored_dtype', '')}, {about.get('stored_members_bytes', 0) / 1e6:.1f} MB); scoring "
                  f"an image with the run and its members took {seconds * 1e3:.1f}"
                  " ms on the CPU when the guard was fitted.</p>")
    return guard
