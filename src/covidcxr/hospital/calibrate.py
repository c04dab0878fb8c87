"""`covidcxr calibrate RUN --data SITE --out OUT`: adapt a run to a site only when that demonstrably helps.

The site's images are split by patient into calibration images (`fraction`) and held-back images that only measure.
Inside the calibration images, patient-grouped cross-validation scores each candidate change (nothing; the threshold;
temperature and threshold; fine-tuning the head; fine-tuning all layers) on images it was not fitted on. The criterion
is balanced accuracy of the out-of-fold calls. A candidate is kept only when its gain over "nothing" is more than its
noise: the lower end of the one-sided 95 % interval of the gain (a paired patient-level bootstrap of the out-of-fold
calls) must be above zero. Of the candidates that pass, the best wins (ties: the better calibrated, by Brier score,
then the simpler). Otherwise OUT/run is the original run and one line says so.

Every candidate sets a threshold (where sensitivity and specificity clear the site's requirements, `min_sensitivity`
and `min_specificity`, by the widest common margin; or the one reaching `target_sensitivity`), so none is tried on
fewer than MIN_THRESHOLD_PER_CLASS calibration images of each class. The same requirements are the bar of the
before/after reports' verdicts. The fine-tuning candidates are cross-fitted: the final
weights train on every calibration image, and their temperature and threshold are set on the out-of-fold scores of the
cross-validation (each image scored by weights fine-tuned without its patient); inside the cross-validation, a fold's
calls use the temperature and threshold set on the other folds' out-of-fold scores, so no image ever sets its own.
With a few hundred site films, training on all of them rather than on two thirds (the rest kept to set temperature
and threshold) is what raises the adapted model's AUC most. OUT/before and OUT/after are
validation reports (`covidcxr validate`) on the held-back images; OUT/calibration.json records the candidates, their
cross-validated figures and the choice. With `triage`, rule-out and rule-in thresholds with a guarantee
(hospital/triage.py) are set on the calibration images, scored by the final weights, which must not have trained on
them: the fine-tuning candidates are then not tried, and one line says so. The triage file is stored as
OUT/run/triage.json, which every scorer of the run reads.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from sklearn.model_selection import StratifiedGroupKFold

from covidcxr.config import AugmentConfig, CalibrateSettings, ValidateSettings, from_dict, save_json, to_dict
from covidcxr.data import tasks
from covidcxr.data.cache import ImageCache
from covidcxr.data.splits import patient_uniform
from covidcxr.errors import InputError
from covidcxr.evaluation.bootstrap import patient_bootstrap_weights
from covidcxr.evaluation.metrics import binary_metrics, weighted_metrics
from covidcxr.formatting import number
from covidcxr.hospital.triage import TriageTargets, check_enough, fit_triage
from covidcxr.hospital.validate import validate
from covidcxr.model.checkpoint import save_checkpoint
from covidcxr.model.network import unwrap
from covidcxr.model.spec import TRIAGE_FILE
from covidcxr.model.threshold import choose_threshold
from covidcxr.preprocess.augment import augment_batch
from covidcxr.scoring import Scorer
from covidcxr.training.guarding import attach_guard, run_data, squares_for
from covidcxr.training.schedule import class_weights
from covidcxr.trust.gate import GATE_FILE, GATE_GRAPH
from covidcxr.trust.gate import verdicts as gate_verdicts
from covidcxr.trust.guard import GUARD_DIR, Guard

log = logging.getLogger(__name__)

MIN_THRESHOLD_PER_CLASS = 10  # images of each class a threshold is chosen on, at least
MIN_HELD_BACK = 10  # held-back images, at least: fewer measure nothing
FINETUNING = ("head", "all")
SPLIT_COLUMNS = ["path", "source", "patient_id", "label", "split"]
METRICS = ("sensitivity", "specificity", "balanced_accuracy", "auc")  # before and after, each with its bootstrap CI
NOISE_QUANTILE = 5  # percent: the one-sided 95 % lower end of a candidate's bootstrap gain


def site_parts(site: pd.DataFrame, settings: CalibrateSettings) -> pd.Series:
    """'calibration' / 'held-back' (/ 'unused') per row, by patient (a patient's images stay together)."""
    u = pd.Series(patient_uniform(site["patient_id"].astype(str), settings.seed), index=site.index)
    if settings.n_images is not None:  # the first n images in the patients' random order
        order = u.sort_values(kind="stable").index
        calibration = pd.Series(False, index=site.index)
        calibration[order[:settings.n_images]] = True
    else:
        calibration = u < settings.fraction
    parts = pd.Series(np.where(calibration, "calibration", "held-back"), index=site.index, name="part")
    if settings.max_held_back is not None:
        held = u[parts == "held-back"].sort_values(kind="stable").index
        parts[held[settings.max_held_back:]] = "unused"
    return parts


def check_site(site: pd.DataFrame, parts: pd.Series, name: str) -> None:
    """One-line errors for a site that cannot be measured: one class, or too few held-back images."""
    if site["y"].nunique() < 2:
        only = ", ".join(sorted(site["label"].unique())) or "none"
        raise InputError(f"{name}: the site's images have one class only ({only}); calibrate needs labelled "
                         "images of both classes")
    held = int((parts == "held-back").sum())
    if held < MIN_HELD_BACK:
        raise InputError(f"{name}: too few images to calibrate: {held} held back (needs {MIN_HELD_BACK}; the site "
                         f"has {len(site)}); label more of the site's images or lower --fraction")


def class_counts(y: np.ndarray) -> tuple[int, int]:
    return int((y == 1).sum()), int((y == 0).sum())


def triable(candidates: tuple[str, ...], y: np.ndarray, triage: bool) -> tuple[list[str], str]:
    """The candidates these calibration images can support, and why the others are not tried ('' if all are)."""
    pos, neg = class_counts(y)
    if min(pos, neg) < MIN_THRESHOLD_PER_CLASS:
        return ["nothing"], (f"choosing a threshold needs at least {MIN_THRESHOLD_PER_CLASS} calibration images of "
                             f"each class (there are {pos} positive and {neg} negative); the original threshold "
                             "stays until then")
    if triage and any(c in candidates for c in FINETUNING):
        return ([c for c in candidates if c not in FINETUNING],
                "fine-tuning is not tried with triage: its final weights train on every calibration image, and the "
                "triage guarantee needs images the final weights never saw")
    return list(candidates), ""


# --- fitting one candidate on some calibration images ---

def finetune_steps(n: int, settings: CalibrateSettings) -> int:
    """Optimizer steps of `settings.finetune_epochs` passes over n images."""
    return settings.finetune_epochs * math.ceil(n / settings.batch_size)


def finetune(scorer: Scorer, x: torch.Tensor, y: torch.Tensor, layers: str, settings: CalibrateSettings,
             steps: int | None = None) -> None:
    """Fine-tune the run's model in place on normalised squares `x` with its class weights, for `steps` optimizer
    steps (default: `settings.finetune_epochs` passes): all layers with the run's own augmentation; the head alone as a
    linear probe on the frozen backbone's features of the squares as they are, computed once (augmenting them would
    cost a backbone pass per step for one linear layer)."""
    net = unwrap(scorer.model)
    head_only = layers == "head"
    optimizer = torch.optim.SGD(net.head.parameters() if head_only else net.parameters(), lr=settings.lr,
                                momentum=0.9, weight_decay=5e-4, fused=True)  # one kernel: 4x faster on a CPU
    augment = from_dict(AugmentConfig, dict(scorer.meta["augment"]))
    weights = class_weights(y.numpy(), len(scorer.spec.classes))
    gen = torch.Generator().manual_seed(settings.seed)
    if head_only:
        net.eval()
        with torch.no_grad():
            features = torch.cat([net.features(scorer.preprocess.model_input_u8(b))
                                  for b in x.split(settings.batch_size)])
    net.train(not head_only)
    left = finetune_steps(len(x), settings) if steps is None else steps
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global generator: seeded here, the same images
        torch.manual_seed(settings.seed)    # give the same weights whatever ran before in the process
        while left > 0:
            for idx in torch.randperm(len(x), generator=gen).split(settings.batch_size)[:left]:
                if head_only:
                    logits = net.head(features[idx])
                else:
                    logits = net(augment_batch(x[idx], augment, scorer.spec.preprocess.image_size, gen))
                loss = F.cross_entropy(logits, y[idx], weight=weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                left -= 1
    net.eval()
    scorer.refresh()


def fit_temperature(log_probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the images' log loss of softmax(log p / T)."""
    lp, target = torch.tensor(log_probs, dtype=torch.float64), torch.tensor(y)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(lp / np.exp(log_t), target))
    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def fold_temperature(scorer: Scorer, temperature: float) -> None:
    """Divide the head by T: the saved model itself gives calibrated probabilities (evaluate, serve, export)."""
    head = unwrap(scorer.model).head
    with torch.no_grad():
        head.weight.div_(temperature)
        head.bias.div_(temperature)
    scorer.refresh()


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): what the model gives once T is folded into its head."""
    return torch.softmax(torch.tensor(np.log(np.clip(probs, 1e-12, 1))) / temperature, 1).numpy()


class Fitted:
    """A candidate fitted on some calibration images: its scorer (the original's, or a fine-tuned copy), temperature
    and threshold, which of the images the weights never trained on (`untouched`), and the images' scores as the
    fitted model gives images it never trained on (the fine-tuning candidates: their out-of-fold scores)."""

    def __init__(self, scorer: Scorer, temperature: float, threshold: float, untouched: np.ndarray,
                 held_scores: np.ndarray | None = None):
        self.scorer, self.temperature, self.threshold = scorer, temperature, threshold
        self.untouched, self.held_scores = untouched, held_scores

    def scores(self, squares: np.ndarray) -> np.ndarray:
        """Positive-class scores of cache squares, as the fitted model (temperature included) gives them."""
        return tempered(self.scorer.probabilities(squares), self.temperature)[:, self.scorer.spec.positive_index]


def set_threshold(probs: np.ndarray, target: np.ndarray, y: np.ndarray, pos: int, settings: CalibrateSettings,
                  temperature: bool) -> tuple[float, float]:
    """(temperature, threshold) set on these probabilities (temperature 1 unless `temperature`)."""
    t = fit_temperature(np.log(np.clip(probs, 1e-12, 1)), target) if temperature else 1.0
    return t, choose_threshold(y, tempered(probs, t)[:, pos], settings.threshold_method,
                               settings.target_sensitivity or 0.95,
                               (settings.min_sensitivity, settings.min_specificity))


def finetuned(name: str, scorer: Scorer, squares: np.ndarray, target: np.ndarray, settings: CalibrateSettings,
              steps: int | None = None) -> Scorer:
    """A copy of the run's scorer fine-tuned (`name`: "head" or "all") on these squares."""
    tuned = copy.deepcopy(scorer)
    finetune(tuned, tuned.normalise(squares), torch.tensor(target), name, settings, steps)
    return tuned


def fit_candidate(name: str, scorer: Scorer, squares: np.ndarray, probs: np.ndarray, target: np.ndarray,
                  y: np.ndarray, settings: CalibrateSettings, oof: np.ndarray | None = None,
                  steps: int | None = None) -> Fitted:
    """Fit candidate `name` on these calibration images (`probs`: the original model's probabilities of them). A
    fine-tuning candidate sets its temperature and threshold on `oof`, its out-of-fold probabilities of them, and
    trains for `steps`, the steps of the cross-validation's fits: the same number of steps moves the scores as far
    as it moved theirs, so a threshold set on their scores fits the final weights' (more steps, on more images, drift
    further: a barely trained run fine-tuned 50 % longer than its folds called every held-back film positive)."""
    pos, everything = scorer.spec.positive_index, np.arange(len(y))
    if name == "nothing":
        return Fitted(scorer, 1.0, scorer.spec.threshold, everything)
    if name in ("threshold", "temperature"):
        return Fitted(scorer, *set_threshold(probs, target, y, pos, settings, name == "temperature"), everything)
    if oof is None:
        raise ValueError(f"{name}: a fine-tuning candidate sets its temperature and threshold on out-of-fold scores")
    t, threshold = set_threshold(oof, target, y, pos, settings, temperature=True)
    return Fitted(finetuned(name, scorer, squares, target, settings, steps), t, threshold, everything[:0],
                  tempered(oof, t)[:, pos])


# --- choosing by patient-grouped cross-validation ---

def fold_count(y: np.ndarray, patients: pd.Series, settings: CalibrateSettings) -> int:
    """Cross-validation folds: `settings.folds`, fewer when a class has fewer patients (each fold holds both)."""
    return min(settings.folds, *(patients[y == c].nunique() for c in (0, 1)))


def cross_validate(scorer: Scorer, squares: np.ndarray, probs: np.ndarray, target: np.ndarray, y: np.ndarray,
                   patients: pd.Series, candidates: list[str], settings: CalibrateSettings) -> dict[str, dict]:
    """Each candidate's out-of-fold scores and calls (every image scored by a fit that never saw its patient), and
    their balanced accuracy, sensitivity, specificity, AUC and Brier score; the fine-tuning candidates also keep their
    out-of-fold probabilities (`oof`), which set the final weights' temperature and threshold. `probs`: the original
    model's probabilities of the images."""
    pos = scorer.spec.positive_index
    fitting = [c for c in candidates if c != "nothing"]  # "nothing" fits nothing: it is scored as it is
    k = fold_count(y, patients, settings) if fitting else 0
    folds = list(StratifiedGroupKFold(k, shuffle=True, random_state=settings.seed).split(
        squares, y, patients.astype(str))) if fitting else []
    oof = {c: np.zeros(len(y)) for c in candidates}
    calls = {c: np.zeros(len(y), bool) for c in candidates}
    raw = {c: np.zeros_like(probs) for c in fitting if c in FINETUNING}
    oof["nothing"] = probs[:, pos]
    calls["nothing"] = oof["nothing"] >= scorer.spec.threshold
    for train, val in folds:
        for c in fitting:
            if c in raw:
                raw[c][val] = finetuned(c, scorer, squares[train], target[train], settings).probabilities(squares[val])
                continue
            t, threshold = set_threshold(probs[train], target[train], y[train], pos, settings, c == "temperature")
            oof[c][val] = tempered(probs[val], t)[:, pos]
            calls[c][val] = oof[c][val] >= threshold
    for c in raw:  # cross-fitted: a fold's temperature and threshold come from the other folds' out-of-fold scores
        for train, val in folds:
            t, threshold = set_threshold(raw[c][train], target[train], y[train], pos, settings, temperature=True)
            oof[c][val] = tempered(raw[c][val], t)[:, pos]
            calls[c][val] = oof[c][val] >= threshold
    steps = round(np.mean([finetune_steps(len(train), settings) for train, _ in folds])) if folds else 0
    out = {}
    for c in candidates:
        m = binary_metrics(y, calls[c].astype(float), 0.5)
        out[c] = {"balanced_accuracy": m["balanced_accuracy"], "sensitivity": m["sensitivity"],
                  "specificity": m["specificity"], "auc": binary_metrics(y, oof[c], 0.5)["auc"],
                  "brier": float(np.mean((oof[c] - y) ** 2)), "folds": k, "scores": oof[c], "calls": calls[c],
                  **({"oof": raw[c], "steps": steps} if c in raw else {})}
    return out


def gains(cv: dict[str, dict], y: np.ndarray, patients: pd.Series, settings: CalibrateSettings) -> None:
    """Add each candidate's gain in balanced accuracy over "nothing" and the one-sided 95 % lower end of that gain
    (paired patient-level bootstrap of the out-of-fold calls)."""
    codes = pd.factorize(patients.astype(str))[0]
    base = cv["nothing"]["calls"].astype(float)
    for c, r in cv.items():
        r["gain"] = r["balanced_accuracy"] - cv["nothing"]["balanced_accuracy"]
        if c == "nothing":
            r["gain_lower"] = 0.0
            continue
        diffs = np.concatenate([weighted_metrics(y, r["calls"].astype(float), 0.5, w)["balanced_accuracy"]
                                - weighted_metrics(y, base, 0.5, w)["balanced_accuracy"]
                                for w in patient_bootstrap_weights(codes, settings.n_boot, settings.seed)])
        finite = diffs[np.isfinite(diffs)]
        r["gain_lower"] = float(np.percentile(finite, NOISE_QUANTILE)) if finite.size else float("nan")


def choose(cv: dict[str, dict], order: list[str]) -> str:
    """The best candidate whose gain is more than its noise (ties: lower Brier score, then simpler); else nothing."""
    passing = [c for c in order if c != "nothing" and cv[c]["gain_lower"] > 0]
    if not passing:
        return "nothing"
    return min(passing, key=lambda c: (-round(cv[c]["balanced_accuracy"], 9), round(cv[c]["brier"], 9),
                                       order.index(c)))


def decision_line(choice: str, cv: dict[str, dict], why_not: str) -> str:
    """calibrate's one line: what it did and why."""
    if choice != "nothing":
        r = cv[choice]
        return (f"adapted ({describe(choice)}): cross-validated balanced accuracy "
                f"{number(cv['nothing']['balanced_accuracy'], 2)} -> {number(r['balanced_accuracy'], 2)} (gain "
                f"{r['gain']:+.2f}, one-sided 95 % lower end {r['gain_lower']:+.2f})")
    if len(cv) == 1:
        return f"kept the original model: {why_not}"
    best = max((c for c in cv if c != "nothing"), key=lambda c: cv[c]["gain"])
    return (f"kept the original model: no adaptation beat it on patient-grouped cross-validation by more than its "
            f"noise (best: {describe(best)}, balanced accuracy gain {cv[best]['gain']:+.2f}, one-sided 95 % lower "
            f"end {cv[best]['gain_lower']:+.2f})" + (f"; {why_not}" if why_not else ""))


def describe(candidate: str) -> str:
    return {"nothing": "nothing", "threshold": "the threshold", "temperature": "temperature and threshold",
            "head": "the head fine-tuned, temperature and threshold",
            "all": "all layers fine-tuned, temperature and threshold"}[candidate]


def calibrate(run: str | Path, site_data: str | Path, out: str | Path, settings: CalibrateSettings | None = None,
              sources: list[str] | None = None) -> dict:
    """Adapt `run` to the site where it demonstrably helps; returns calibration.json's content. `sources`: only these
    sources of `site_data` are the site (the cross-source measurement uses a run's held-out sources)."""
    run, site_data, out = Path(run), Path(site_data), Path(out)
    settings = settings or CalibrateSettings()
    scorer = Scorer.from_run(run, "cpu")
    cache = ImageCache(site_data)
    site = cache.manifest()
    site = site[site["source"].isin(sources)] if sources else site
    site = site.assign(target=tasks.encode(site["label"], scorer.spec.task))  # the model's classes
    site = site[site["target"] >= 0].reset_index(drop=True)
    squares = cache.load(site["cache_index"]).numpy()
    accepted = np.array([v is None or v.accepted for v in gate_verdicts(scorer.gate, squares)], dtype=bool)
    if not accepted.all():  # what the run does not answer about can neither adapt it nor measure it
        log.warning("%s: the run's gate refused %d of the site's %d images (not frontal chest radiographs); "
                    "calibrate uses the other %d", site_data, int((~accepted).sum()), len(site), int(accepted.sum()))
        site, squares = site[accepted].reset_index(drop=True), squares[accepted]
    site["y"] = (site["target"] == scorer.spec.positive_index).astype(int)
    parts = site_parts(site, settings)
    check_site(site, parts, str(site_data))
    calib = (parts == "calibration").to_numpy()
    y, target, patients = site["y"].to_numpy()[calib], site["target"].to_numpy()[calib], site["patient_id"][calib]
    targets = TriageTargets(settings.npv, settings.ppv, settings.confidence)
    if settings.triage:
        check_enough(y, targets, str(site_data))
    order = ["nothing", *[c for c in settings.candidates if c != "nothing"]]
    if settings.finetune_epochs == 0:
        order = [c for c in order if c not in FINETUNING]
    tried, why_not = triable(tuple(order), y, settings.triage)
    if len(tried) > 1 and fold_count(y, patients, settings) < 2:
        tried, why_not = ["nothing"], ("cross-validation needs at least 2 patients of each class among the "
                                       "calibration images; the original model stays until then")
    probs = scorer.probabilities(squares[calib])
    cv = cross_validate(scorer, squares[calib], probs, target, y, patients, tried, settings)
    gains(cv, y, patients, settings)
    choice = choose(cv, tried)
    line = decision_line(choice, cv, why_not)
    log.debug("%s", line)
    fitted = fit_candidate(choice, scorer, squares[calib], probs, target, y, settings, cv[choice].get("oof"),
                           cv[choice].get("steps"))
    adapted = out / "run"
    if choice == "nothing":
        write_original(run, adapted)
    else:
        split = pd.Series(np.where(calib, "train", "test"), index=site.index)
        split[np.flatnonzero(calib)[fitted.untouched]] = "val"
        split[(parts == "unused").to_numpy()] = "unused"
        write_run(fitted, run, adapted, site, split, calib, squares, choice, settings)
    triage = None
    if settings.triage:  # the final weights never trained on the calibration images (triable): they set it
        triage = fit_triage(y, fitted.scores(squares[calib]), targets)
        save_json(triage, adapted / TRIAGE_FILE)
    held = site.loc[parts == "held-back", "path"].tolist()
    checks = ValidateSettings(min_sensitivity=settings.min_sensitivity, min_specificity=settings.min_specificity,
                              n_boot=settings.n_boot, seed=settings.seed)
    validations = {name: validate(r, site_data, out / name, checks, images=held,
                                  title=f"{name} calibrate: {r.name} on the held-back part of {site_data.name}")
                   for name, r in (("before", run), ("after", adapted))}
    reports = {name: v["metrics"] for name, v in validations.items()}
    record = {"run": str(run.resolve()), "site": str(site_data.resolve()), "sources": sources,
              "settings": to_dict(settings), "decision": line, "choice": choice, "not_tried": why_not,
              "candidates": {c: {k: v for k, v in r.items() if k not in ("scores", "calls", "oof")}
                             for c, r in cv.items()},
              "criterion": "balanced accuracy of out-of-fold calls (patient-grouped); kept only when the one-sided "
                           "95 % lower end of its gain over nothing (paired patient bootstrap) is above 0",
              "temperature": fitted.temperature, "threshold": fitted.threshold,
              "threshold_method": settings.threshold_method if choice != "nothing" else scorer.spec.threshold_method,
              "triage": triage, "after_triage": validations["after"]["triage"],
              "counts": parts.value_counts().to_dict(),
              "images": {part: site.loc[parts == part, "path"].tolist() for part in ("calibration", "held-back")},
              **{f"{k}_{m}": reports[k][m]["value"] for k in reports for m in METRICS},
              **{f"{k}_{m}_ci95": reports[k][m]["ci95"] for k in reports for m in METRICS}}
    record["summary"] = "held-back part: " + ", ".join(
        f"{m} {number(record['before_' + m])} -> {number(record['after_' + m])}" for m in METRICS)
    save_json(record, out / "calibration.json")
    return record


def write_original(run: Path, out: Path) -> None:
    """OUT/run as the original run: its files copied unchanged (the same weights, the same model id)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("last.pt", TRIAGE_FILE))


def write_run(fitted: Fitted, run: Path, out: Path, site: pd.DataFrame, split: pd.Series, calib: np.ndarray,
              squares: np.ndarray, choice: str, settings: CalibrateSettings) -> Path:
    """OUT/run: the adapted weights (temperature folded in), their threshold, a split.csv with the site's parts, a
    refit guard and shift reference (val_predictions.csv: the run's validation images and the site's calibration
    images, rescored; fine-tuned weights give the calibration images their out-of-fold scores, since scores of the
    images they trained on would make a reference no new image could match)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in (GATE_FILE, GATE_GRAPH):  # the adapted run answers about the same images as the original
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    scorer = copy.deepcopy(fitted.scorer)
    fold_temperature(scorer, fitted.temperature)
    meta = {**scorer.meta, "threshold": fitted.threshold, "threshold_method": settings.threshold_method,
            "calibrated": {"from": str(run.resolve()), "changed": describe(choice), "temperature": fitted.temperature}}
    save_checkpoint(out / "model.pt", scorer.model, meta)
    if (run / "config.json").is_file():  # provenance: what the adapted run was trained from
        shutil.copyfile(run / "config.json", out / "config.json")
    site_split = site.assign(split=split)
    old = pd.read_csv(run / "split.csv")
    old = old[~old["path"].isin(site_split["path"])]
    pd.concat([old, site_split[SPLIT_COLUMNS]]).to_csv(out / "split.csv", index=False)
    reference, ref_squares = reference_images(run, site, calib, squares)
    scores = scorer.scores(ref_squares)
    if fitted.held_scores is not None:  # the calibration images come last in the reference
        scores[len(scores) - len(fitted.held_scores):] = fitted.held_scores
    reference.assign(score=scores).to_csv(out / "val_predictions.csv", index=False)
    guard = Guard.load(run)
    if guard is not None:  # same members, thresholds refit around the adapted model and the site
        attach_guard(out, [run / GUARD_DIR / m for m in guard.members], squares=ref_squares,
                     density=guard.density is not None, coverage=guard.coverage)
    return out


def reference_images(run: Path, site: pd.DataFrame, calib: np.ndarray,
                     squares: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """The run's validation images (when its data folder is here and of the same size) plus the site's calibration."""
    rows, ref = site.loc[calib, ["path", "source", "patient_id", "label"]], squares[calib]
    try:
        val = pd.read_csv(run / "val_predictions.csv")
        val_squares = squares_for(run_data(run), val["path"])
    except (InputError, FileNotFoundError):
        return rows.reset_index(drop=True), ref
    if val_squares.shape[1:] != ref.shape[1:]:
        return rows.reset_index(drop=True), ref
    return pd.concat([val.drop(columns="score"), rows]).reset_index(drop=True), np.concatenate([val_squares, ref])
