"""Metrics against values counted by hand on small fixed predictions, and the patient-level bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from covidcxr.evaluation import bootstrap as B
from covidcxr.evaluation import metrics as M
from covidcxr.evaluation import metrics_json as MJ
from covidcxr.model.threshold import choose_threshold

# Ten predictions, positive when score >= 0.5. A positive and a negative tie at 0.6.
Y10 = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
S10 = [0.9, 0.8, 0.6, 0.3, 0.7, 0.6, 0.4, 0.2, 0.1, 0.05]


def _frame(y, score, patient_id=None, source="s") -> pd.DataFrame:
    n = len(y)
    return pd.DataFrame({
        "path": [f"img{i}.png" for i in range(n)],
        "source": source,
        "patient_id": patient_id if patient_id is not None else [f"p{i}" for i in range(n)],
        "label": ["covid" if v else "normal" for v in y],
        "y": y,
        "score": score,
    })


def test_confusion_and_rates_counted_by_hand():
    # called positive: 0.9, 0.8, 0.6 (pos) and 0.7, 0.6 (neg) -> tp 3, fp 2; 0.3 is the missed positive
    assert M.confusion_counts(Y10, S10, 0.5) == {"tp": 3, "fp": 2, "tn": 4, "fn": 1}
    m = M.binary_metrics(Y10, S10, 0.5)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["ppv"] == pytest.approx(3 / 5)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)


def test_auc_by_counting_pairs_and_average_precision_by_hand():
    # 24 positive-negative pairs: 0.9 and 0.8 beat all 6 negatives, 0.6 beats 4, ties 1 (half) and loses
    # to 0.7, 0.3 beats 3 -> 6 + 6 + 4.5 + 3 = 19.5
    m = M.binary_metrics(Y10, S10, 0.5)
    assert m["auc"] == pytest.approx(19.5 / 24)
    # recall steps of 1/4 at precision 1 (0.9), 1 (0.8), 3/5 (0.6 with its tie), 4/7 (0.3)
    assert m["pr_auc"] == pytest.approx(0.25 * (1 + 1 + 3 / 5 + 4 / 7))


def test_undefined_metrics_are_nan_not_made_up():
    only_neg = M.binary_metrics([0, 0, 0], [0.1, 0.7, 0.2], 0.5)
    assert math.isnan(only_neg["sensitivity"]) and math.isnan(only_neg["auc"]) and math.isnan(only_neg["pr_auc"])
    assert math.isnan(only_neg["balanced_accuracy"])
    assert math.isnan(only_neg["ppv"]) and math.isnan(only_neg["npv"]) and math.isnan(only_neg["f1"])  # was 0, 1, 0
    assert only_neg["specificity"] == pytest.approx(2 / 3) and only_neg["accuracy"] == pytest.approx(2 / 3)
    nobody_called = M.binary_metrics([1, 0, 0], [0.2, 0.1, 0.3], 0.9)
    assert math.isnan(nobody_called["ppv"])
    assert nobody_called["sensitivity"] == 0.0 and nobody_called["npv"] == pytest.approx(2 / 3)


def test_positives_only_get_no_perfect_ppv_or_pr_auc():
    """With positives only, PPV and average precision would be 1 for any model: undefined, in the bootstrap too."""
    y, score = [1, 1, 1, 1], [0.9, 0.6, 0.3, 0.8]
    only_pos = M.binary_metrics(y, score, 0.5)
    assert only_pos["sensitivity"] == pytest.approx(3 / 4) and only_pos["accuracy"] == pytest.approx(3 / 4)
    for name in ("specificity", "ppv", "npv", "f1", "balanced_accuracy", "auc", "pr_auc"):
        assert math.isnan(only_pos[name]), name
    ci = B.bootstrap_ci(_frame(y, score), 0.5, n_boot=100)
    assert all(math.isnan(v) for v in ci["ppv"] + ci["pr_auc"]) and not math.isnan(ci["sensitivity"][0])


def test_bootstrap_leaves_one_class_resamples_out_of_ppv():
    """Two patients, one of each class: resamples drawing one patient twice hold one class and give no PPV, so the
    interval is that of the resamples holding both (PPV 1/2 here), not pulled to 1 by positives-only draws."""
    df = _frame([1, 0], [0.9, 0.8])
    assert B.bootstrap_ci(df, 0.5, n_boot=200)["ppv"] == (0.5, 0.5)


def test_paired_bootstrap_aucs_match_bootstrap_ci_and_pair_the_replicates():
    rng = np.random.default_rng(2)
    y = np.arange(80) % 2
    score = 1 / (1 + np.exp(-(y * 1.5 + rng.normal(0, 1, 80))))
    close = score + rng.normal(0, 0.02, 80)  # nearly the same ranking
    df = _frame(y, score)
    reps = B.bootstrap_aucs(y, [score, close], B.patient_codes(df), n_boot=300, seed=4)
    assert reps.shape == (300, 2)
    assert B.percentile_interval(reps[:, 0]) == pytest.approx(B.bootstrap_ci(df, 0.5, n_boot=300, seed=4)["auc"])
    lo, hi = B.percentile_interval(reps[:, 0])
    d_lo, d_hi = B.percentile_interval(reps[:, 0] - reps[:, 1])
    assert d_hi - d_lo < (hi - lo) / 4  # paired: the difference varies far less than either AUC
    one_class = B.bootstrap_aucs(np.ones(80, int), [score], np.arange(80), n_boot=20)
    assert np.isnan(one_class).all()


@pytest.mark.parametrize(
    ("y", "score", "message"),
    [([0, 2], [0.1, 0.2], "0/1"), ([0, 1], [0.1, float("nan")], "non-finite"), ([0, 1], [0.1], "equal length"),
     ([], [], "no predictions")],
)
def test_bad_inputs_are_one_clear_error(y, score, message):
    with pytest.raises(ValueError, match=message):
        M.binary_metrics(y, score, 0.5)


# Youden case: scores 0.1 .. 0.9, labels below. At 0.6: sens 4/5, spec 1 (J 0.8); at 0.4: sens 1, spec 3/4
# (J 0.75); at 0.5: J 0.55; every other threshold is lower.
Y_YOUDEN = [0, 0, 0, 1, 0, 1, 1, 1, 1]
S_YOUDEN = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def test_youden_threshold_is_the_known_optimum():
    assert choose_threshold(Y_YOUDEN, S_YOUDEN, "youden") == pytest.approx(0.6)


@pytest.mark.parametrize(("target", "expected"), [(1.0, 0.4), (0.8, 0.6), (0.5, 0.7), (0.2, 0.9)])
def test_target_sensitivity_takes_the_highest_threshold_reaching_it(target, expected):
    # sensitivity by threshold: 0.9 -> 1/5, 0.8 -> 2/5, 0.7 -> 3/5, 0.6 -> 4/5, 0.4 -> 5/5
    t = choose_threshold(Y_YOUDEN, S_YOUDEN, "sensitivity", target_sensitivity=target)
    assert t == pytest.approx(expected)
    assert M.binary_metrics(Y_YOUDEN, S_YOUDEN, t)["sensitivity"] >= target


def _binormal(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose log-odds are N(-1, 1) for negatives and N(+1, 1) for positives, 30 % positive: the likelihood
    ratio is 1 at log-odds 0, so Youden's optimum is the score 0.5."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y, 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 2 * y - 1)))


def test_youden_fit_finds_the_likelihood_ratio_of_one():
    y, s = _binormal(4000, 0)
    assert choose_threshold(y, s, "youden-fit") == pytest.approx(0.5, abs=0.03)


def test_youden_fit_varies_less_than_the_observed_maximum_on_few_images():
    draws = [_binormal(90, seed) for seed in range(60)]
    fit = np.std([choose_threshold(y, s, "youden-fit") for y, s in draws])
    observed = np.std([choose_threshold(y, s, "youden") for y, s in draws])
    assert fit < 0.75 * observed  # measured: about half


def test_youden_fit_takes_the_observed_maximum_when_scores_fall_with_the_label():
    y, s = np.array(Y_YOUDEN), 1 - np.array(S_YOUDEN)
    assert choose_threshold(y, s, "youden-fit") == choose_threshold(y, s, "youden")


def test_requirements_threshold_clears_both_by_the_same_margin():
    """On binormal log-odds N(-1, 1) / N(+1, 1) at cut z, sensitivity is Phi(1 - z) and specificity Phi(1 + z): the
    widest common margin over (0.85, 0.70) is where Phi(1 - z) - 0.85 = Phi(1 + z) - 0.70."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    z = brentq(lambda c: norm.cdf(1 - c) - 0.85 - (norm.cdf(1 + c) - 0.70), -3, 3)
    y, s = _binormal(6000, 1)
    t = choose_threshold(y, s, "requirements", requirements=(0.85, 0.70))
    assert np.log(t / (1 - t)) == pytest.approx(z, abs=0.08)
    m = M.binary_metrics(y, s, t)
    assert m["sensitivity"] - 0.85 == pytest.approx(m["specificity"] - 0.70, abs=0.02)
    assert m["sensitivity"] > 0.85 and m["specificity"] > 0.70  # this pair of classes can meet both


