"""`covidcxr calibrate RUN --data SITE --out OUT`: adapt a run to a new site with some of its labelled images.

The site's images are split by patient into a calibration part (`fraction`) and a held-back part that only measures.
The calibration part is split again by patient: two thirds fine-tune the model, one third (never trained on) sets
the temperature (so probabilities are calibrated) and the threshold. The guard and the shift reference are then
refit on the run's validation images plus the site's calibration images. OUT/before and OUT/after are evaluation
reports of the original and the adapted run on the held-back part; OUT/calibration.json says which images did what.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from covidcxr.config import AugmentConfig, CalibrateSettings, from_dict, save_json, to_dict
from covidcxr.data import tasks
from covidcxr.data.cache import ImageCache
from covidcxr.data.splits import patient_uniform
from covidcxr.errors import InputError
from covidcxr.evaluation.evaluate import evaluate
from covidcxr.formatting import number
from covidcxr.model.checkpoint import save_checkpoint
from covidcxr.model.network import unwrap
from covidcxr.model.threshold import choose_threshold
from covidcxr.preprocess.augment import augment_batch
from covidcxr.scoring import Scorer
from covidcxr.training.guarding import attach_guard, run_data, squares_for
from covidcxr.training.schedule import class_weights
from covidcxr.trust.guard import GUARD_DIR, Guard

MIN_PER_CLASS = 3  # calibration images of each class, at least
MIN_HELD_BACK = 10  # held-back images, at least: fewer measure nothing
SPLIT_COLUMNS = ["path", "source", "patient_id", "label", "split"]
METRICS = ("sensitivity", "specificity", "auc")  # reported before and after, each with its bootstrap 95 % CI


def site_parts(site: pd.DataFrame, settings: CalibrateSettings) -> pd.Series:
    """'finetune' / 'tune' / 'held-back' (/ 'unused') per row, by patient (a patient's images stay together)."""
    u = pd.Series(patient_uniform(site["patient_id"].astype(str), settings.seed), index=site.index)
    if settings.n_images is not None:  # the first n images in the patients' random order
        order = u.sort_values(kind="stable").index
        calibration = pd.Series(False, index=site.index)
        calibration[order[:settings.n_images]] = True
    else:
        calibration = u < settings.fraction
    inner = pd.Series(patient_uniform(site["patient_id"].astype(str), settings.seed + 1), index=site.index)
    parts = pd.Series(np.where(~calibration, "held-back", np.where(inner < 2 / 3, "finetune", "tune")),
                      index=site.index, name="part")
    if settings.max_held_back is not None:
        held = inner[parts == "held-back"].sort_values(kind="stable").index
        parts[held[settings.max_held_back:]] = "unused"
    return parts


def check_site(site: pd.DataFrame, parts: pd.Series, name: str) -> None:
    """One-line errors for a site that cannot be calibrated on: one class, or too few images in a part."""
    if site["y"].nunique() < 2:
        only = ", ".join(sorted(site["label"].unique())) or "none"
        raise InputError(f"{name}: the site's images have one class only ({only}); calibrate needs labelled "
                         "images of both classes")
    for part, need in (("finetune", MIN_PER_CLASS), ("tune", MIN_PER_CLASS)):
        counts = site.loc[parts == part, "y"].value_counts()
        if min(counts.get(0, 0), counts.get(1, 0)) < need:
            raise InputError(f"{name}: too few images to calibrate ({len(site)}; the {part} part has "
                             f"{counts.get(1, 0)} positive / {counts.get(0, 0)} negative, needs {need} of each); "
                             "label more of the site's images or raise --fraction")
    if (parts == "held-back").sum() < MIN_HELD_BACK:
        raise InputError(f"{name}: too few images to calibrate: {(parts == 'held-back').sum()} held back "
                         f"(needs {MIN_HELD_BACK}); label more of the site's images or lower --fraction")


def finetune(scorer: Scorer, x: torch.Tensor, y: torch.Tensor, settings: CalibrateSettings) -> None:
    """Fine-tune the run's model in place on normalised squares `x` with its own augmentation and class weights."""
    net = unwrap(scorer.model)
    params = list(net.head.parameters()) if settings.layers == "head" else list(net.parameters())
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=5e-4)
    augment = from_dict(AugmentConfig, dict(scorer.meta["augment"]))
    weights = class_weights(y.numpy(), len(scorer.spec.classes))
    gen = torch.Generator().manual_seed(settings.seed)
    net.train()
    for _ in range(settings.finetune_epochs):
        for idx in torch.randperm(len(x), generator=gen).split(settings.batch_size):
            batch = augment_batch(x[idx], augment, scorer.spec.preprocess.image_size, gen)
            loss = F.cross_entropy(net(batch), y[idx], weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    scorer.refresh()


def fit_temperature(log_probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the tune images' log loss of softmax(log p / T)."""
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


def calibrate(run: str | Path, site_data: str | Path, out: str | Path, settings: CalibrateSettings | None = None,
              sources: list[str] | None = None) -> dict:
    """Adapt `run` to the site; returns calibration.json's content. `sources`: only these sources of `site_data`
    are the site (the cross-source measurement uses a run's held-out sources)."""
    run, site_data, out = Path(run), Path(site_data), Path(out)
    settings = settings or CalibrateSettings()
    scorer = Scorer.from_run(run, "cpu")
    cache = ImageCache(site_data)
    site = cache.manifest()
    site = site[site["source"].isin(sources)] if sources else site
    site = site.assign(target=tasks.encode(site["label"], scorer.spec.task))  # the model's classes
    site = site[site["target"] >= 0].reset_index(drop=True)
    site["y"] = (site["target"] == scorer.spec.positive_index).astype(int)
    parts = site_parts(site, settings)
    check_site(site, parts, str(site_data))
    squares = cache.load(site["cache_index"]).numpy()
    ft, tune = (parts == "finetune").to_numpy(), (parts == "tune").to_numpy()
    target, labels = site["target"].to_numpy(), site["y"].to_numpy()
    finetune(scorer, scorer.normalise(squares[ft]), torch.tensor(target[ft]), settings)
    temperature = fit_temperature(np.log(np.clip(scorer.probabilities(squares[tune]), 1e-12, 1)), target[tune])
    fold_temperature(scorer, temperature)
    method = settings.threshold_method
    threshold = choose_threshold(labels[tune], scorer.scores(squares[tune]), method,
                                 settings.target_sensitivity or 0.95)
    adapted = write_run(scorer, run, out / "run", site, parts, threshold, method, temperature, squares)
    held = site.loc[parts == "held-back", "path"].tolist()
    reports = {name: evaluate(r, site_data, "all", out / name, n_boot=settings.n_boot, diagnostics=False, images=held,
                              title=f"{name} calibrate: {r.name} on the held-back part of {site_data.name}")
               for name, r in (("before", run), ("after", adapted))}
    record = {"run": str(run.resolve()), "site": str(site_data.resolve()), "sources": sources,
              "settings": to_dict(settings), "temperature": temperature, "threshold": threshold,
              "threshold_method": method, "counts": parts.value_counts().to_dict(),
              "images": {part: site.loc[parts == part, "path"].tolist() for part in ("finetune", "tune", "held-back")},
              **{f"{k}_{m}": reports[k][m]["value"] for k in reports for m in METRICS},
              **{f"{k}_{m}_ci95": reports[k][m]["ci95"] for k in reports for m in METRICS}}
    record["summary"] = "held-back part: " + ", ".join(
        f"{m} {number(record['before_' + m])} -> {number(record['after_' + m])}" for m in METRICS)
    save_json(record, out / "calibration.json")
    return record


def write_run(scorer: Scorer, run: Path, out: Path, site: pd.DataFrame, parts: pd.Series, threshold: float,
              method: str, temperature: float, squares: np.ndarray) -> Path:
    """OUT/run: the adapted weights, their threshold, a split.csv with the site's parts, a refit guard and shift
    reference (val_predictions.csv: the run's validation images and the site's calibration images, rescored)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {**scorer.meta, "threshold": threshold, "threshold_method": method,
            "calibrated": {"from": str(run.resolve()), "temperature": temperature}}
    save_checkpoint(out / "model.pt", scorer.model, meta)
    if (run / "config.json").is_file():  # provenance: what the adapted run was trained from
        shutil.copyfile(run / "config.json", out / "config.json")
    site_split = site.assign(split=parts.map({"finetune": "train", "tune": "val", "held-back": "test",
                                              "unused": "unused"}))
    old = pd.read_csv(run / "split.csv")
    old = old[~old["path"].isin(site_split["path"])]
    pd.concat([old, site_split[SPLIT_COLUMNS]]).to_csv(out / "split.csv", index=False)
    reference, ref_squares = reference_images(run, site, parts, squares)
    reference.assign(score=scorer.scores(ref_squares)).to_csv(out / "val_predictions.csv", index=False)
    guard = Guard.load(run)
    if guard is not None:  # same members, thresholds refit around the adapted model and the site
        attach_guard(out, [run / GUARD_DIR / m for m in guard.members], squares=ref_squares,
                     density=guard.density is not None, coverage=guard.coverage)
    return out


def reference_images(run: Path, site: pd.DataFrame, parts: pd.Series,
                     squares: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """The run's validation images (when its data folder is here and of the same size) plus the site's calibration."""
    calib = parts.isin(["finetune", "tune"]).to_numpy()
    rows, ref = site.loc[calib, ["path", "source", "patient_id", "label"]], squares[calib]
    try:
        val = pd.read_csv(run / "val_predictions.csv")
        val_squares = squares_for(run_data(run), val["path"])
    except (InputError, FileNotFoundError):
        return rows.reset_index(drop=True), ref
    if val_squares.shape[1:] != ref.shape[1:]:
        return rows.reset_index(drop=True), ref
    return pd.concat([val.drop(columns="score"), rows]).reset_index(drop=True), np.concatenate([val_squares, ref])

