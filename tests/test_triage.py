"""Triage thresholds: the Learn-then-Test guarantee holds on synthetic sites whose score distributions are known, the
classes are not empty when the scores allow, and too few images are refused with the numbers needed."""

from __future__ import annotations

import numpy as np
import pytest

from covidcxr.errors import InputError
from covidcxr.hospital.triage import TriageTargets, check_enough, fit_triage, needed, p_values, triage_summary
from covidcxr.model.spec import READER, RULE_IN, RULE_OUT, triage_class, triage_classes


def synthetic_site(rng: np.random.Generator, n: int, prevalence: float = 0.3, separation: float = 1.2):
    """Labels and scores with a known law: logit(score) ~ Normal(+-separation, 1) by class."""
    y = (rng.uniform(size=n) < prevalence).astype(int)
    return y, 1 / (1 + np.exp(-(rng.normal(size=n) + separation * (2 * y - 1))))


def promises_met(y: np.ndarray, scores: np.ndarray, triage: dict, targets: TriageTargets) -> tuple[list, list]:
    """Whether each class that took calibration images meets its promise on these fresh images in the long run (all of
    them) and on its next batch (the first as many of them as it took of the calibration images)."""
    classes, long_run, batch = triage_classes(scores, triage), [], []
    for name, label, taken, promise in ((RULE_OUT, 0, "n_rule_out", targets.npv),
                                        (RULE_IN, 1, "n_rule_in", targets.ppv)):
        if triage[taken]:
            correct = y[classes == name] == label
            long_run.append(correct.mean() >= promise)
            batch.append(correct[:triage[taken]].mean() >= promise)
    return long_run, batch


@pytest.mark.slow  # 400 simulated sites
def test_the_promises_hold_with_the_stated_confidence_on_sites_with_known_scores():
    """400 sites of 300 calibration images each. Each site's thresholds are judged on 20,000 fresh images of the same
    law: on all of them (the long-run NPV and PPV) and on each class's next batch as large as its calibration images
    (what the promise covers: the rate a site counts). At confidence 0.9 each promise must hold on at least 90 % of
    the sites where its class took images, both ways. A test of the long-run rate alone keeps the batch's promise on
    about 88 % of these sites."""
    rng, targets = np.random.default_rng(0), TriageTargets(npv=0.95, ppv=0.90, confidence=0.9)
    long_run, batch, decided = [], [], []
    for _ in range(400):
        triage = fit_triage(*synthetic_site(rng, 300, separation=1.0), targets)
        y, scores = synthetic_site(rng, 20_000, separation=1.0)
        met = promises_met(y, scores, triage, targets)
        long_run, batch = long_run + met[0], batch + met[1]
        decided.append(1 - triage_summary(y, scores, triage)[READER]["share"])
    assert np.mean(long_run) >= 0.9 and np.mean(batch) >= 0.9, (np.mean(long_run), np.mean(batch))
    assert len(batch) > 200 and np.mean(decided) > 0.15  # not vacuous: the classes take a real share of the images


def test_an_uninformative_score_rules_nothing_out_or_in():
    rng = np.random.default_rng(1)
    y, scores = (rng.uniform(size=400) < 0.5).astype(int), rng.uniform(size=400)  # scores say nothing about labels
    triage = fit_triage(y, scores, TriageTargets(npv=0.95, ppv=0.90))
    assert triage["rule_out_max"] is None and triage["rule_in_min"] is None
    assert {triage_class(s, triage) for s in scores} == {READER}


def test_thresholds_never_split_tied_scores():
    y = np.array([0] * 60 + [1] * 40)
    scores = np.r_[np.full(50, 0.1), np.full(10, 0.5), np.full(10, 0.5), np.full(30, 0.9)]
    triage = fit_triage(y, scores, TriageTargets(npv=0.9, ppv=0.9))
    assert triage["rule_out_max"] == 0.1 and triage["rule_in_min"] == 0.9  # the 0.5 block is mixed: a reader's
    assert triage["n_rule_out"] == 50 and triage["n_rule_in"] == 30


def test_too_few_images_are_refused_with_the_numbers_needed():
    # 60 all-correct images against a batch of 60: P(all 60 drawn from the 60 + 56 correct of 120) <= 0.1 < at 59
    assert needed(0.95, 0.9) == 60 and needed(0.90, 0.9) == 30
    assert p_values(np.ones(60, bool), 0.95)[-1] <= 0.1 < p_values(np.ones(59, bool), 0.95)[-1]
    refusal = r"at least 60 negative and 30 positive calibration images \(there are 30 and 30\)"
    with pytest.raises(InputError, match=refusal) as refused:
        check_enough(np.r_[np.zeros(30), np.ones(30)], TriageTargets(), "site")
    assert str(refused.value) == f"site: {refused.value.reason}"  # the reason alone, for a table's cell
    check_enough(np.r_[np.zeros(60), np.ones(30)], TriageTargets(), "site")


def test_overlapping_cuts_leave_the_overlap_to_rule_in():
    y = np.r_[np.zeros(60, int), np.ones(60, int)]
    scores = np.r_[np.linspace(0.0, 0.5, 60), np.linspace(0.5001, 1.0, 60)]  # a perfect ranking: both cuts reach over
    triage = fit_triage(y, scores, TriageTargets(npv=0.8, ppv=0.8))
    assert triage["rule_out_max"] < triage["rule_in_min"]
    assert triage["n_rule_out"] == (scores <= triage["rule_out_max"]).sum()