def test_requirements_threshold_shares_a_shortfall_it_cannot_avoid():
    y, s = _binormal(3000, 2)
    m = M.binary_metrics(y, s, choose_threshold(y, s, "requirements", requirements=(0.95, 0.95)))
    assert m["sensitivity"] < 0.95 and m["specificity"] < 0.95  # no cut meets both at AUC ~0.92
    assert m["sensitivity"] == pytest.approx(m["specificity"], abs=0.02)


def test_threshold_choice_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="unknown threshold method"):
        choose_threshold(Y_YOUDEN, S_YOUDEN, "median")
    with pytest.raises(ValueError, match="target_sensitivity"):
        choose_threshold(Y_YOUDEN, S_YOUDEN, "sensitivity", target_sensitivity=0.0)


def test_calibration_by_hand():
    cal = M.calibration(Y10, S10, n_bins=10)
    # one image per bin except 0.6 (two, half positive): sum over images of |frac_pos - mean score| per bin
    by_bin = 0.1 + 0.2 + 0.7 + 2 * 0.1 + 0.4 + 0.7 + 0.2 + 0.1 + 0.05
    assert cal["ece"] == pytest.approx(by_bin / 10)
    assert cal["brier"] == pytest.approx((0.01 + 0.04 + 0.16 + 0.49 + 0.49 + 0.36 + 0.16 + 0.04 + 0.01 + 0.0025) / 10)
    assert [b["count"] for b in cal["bins"]] == [1, 1, 1, 1, 1, 0, 2, 1, 1, 1]
    six = cal["bins"][6]
    assert (six["lo"], six["hi"], six["mean_score"], six["frac_positive"]) == pytest.approx((0.6, 0.7, 0.6, 0.5))
    assert math.isnan(cal["bins"][5]["mean_score"])


