"""Patient-level splits: no patient in two parts, requested fractions per source and label."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidcxr.data.splits import (
    INTERNAL_TEST,
    LeakageError,
    assert_patient_disjoint,
    leave_sources_out,
    patient_split,
)


def _frame(n_patients: int = 3000, seed: int = 0, prefix: str = "p") -> pd.DataFrame:
    """1-6 images per patient; one label and one source per patient, as in the real databases."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, n_patients)
    patients = np.repeat([f"{prefix}{i}" for i in range(n_patients)], counts)
    labels = np.repeat(rng.choice(["covid", "normal", "pneumonia"], n_patients, p=[0.5, 0.35, 0.15]), counts)
    sources = np.repeat(rng.choice(["a", "b", "c"], n_patients), counts)
    return pd.DataFrame({"path": [f"/img/{i}.png" for i in range(len(patients))], "patient_id": patients,
                         "label": labels, "source": sources})


def _parts_per_patient(df: pd.DataFrame, split: pd.Series) -> pd.Series:
    return pd.DataFrame({"p": df["patient_id"], "s": split}).groupby("p")["s"].nunique()


def test_no_patient_in_two_parts():
    df = _frame()
    split = patient_split(df)
    assert df.groupby("patient_id").size().max() > 1  # the check below means something
    assert _parts_per_patient(df, split).max() == 1
    assert set(split) == {"train", "val", "test"} and split.index.equals(df.index)


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.5, 0.2, 0.3)])
def test_fractions_hold_per_label(fractions):
    df = _frame(6000)
    split = patient_split(df, fractions, seed=3)
    patients = pd.DataFrame({"p": df["patient_id"], "label": df["label"], "s": split}).drop_duplicates("p")
    for label, group in patients.groupby("label"):
        got = group["s"].value_counts(normalize=True).reindex(["train", "val", "test"], fill_value=0)
        # the smallest label has ~900 patients: binomial sd of a fraction is < 0.017
        np.testing.assert_allclose(got.to_numpy(), fractions, atol=0.05, err_msg=label)


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.5, 0.2, 0.3)])
def test_every_source_and_label_gets_the_fractions_up_to_one_patient(fractions):
    df = _frame(400, seed=5)  # strata of ~20-70 patients, where a draw per patient strays by several
    split = patient_split(df, fractions, seed=2)
    patients = pd.DataFrame({"p": df["patient_id"], "stratum": df["source"] + df["label"], "s": split})
    for stratum, group in patients.drop_duplicates("p").groupby("stratum"):
        counts = group["s"].value_counts().reindex(["train", "val", "test"], fill_value=0).to_numpy()
        assert np.abs(counts - np.array(fractions) * len(group)).max() <= 1.0, stratum


def test_row_order_does_not_change_the_split():
    df = _frame(1000)
    shuffled = df.sample(frac=1.0, random_state=1)
    assert patient_split(shuffled, seed=1).sort_index().equals(patient_split(df, seed=1))


def test_seed_changes_the_split_and_is_reproducible():
    df = _frame(1000)
    a, b = patient_split(df, seed=0), patient_split(df, seed=1)
    assert (a != b).mean() > 0.2
    assert patient_split(df, seed=0).equals(a)


def test_bad_fractions_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        patient_split(_frame(10), (0.7, 0.2, 0.2))
    with pytest.raises(ValueError, match=">= 0"):
        patient_split(_frame(10), (1.2, -0.1, -0.1))


def test_leave_sources_out_tests_on_the_held_out_sources_and_keeps_the_runs_own_test_part():
    df = _frame(2000)
    split = leave_sources_out(df, ["b"], fractions=(0.7, 0.15, 0.15), seed=0)
    held = df["source"] == "b"
    assert (split[held] == "test").all()
    assert set(split[~held]) == {"train", "val", INTERNAL_TEST}
    shares = pd.DataFrame({"p": df["patient_id"], "s": split})[~held].drop_duplicates("p")["s"].value_counts(
        normalize=True)
    assert shares["val"] == pytest.approx(0.15, abs=0.04) and shares[INTERNAL_TEST] == pytest.approx(0.15, abs=0.04)
    assert _parts_per_patient(df, split).max() == 1
    everything = patient_split(df, (0.7, 0.15, 0.15), seed=0)  # the rest falls where a run on every source puts it
    assert split[~held].replace(INTERNAL_TEST, "test").equals(everything[~held])


def test_leave_sources_out_rejects_unknown_sources():
    with pytest.raises(ValueError, match="unknown source.*zzz"):
        leave_sources_out(_frame(50), ["zzz"])


def test_leave_sources_out_finds_a_patient_shared_across_sources():
    df = _frame(200)
    df.loc[df.index[0], "source"] = "held"  # one image of a patient whose other images stay in training
    assert (df["patient_id"] == df.at[df.index[0], "patient_id"]).sum() > 1
    with pytest.raises(LeakageError):
        leave_sources_out(df, ["held"])


def test_assert_patient_disjoint_raises_on_a_leak():
    df = _frame(300)
    split = patient_split(df)
    assert_patient_disjoint(df["patient_id"], split)  # no leak: passes
    leaky = split.copy()
    patient = df.groupby("patient_id").size().idxmax()
    rows = df.index[df["patient_id"] == patient]
    leaky[rows[0]] = "test" if leaky[rows[1]] != "test" else "train"
    with pytest.raises(LeakageError, match="1 patient") as err:
        assert_patient_disjoint(df["patient_id"], leaky)
    assert patient in str(err.value)
