"""Triage thresholds: the Learn-then-Test guarantee holds on synthetic sites whose score distributions are known, the
classes are not empty when the scores allow, and too few images are refused with the numbers needed."""

from __future__ import annotations

import numpy as np
import pytest

from covidcxr.errors import InputError
from covidcxr.hospital.triage import TriageTargets, check_enough, fit_triage, needed, triage_summary
from covidcxr.model.spec import READER, RULE_IN, RULE_OUT, triage_class


def synthetic_site(rng: np.random.Generator, n: int, prevalence: float = 0.3, separation: float = 1.2):
    """Labels and scores with a known law: logit(score) ~ Normal(+-separation, 1) by class."""
    y = (rng.uniform(size=n) < prevalence).astype(int)
    return y, 1 / (1 + np.exp(-(rng.normal(size=n) + separation * (2 * y - 1))))


@pytest.mark.slow  # 200 simulated sites
def test_the_promises_hold_with_the_stated_confidence_on_sites_with_known_scores():
    """200 sites of 300 calibration images each; each site's thresholds are judged on 20,000 fresh images of the same
    law, which stand in for the true NPV and PPV. At confidence 0.9 each promise must hold on at least 90 % of sites."""
    rng, targets = np.random.default_rng(0), TriageTargets(npv=0.95, ppv=0.90, confidence=0.9)
    npv_met, ppv_met, decided = [], [], []
    for _ in range(200):
        triage = fit_triage(*synthetic_site(rng, 300), targets)
        report = triage_summary(*synthetic_site(rng, 20_000), triage)
        npv_met.append(report[RULE_OUT]["npv"] is None or report[RULE_OUT]["npv"] >= targets.npv)
        ppv_met.append(report[RULE_IN]["ppv"] is None or report[RULE_IN]["ppv"] >= targets.ppv)
        decided.append(1 - report[READER]["share"])
    assert np.mean(npv_met) >= 0.9 and np.mean(ppv_met) >= 0.9, (np.mean(npv_met), np.mean(ppv_met))
    assert np.mean(decided) > 0.3  # not vacuous: the classes take a real share of the images


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
    assert needed(0.95, 0.9) == 45 and needed(0.90, 0.9) == 22  # 0.95^45 <= 0.1 < 0.95^44
    refusal = r"at least 45 negative and 22 positive calibration images \(there are 30 and 30\)"
    with pytest.raises(InputError, match=refusal) as refused:
        check_enough(np.r_[np.zeros(30), np.ones(30)], TriageTargets(), "site")
    assert str(refused.value) == f"site: {refused.value.reason}"  # the reason alone, for a table's cell
    check_enough(np.r_[np.zeros(45), np.ones(22)], TriageTargets(), "site")


def test_overlapping_cuts_leave_the_overlap_to_rule_in():
    y = np.r_[np.zeros(60, int), np.ones(60, int)]
    scores = np.r_[np.linspace(0.0, 0.5, 60), np.linspace(0.5001, 1.0, 60)]  # a perfect ranking: both cuts reach over
    triage = fit_triage(y, scores, TriageTargets(npv=0.8, ppv=0.8))
    assert triage["rule_out_max"] < triage["rule_in_min"]
    assert triage["n_rule_out"] == (scores <= triage["rule_out_max"]).sum()