def test_weighted_rank_metrics_match_sklearn_sample_weight():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    score = np.round(rng.random(60), 1)  # many ties
    w = rng.integers(0, 4, (6, 60)).astype(float)
    got = M.weighted_metrics(y, score, 0.5, w)
    for i in range(6):
        assert got["auc"][i] == pytest.approx(roc_auc_score(y, score, sample_weight=w[i]))
        assert got["pr_auc"][i] == pytest.approx(average_precision_score(y, score, sample_weight=w[i]))
        called = score >= 0.5
        tp, fn = w[i][(y == 1) & called].sum(), w[i][(y == 1) & ~called].sum()
        assert got["sensitivity"][i] == pytest.approx(tp / (tp + fn))


def _paired_patients(n: int, with_ids: bool) -> pd.DataFrame:
    """Each patient: one positive and one negative image. Kind A gets both right, kind B both wrong.

    Resampling whole patients with a A and b B patients gives tp = tn = a and fp = fn = b, so sensitivity,
    specificity, accuracy and PPV are equal in every replicate; resampling images would break that.
    """
    kinds = ["A"] * (n * 2 // 3) + ["B"] * (n - n * 2 // 3)
    y, score, pid = [], [], []
    for k, kind in enumerate(kinds):
        y += [1, 0]
        score += [0.9, 0.1] if kind == "A" else [0.1, 0.9]
        pid += [f"p{k}", f"p{k}"] if with_ids else ["", None]
    return _frame(y, score, patient_id=pid)


def test_bootstrap_moves_a_patients_images_together():
    ci = B.bootstrap_ci(_paired_patients(30, with_ids=True), 0.5, n_boot=300, seed=1)
    assert ci["sensitivity"] == ci["specificity"] == ci["accuracy"] == ci["ppv"]
    assert ci["sensitivity"][0] < ci["sensitivity"][1]


def test_images_without_patient_id_are_their_own_patients():
    df = _paired_patients(30, with_ids=False)
    assert int(B.patient_codes(df).max()) + 1 == len(df)
    ci = B.bootstrap_ci(df, 0.5, n_boot=300, seed=1)
    assert ci["sensitivity"] != ci["specificity"]


def test_patient_ids_are_scoped_by_source():
    df = _frame([1, 0, 1, 0], [0.9, 0.2, 0.8, 0.1], patient_id=["1", "1", "1", "2"])
    df["source"] = ["a", "a", "b", "b"]
    assert len(set(B.patient_codes(df))) == 3


def test_bootstrap_contains_estimate_and_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    n_pat = 200
    pid = np.repeat(np.arange(n_pat), 2)
    y = (pid % 2).astype(int)
    score = 1 / (1 + np.exp(-(2.0 * (2 * y - 1) + rng.normal(0, 1.5, pid.size))))
    df = _frame(y, score, patient_id=pid.astype(str))
    ci = B.bootstrap_ci(df, 0.5, n_boot=400, seed=7)
    point = M.binary_metrics(y, score, 0.5)
    for name in M.METRIC_NAMES:
        lo, hi = ci[name]
        assert lo < point[name] < hi, name
        assert hi - lo < 0.25, name
    assert B.bootstrap_ci(df, 0.5, n_boot=400, seed=7) == ci
    assert B.bootstrap_ci(df, 0.5, n_boot=400, seed=8) != ci


def _mixed_sources() -> pd.DataFrame:
    both = _frame(Y10, S10, source="both")
    negs = _frame([0, 0, 0, 0], [0.2, 0.6, 0.1, 0.3], source="negatives")
    negs["path"] = [f"n{i}.png" for i in range(4)]
    negs["patient_id"] = ["q1", "q1", "q2", "q3"]
    return pd.concat([both, negs], ignore_index=True)


def test_evaluate_predictions_builds_the_design_structure(tmp_path):
    df = _mixed_sources()
    prov = {"config_hash": "abc", "manifest_hash": "def", "split": "test"}
    out = MJ.evaluate_predictions(df, 0.5, "youden", n_boot=200, seed=0, provenance=prov)
    for name in M.METRIC_NAMES:
        assert set(out[name]) == {"value", "ci95"} and len(out[name]["ci95"]) == 2
    assert out["threshold"] == 0.5 and out["threshold_method"] == "youden"
    assert out["confusion"] == {"tp": 3, "fp": 3, "tn": 7, "fn": 1}  # one more false positive: 0.6 negative
    assert out["n"] == 14 and out["n_patients"] == 13
    assert out["positive_label"] == "covid" and out["provenance"] == prov
    assert set(out["calibration"]) >= {"ece", "brier"}
    assert sorted(out["per_source"]) == ["both", "negatives"]
    both = out["per_source"]["both"]
    assert both["auc"]["value"] == pytest.approx(19.5 / 24) and both["n"] == 10 and "note" not in both
    negs = out["per_source"]["negatives"]
    assert negs["n"] == 4 and negs["n_patients"] == 3 and "negatives only" in negs["note"]
    assert negs["sensitivity"]["value"] is None and negs["sensitivity"]["ci95"] == [None, None]
    assert negs["specificity"]["value"] == pytest.approx(3 / 4)
    for name in ("ppv", "npv", "f1", "pr_auc"):  # one class: undefined, not the made-up 0 or 1
        assert negs[name] == {"value": None, "ci95": [None, None]}, name
    assert out["ppv"]["value"] == pytest.approx(3 / 6)  # overall both classes are present

    path = MJ.write_metrics(out, tmp_path / "metrics.json")
    text = path.read_text()
    assert "NaN" not in text and '"value": null' in text
    assert json.loads(text) == out
    assert MJ.read_metrics(path) == out


def test_write_metrics_turns_nan_into_null(tmp_path):
    path = MJ.write_metrics({"auc": {"value": float("nan"), "ci95": (np.float64(0.5), np.nan)}, "n": np.int64(3)},
                           tmp_path / "m.json")
    assert json.loads(path.read_text()) == {"auc": {"value": None, "ci95": [0.5, None]}, "n": 3}


def test_positive_label_must_be_clear():
    df = _frame([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="positive label"):
        MJ.evaluate_predictions(df, 0.5, "youden", n_boot=10)
    out = MJ.evaluate_predictions(df, 0.5, "youden", n_boot=10, positive_label="covid")
    assert out["positive_label"] == "covid" and "negatives only" in out["note"]


def test_read_metrics_names_the_bad_file(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="metrics.json: cannot read"):
        MJ.read_metrics(bad)
    bad.write_text('{"auc": 1}')
    with pytest.raises(ValueError, match="not a covidcxr metrics.json"):
        MJ.read_metrics(bad)
