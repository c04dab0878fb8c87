"""Shortcut diagnostics: does a run's model read the disease from the lungs, or the hospital from everything else?

Four checks, on the run's test images (or on all unseen images of another ingested data set):
1. source probe: how well the source collection can be predicted from the model's penultimate features;
2. occlusion: the model's scores with the lung fields blanked and with only the lungs kept. Blanked regions are set
   to one mid-gray level for all images (the mean content intensity of the set), not to black: black is what the
   padding bars look like (their amount is itself a source cue) and a black hole makes a strong artificial edge;
   not to each image's own mean, which would carry that image's brightness (a source cue too) into the blanked
   version. "Lungs only" blanks everything else, padding, borders and burned-in text included;
3. image statistics: how well a gradient-boosted classifier on non-anatomical features alone (size and aspect
   before resizing, padding and border, intensity histogram, sharpness and noise) predicts the label,
   cross-validated by patient. High means the data itself carries a shortcut, whatever the model does;
4. Grad-CAM lung share: the share of the COVID-19 attribution that falls inside the lung fields, beside the
   share of the image the lungs cover (what an attribution spread evenly would give).
Lung fields come from a learned lung model (lungseg.py) when one is given or the run has one, else from `lungs.py`
(a documented heuristic); diagnose.json names which. Everything is written to one folder: diagnose.json,
figures, diagnose.html and verdict.md.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import ndimage  # noqa: E402
from sklearn.ensemble import HistGradientBoostingClassifier  # noqa: E402
from sklearn.metrics import balanced_accuracy_score, roc_auc_score  # noqa: E402
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from . import lungs, probe, tasks  # noqa: E402
from .augment import prepare_batch  # noqa: E402
from .cache import ImageCache  # noqa: E402
from .cam import grad_cam, overlay  # noqa: E402
from .config import AugmentConfig, from_dict  # noqa: E402
from .evaluate import select_images  # noqa: E402
from .metrics import binary_metrics, bootstrap_ci, patient_codes, write_metrics  # noqa: E402
from .lungseg import MIN_LUNG_AREA, load_lung_model, segment  # noqa: E402
from .model import LUNG_MODEL, load_run  # noqa: E402
from .predict import predict_probs  # noqa: E402
from .train import resolve_device  # noqa: E402

CONDITIONS = ("intact", "lungs blanked", "lungs only")
HIST_BINS = 16
FEATURE_GROUPS = {
    "size and aspect": ["orig_height", "orig_width", "aspect", "log_pixels"],
    "padding and border": ["padding_fraction", "dark_fraction", "bright_fraction", "border_mean", "border_std"],
    "intensity histogram": [f"hist_{i:02d}" for i in range(HIST_BINS)] + ["mean", "std"],
    "sharpness and noise": ["laplacian_var", "high_freq_energy", "noise_mad"],
}
# When a check counts as evidence of shortcut learning (see `flags`).
PROBE_LIFT = 0.5  # (balanced accuracy - chance) / (1 - chance) of the source probe, within labels
BLANKED_AUC = 0.75  # the classes are still separated this well with the lungs blanked
STATS_AUC = 0.80  # non-anatomical image statistics predict the label this well
CAM_ENRICHMENT = 1.0  # Grad-CAM lung share / lung area share below this: attribution is not drawn to the lungs
CHECKS = {"source_probe": "source probe", "occlusion": "occlusion", "image_stats": "image statistics",
          "cam": "Grad-CAM"}
FIGURES = {"occlusion.png": "Scores per class, intact and occluded", "masks.png": "Lung masks",
           "cam_lungs.png": "Grad-CAM with lung outlines", "imagestats.png": "Image-statistics shortcut check"}


def diagnose(run: str | Path, data: str | Path, out: str | Path, split: str | None = None, device: str = "auto",
             max_cam_images: int = 200, seed: int = 0, lung_model: str | Path | None = None) -> dict[str, Any]:
    """Run the four checks and write DIR/diagnose.json, the figures, diagnose.html and verdict.md; return the numbers.

    `split`: "test" (the run's own test images in DATA) or "all" (every image of DATA the run did not train or
    validate on); by default "test" when DATA holds the run's test images, else "all".
    `lung_model`: a lung segmentation checkpoint (covidcxr lungs train) for the lung fields; by default the run's own
    copy when it was trained with crop="lungs", else the heuristic of lungs.py.
    """
    run, out = Path(run), Path(out)
    dev = resolve_device(device)
    model, meta = load_run(run, device=dev)
    cache = ImageCache(data)
    split = split or ("test" if _holds_test_images(run, cache) else "all")
    rows = _task_rows(run, cache, split, meta["task"])
    y = (tasks.encode(rows["label"], meta["task"]) == int(meta["positive_index"])).astype(int)
    images = cache.load(rows["cache_index"]).numpy()
    _log(f"{len(rows)} images ({split}); lung masks")
    lung_model = lung_model or (run / LUNG_MODEL if (run / LUNG_MODEL).is_file() else None)
    masks, mask_info = lung_fields(images, lung_model, dev)
    result: dict[str, Any] = {
        "run": str(run.resolve()), "data": str(Path(data).resolve()), "split": split, "task": meta["task"],
        "positive_label": meta["classes"][int(meta["positive_index"])], "threshold": float(meta["threshold"]),
        "n_images": len(rows), "n_patients": int(patient_codes(rows).max()) + 1,
        "counts": {f"{src}/{lab}": int(n) for (src, lab), n in rows.groupby(["source", "label"]).size().items()},
        "lung_masks": {**mask_info, "mean_area_fraction": float(masks.mean())},
    }
    _log("model passes: features, occlusion, Grad-CAM")
    features = probe.extract_features(model, meta, cache, rows, dev)
    result["occlusion"] = occlusion_test(model, meta, images, masks, rows, y, dev)
    cam_pick, cams, cam_masks = _cam_sample(model, meta, images, masks, rows, dev, max_cam_images, seed)
    result["cam"] = cam_lung_share(cams, cam_masks, rows.iloc[cam_pick])
    _log("source probe and image statistics")
    # These fits are small (hundreds of images): one thread. After PyTorch's passes, BLAS and OpenMP thread pools
    # fight over the cores; on 2 cores the source probe took 180 s with two threads and 6 s with one.
    with threadpool_limits(1):
        result["source_probe"] = probe.source_probe(features, rows, seed)
        result["image_stats"] = image_stats_check(image_features(images, rows), y, patient_codes(rows), seed)
    result["flags"] = flags(result)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(result, out / "diagnose.json")
    _write_figures(out, result, images, masks, rows, y, cam_pick, cams, cam_masks, meta)
    (out / "verdict.md").write_text(verdict(result) + "\n", encoding="utf-8")
    (out / "diagnose.html").write_text(_page(result, out), encoding="utf-8")
    return json.loads((out / "diagnose.json").read_text())


def lung_fields(images: np.ndarray, lung_model: str | Path | None, device: torch.device,
                chunk: int = 256) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, S, S) bool lung masks and how they were made: the learned model when given, else the heuristic."""
    if lung_model is None:
        masks, refined = lungs.lung_masks(images)
        return masks, {"method": "heuristic (lungs.py: anatomical template united with the dark lung regions)",
                       "sides_refined": float(refined.mean() / 2)}
    model = load_lung_model(lung_model).to(device)
    masks = np.concatenate([
        segment(model, torch.from_numpy(images[i:i + chunk]).to(device).unsqueeze(1).float().div_(255))[:, 0].cpu().numpy()
        for i in range(0, len(images), chunk)]) if len(images) else np.zeros(images.shape, bool)
    found = masks.reshape(len(masks), -1).mean(1) >= MIN_LUNG_AREA
    return masks, {"method": f"learned (lungseg.py U-Net trained on hand-drawn masks): {lung_model}",
                   "images_without_lungs": int((~found).sum())}


def _log(message: str) -> None:
    print(f"diagnose: {message}", file=sys.stderr, flush=True)


def _holds_test_images(run: Path, cache: ImageCache) -> bool:
    split = pd.read_csv(run / "split.csv")
    return bool(cache.manifest()["path"].isin(split.loc[split["split"] == "test", "path"]).any())


def _task_rows(run: Path, cache: ImageCache, split: str, task: str) -> pd.DataFrame:
    rows, _ = select_images(run, cache, split)
    rows = rows[tasks.encode(rows["label"], task) >= 0].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{cache.dir}: no images of split {split!r} with labels that task {task} uses")
    return rows


# ----------------------------------------------------------------------------------------------- occlusion

def occlude(images: np.ndarray, masks: np.ndarray, condition: str, fill: int) -> np.ndarray:
    """uint8 images with the lungs (or everything but the lungs) set to the gray level `fill`."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown occlusion {condition!r}; choose one of {', '.join(CONDITIONS)}")
    if condition == "intact":
        return images
    blank = masks if condition == "lungs blanked" else ~masks
    return np.where(blank, np.uint8(fill), images)


def fill_level(images: np.ndarray) -> int:
    """One gray level for every image: the mean intensity of the image content (padding left out) over the set.

    A per-image mean would carry the image's own brightness into the occluded version, and brightness differs
    between sources; black would look like padding. One mid-gray level for all carries nothing.
    """
    total, count = 0.0, 0
    for img in images:
        top, bottom, left, right = lungs.content_box(img)
        total += float(img[top:bottom, left:right].sum(dtype=np.float64))
        count += (bottom - top) * (right - left)
    return int(round(total / max(count, 1)))


def occlusion_test(model: torch.nn.Module, meta: dict, images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame,
                   y: np.ndarray, device: torch.device, n_boot: int = 500) -> dict[str, Any]:
    """{"fill_level": the gray level occluded regions were set to, "conditions": per condition the AUC (with a
    patient-bootstrap CI), sensitivity and specificity at the run's threshold, and the scores}."""
    augment = from_dict(AugmentConfig, meta["augment"])
    threshold, fill = float(meta["threshold"]), fill_level(images)
    conditions: dict[str, Any] = {}
    for condition in CONDITIONS:
        x = torch.from_numpy(np.ascontiguousarray(occlude(images, masks, condition, fill)))
        probs = predict_probs(model, x, augment, int(meta["image_size"]), device)
        score = probs[:, int(meta["positive_index"])].numpy()
        m = binary_metrics(y, score, threshold)
        frame = rows[["path", "source", "patient_id"]].assign(y=y, score=score)
        auc_ci = bootstrap_ci(frame, threshold, n_boot)["auc"] if 0 < y.sum() < len(y) else (math.nan, math.nan)
        conditions[condition] = {"auc": m["auc"], "auc_ci95": list(auc_ci), "sensitivity": m["sensitivity"],
                                 "specificity": m["specificity"], "scores": score.round(5).tolist()}
    return {"fill_level": fill, "conditions": conditions}


# ---------------------------------------------------------------------------------------- image statistics

def image_features(images: np.ndarray, rows: pd.DataFrame) -> pd.DataFrame:
    """Non-anatomical features per image: size before resizing, padding/border, histogram, sharpness/noise."""
    h, w = rows["orig_height"].to_numpy(float), rows["orig_width"].to_numpy(float)
    table = pd.DataFrame({"orig_height": h, "orig_width": w, "aspect": h / w, "log_pixels": np.log(h * w)})
    per_image = pd.DataFrame([_pixel_features(img) for img in images])
    return pd.concat([table, per_image], axis=1)


def _pixel_features(image: np.ndarray) -> dict[str, float]:
    top, bottom, left, right = lungs.content_box(image)
    content = image[top:bottom, left:right].astype(np.float32)
    ring = max(1, round(0.05 * min(content.shape)))
    border = np.concatenate([content[:ring].ravel(), content[-ring:].ravel(), content[:, :ring].ravel(),
                             content[:, -ring:].ravel()])
    hist = np.histogram(content, bins=HIST_BINS, range=(0, 256))[0] / content.size
    centre = _centre_crop(content)
    lap = ndimage.laplace(centre)
    return {"padding_fraction": 1 - content.size / image.size, "dark_fraction": float((content <= 8).mean()),
            "bright_fraction": float((content >= 247).mean()), "border_mean": float(border.mean()),
            "border_std": float(border.std()), **{f"hist_{i:02d}": float(v) for i, v in enumerate(hist)},
            "mean": float(content.mean()), "std": float(content.std()), "laplacian_var": float(lap.var()),
            "high_freq_energy": _high_freq_energy(centre), "noise_mad": float(np.median(np.abs(lap)))}


def _centre_crop(content: np.ndarray) -> np.ndarray:
    """The central half of the content (inside the body for nearly every film): where sharpness is measured."""
    h, w = content.shape
    return content[h // 4: h - h // 4, w // 4: w - w // 4]


def _high_freq_energy(patch: np.ndarray) -> float:
    """Share of spectral energy (DC left out) above half the Nyquist frequency."""
    spectrum = np.abs(np.fft.rfft2(patch - patch.mean())) ** 2
    fy = np.fft.fftfreq(patch.shape[0])[:, None]
    fx = np.fft.rfftfreq(patch.shape[1])[None, :]
    high = np.hypot(fy, fx) > 0.25
    return float(spectrum[high].sum() / max(spectrum.sum(), 1e-12))


def image_stats_check(features: pd.DataFrame, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Cross-validated (by patient) AUC and balanced accuracy of predicting the label from each feature group,
    all groups together, and each feature alone (AUC of the raw value, direction-free)."""
    smallest = int(np.bincount(y, minlength=2).min())
    if smallest < 2:
        return {"note": f"{smallest} image(s) of one class: too few to predict the label", "groups": {}, "features": {}}
    folds = min(5, smallest)
    out: dict[str, Any] = {"groups": {}, "features": {}}
    for name, cols in {**FEATURE_GROUPS, "all": list(features.columns)}.items():
        out["groups"][name] = _cv_classifier(features[cols].to_numpy(), y, groups, folds, seed)
    for col in features.columns:
        auc = roc_auc_score(y, features[col].to_numpy())
        out["features"][col] = float(max(auc, 1 - auc))
    return out


def _cv_classifier(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> dict[str, float]:
    clf = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=15, class_weight="balanced",
                                         random_state=seed)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(clf, x, y, groups=groups, cv=cv, method="predict_proba")[:, 1]
    return {"auc": float(roc_auc_score(y, proba)), "balanced_accuracy": float(balanced_accuracy_score(y, proba >= 0.5))}


# ----------------------------------------------------------------------------------------------- Grad-CAM

def _cam_sample(model: torch.nn.Module, meta: dict, images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame,
                device: torch.device, max_images: int, seed: int, batch_size: int = 32
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row positions, Grad-CAM maps for the positive class, lung masks at the model's input size) for a sample
    spread evenly over (source, label) groups."""
    pick = _spread_sample(rows, max_images, seed)
    augment, size = from_dict(AugmentConfig, meta["augment"]), int(meta["image_size"])
    cams = []
    for i in range(0, len(pick), batch_size):
        x = prepare_batch(torch.from_numpy(images[pick[i:i + batch_size]]).to(device), False, augment, size)
        cams.append(grad_cam(model, x, int(meta["positive_index"])))
    small = F.interpolate(torch.from_numpy(masks[pick]).float()[:, None], size=(size, size), mode="nearest")
    cam_maps = np.concatenate(cams) if cams else np.zeros((0, size, size), np.float32)
    return pick, cam_maps, small[:, 0].numpy() > 0.5


def _spread_sample(rows: pd.DataFrame, max_images: int, seed: int) -> np.ndarray:
    """Row positions, up to max_images, taking the same number from each (source, label) group where possible."""
    rng = np.random.default_rng(seed)
    groups = [rng.permutation(idx) for idx in rows.groupby(["source", "label"]).indices.values()]
    order = [g[k] for k in range(max(map(len, groups), default=0)) for g in groups if k < len(g)]
    return np.sort(np.array(order[:max_images], dtype=np.int64))


def lung_share(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: attribution inside the mask / total attribution (NaN for an all-zero map)."""
    total = cams.reshape(len(cams), -1).sum(1)
    inside = (cams * masks).reshape(len(cams), -1).sum(1)
    return np.divide(inside, total, out=np.full(len(cams), np.nan), where=total > 0)


def cam_lung_share(cams: np.ndarray, masks: np.ndarray, rows: pd.DataFrame) -> dict[str, Any]:
    """Mean Grad-CAM lung share and mean lung area share, overall and per label and per source. Images whose map
    is all zero (no evidence for the positive class at all, common among clear negatives) have no share."""
    frame = rows[["source", "label"]].assign(share=lung_share(cams, masks), area=masks.reshape(len(masks), -1).mean(1))

    def summary(part: pd.DataFrame) -> dict[str, float]:
        valid = part[part["share"].notna()]
        share, area = valid["share"].mean(), valid["area"].mean()
        return {"sampled": len(part), "with_evidence": len(valid), "lung_share": float(share), "lung_area": float(area),
                "enrichment": float(share / area) if area > 0 else math.nan}

    return {"overall": summary(frame), "per_label": {k: summary(g) for k, g in frame.groupby("label")},
            "per_source": {k: summary(g) for k, g in frame.groupby("source")}}


# ----------------------------------------------------------------------------------------------- verdict

def flags(result: dict[str, Any]) -> dict[str, bool | None]:
    """Which checks point at a shortcut (None: the check could not be made on these images)."""
    lift = _probe_lift(result["source_probe"])
    blanked = result["occlusion"]["conditions"]["lungs blanked"]["auc"]
    stats = result["image_stats"]["groups"].get("all", {}).get("auc")
    enrichment = result["cam"]["overall"]["enrichment"]
    return {"source_probe": None if lift is None else lift >= PROBE_LIFT,
            "occlusion": None if not _finite(blanked) else blanked >= BLANKED_AUC,
            "image_stats": None if not _finite(stats) else stats >= STATS_AUC,
            "cam": None if not _finite(enrichment) else enrichment < CAM_ENRICHMENT}


def _probe_lift(source_probe: dict[str, Any]) -> float | None:
    """How far above chance the source is predicted, 0 (chance) to 1 (perfect): the highest over the labels that span
    several sources (within one label the disease cannot explain it), else the overall probe."""
    probes = list(source_probe.get("within_label", {}).values()) or [p for p in [source_probe.get("overall")] if p]
    if not probes:
        return None
    return float(max((p["balanced_accuracy"] - p["chance"]) / (1 - p["chance"]) for p in probes))


def _finite(x: Any) -> bool:
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
        return (f"- Occlusion {mark}: AUC {_fmt(o['intact']['auc'])} on intact images, "
                f"{_fmt(o['lungs blanked']['auc'])} with the lung fields blanked and {_fmt(o['lungs only']['auc'])} "
                "with only the lungs kept; "
                f"with the lungs blanked, {_pct(o['lungs blanked']['sensitivity'])} of {pos} images are still "
                f"called {pos} (intact: {_pct(o['intact']['sensitivity'])}). A model that reads the disease "
                "should drop to about 0.5 without the lungs.")
    if check == "image_stats":
        g = r["image_stats"]["groups"]
        if not g:
            return f"- Image statistics {mark}: {r['image_stats']['note']}."
        best = max(FEATURE_GROUPS, key=lambda k: g[k]["auc"])
        return (f"- Image statistics {mark}: size, padding, histogram and sharpness alone (no anatomy) predict the "
                f"label with AUC {_fmt(g['all']['auc'])} (balanced accuracy {_fmt(g['all']['balanced_accuracy'])}), "
                f"{best} alone {_fmt(g[best]['auc'])}: the data "
                f"{'carry' if r['flags']['image_stats'] else 'carry little of'} this shortcut.")
    c = r["cam"]["overall"]
    return (f"- Grad-CAM {mark}: {_pct(c['lung_share'])} of the {pos} attribution lies inside the lung fields, "
            f"which cover {_pct(c['lung_area'])} of the image (ratio {_fmt(c['enrichment'], 2)}). The maps are coarse "
            "and central, so a ratio somewhat above 1 proves little; one below 1 says the evidence lies elsewhere.")


def _fmt(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "n/a"


def _pct(x: Any) -> str:
    return f"{100 * x:.0f} %" if _finite(x) else "n/a"


# ----------------------------------------------------------------------------------------------- figures

def _write_figures(out: Path, result: dict, images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame,
                   y: np.ndarray, cam_pick: np.ndarray, cams: np.ndarray, cam_masks: np.ndarray, meta: dict) -> None:
    negative = "/".join(sorted(rows.loc[y == 0, "label"].unique())) or "negative"
    _plot_occlusion(result["occlusion"]["conditions"], y, result["threshold"], (negative, result["positive_label"]),
                    out / "occlusion.png")
    pick = _spread_sample(rows, 12, seed=1)
    _plot_masks(images[pick], masks[pick], rows.iloc[pick], out / "masks.png")
    show = _spread_sample(rows.iloc[cam_pick], 8, seed=1)
    augment, size = from_dict(AugmentConfig, meta["augment"]), int(meta["image_size"])
    x = prepare_batch(torch.from_numpy(images[cam_pick[show]]), False, augment, size)
    _plot_cams(x[:, 0].numpy(), cams[show], cam_masks[show], rows.iloc[cam_pick[show]],
               lung_share(cams[show], cam_masks[show]), out / "cam_lungs.png")
    _plot_image_stats(result["image_stats"], out / "imagestats.png")


def _savefig(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_occlusion(occ: dict, y: np.ndarray, threshold: float, labels: tuple[str, str], path: Path) -> None:
    """Score histograms per class and condition; the bins span the observed scores (a weakly trained model's
    scores can all lie within a few hundredths of each other), the same bins in every panel."""
    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(4.2 * len(CONDITIONS), 3.4), sharey=True)
    every = np.concatenate([occ[c]["scores"] for c in CONDITIONS])
    lo, hi = float(every.min()), float(every.max())
    edges = np.linspace(lo, max(hi, lo + 1e-6), 26)
    for ax, condition in zip(axes, CONDITIONS):
        score = np.asarray(occ[condition]["scores"])
        for cls, color in ((0, "C0"), (1, "C3")):
            values = score[y == cls]
            ax.hist(values, bins=edges, color=color, alpha=0.6, weights=np.full(len(values), 1 / max(1, len(values))),
                    label=f"true {labels[cls]} (n={len(values)})")
        ax.axvline(threshold, color="k", ls="--", lw=1)
        ax.set(title=f"{condition}: AUC {_fmt(occ[condition]['auc'])}", xlabel=f"score (P {labels[1]})")
    axes[0].set_ylabel("share of the class")
    axes[0].legend(fontsize=8, loc="upper center")
    _savefig(fig, path)


def _grid(n: int, cols: int) -> tuple[plt.Figure, np.ndarray]:
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


def _plot_masks(images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, path: Path) -> None:
    fig, axes = _grid(len(images), 6)
    for ax, img, mask, (_, row) in zip(axes, images, masks, rows.iterrows()):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.contour(mask, levels=[0.5], colors="cyan", linewidths=1)
        ax.set_title(f"{row['source']} / {row['label']}", fontsize=8)
    _savefig(fig, path)


def _plot_cams(gray: np.ndarray, cams: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, shares: np.ndarray,
               path: Path) -> None:
    fig, axes = _grid(len(gray), 4)
    for ax, g, cam, mask, share, (_, row) in zip(axes, gray, cams, masks, shares, rows.iterrows()):
        ax.imshow(overlay(g, cam))
        ax.contour(mask, levels=[0.5], colors="white", linewidths=1)
        where = f"{_pct(share)} in lungs" if _finite(share) else "no positive evidence"
        ax.set_title(f"{row['source']} / {row['label']}: {where}", fontsize=8)
    _savefig(fig, path)


def _plot_image_stats(stats: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    if stats["groups"]:
        names = list(stats["groups"])
        left.barh(names, [stats["groups"][k]["auc"] for k in names], color="C1")
        top = sorted(stats["features"].items(), key=lambda kv: kv[1])[-12:]
        right.barh([k for k, _ in top], [v for _, v in top], color="C2")
    for ax, title in ((left, "label from image statistics\n(gradient boosting, CV by patient)"),
                      (right, "single features (AUC, either direction)")):
        ax.axvline(0.5, color="k", ls="--", lw=1)
        ax.set(xlim=(0.4, 1.0), xlabel="AUC", title=title)
        ax.tick_params(axis="y", labelsize=8)
    _savefig(fig, path)


# ----------------------------------------------------------------------------------------------- HTML

def diagnostics_html(result: dict[str, Any], out_dir: str | Path) -> str:
    """HTML snippet (a report section body): the verdict, the key numbers and the figures embedded from out_dir."""
    head, *lines = verdict(result).split("\n\n")
    lm = result["lung_masks"]
    detail = (f'{_pct(lm["sides_refined"])} of lungs also traced in the image (the rest: template only)'
              if "sides_refined" in lm else f'{lm["images_without_lungs"]} image(s) without lungs found')
    setup = (f'{result["n_images"]} images ({result["split"]} split of {Path(result["data"]).name}); lung fields: '
             f'{lm["method"]}, {detail}; blanked regions set to one gray level for all images '
             f'({result["occlusion"]["fill_level"]} of 255).')
    return (f'<div class="diagnostics"><p>{_md_inline(head)}</p>'
            f'<ul>{"".join(f"<li>{_md_inline(line)}</li>" for line in lines)}</ul>'
            f'<p class="sub">{html.escape(setup)}</p>'
            f"{_probe_table(result)}{_occlusion_table(result)}{_stats_table(result)}{_cam_table(result)}"
            f'<div class="figs">{_figures(Path(out_dir))}</div></div>')


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A table whose first column is a left-aligned label; cells are escaped."""
    def row(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(f'<{tag}{" class=k" if i == 0 else ""}>{html.escape(c)}</{tag}>'
                                for i, c in enumerate(cells)) + "</tr>"
    return "<table>" + row(header, "th") + "".join(row(r, "td") for r in rows) + "</table>"


def _probe_table(result: dict[str, Any]) -> str:
    probes = {"all images": result["source_probe"].get("overall"), **result["source_probe"].get("within_label", {})}
    return _table(["source probe", "balanced accuracy", "chance", "images", "sources"],
                  [[name, _fmt(p["balanced_accuracy"], 3), _fmt(p["chance"], 3), str(p["n"]), ", ".join(p["classes"])]
                   for name, p in probes.items() if p])


def _occlusion_table(result: dict[str, Any]) -> str:
    occ = result["occlusion"]["conditions"]
    return _table(["occlusion", "AUC", "95 % CI", "sensitivity", "specificity"],
                  [[c, _fmt(occ[c]["auc"], 3), f'{_fmt(occ[c]["auc_ci95"][0], 3)} - {_fmt(occ[c]["auc_ci95"][1], 3)}',
                    _fmt(occ[c]["sensitivity"], 3), _fmt(occ[c]["specificity"], 3)] for c in CONDITIONS])


def _stats_table(result: dict[str, Any]) -> str:
    return _table(["image statistics -> label", "AUC", "balanced accuracy"],
                  [[k, _fmt(v["auc"], 3), _fmt(v["balanced_accuracy"], 3)]
                   for k, v in result["image_stats"]["groups"].items()])


def _cam_table(result: dict[str, Any]) -> str:
    cam = result["cam"]
    parts = [("all", cam["overall"]), *cam["per_label"].items(), *cam["per_source"].items()]
    return _table(["Grad-CAM", "images", "with evidence", "share in lungs", "lung area", "ratio"],
                  [[k, str(v["sampled"]), str(v["with_evidence"]), _pct(v["lung_share"]), _pct(v["lung_area"]),
                    _fmt(v["enrichment"])]
                   for k, v in parts])


def _figures(out_dir: Path) -> str:
    return "".join(
        f'<figure><img alt="{alt}" src="data:image/png;base64,'
        f'{base64.b64encode((out_dir / name).read_bytes()).decode("ascii")}"><figcaption>{alt}</figcaption></figure>'
        for name, alt in FIGURES.items() if (out_dir / name).exists())


def _md_inline(text: str) -> str:
    """One line of the verdict's Markdown (bold, a leading list dash) as HTML."""
    parts = html.escape(text.removeprefix("- ")).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222;line-height:1.4;padding:0 1em}
table{border-collapse:collapse;margin:.8em 0}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td.k,th.k{text-align:left}.sub{color:#555}
.figs img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}
"""


def _page(result: dict[str, Any], out_dir: Path) -> str:
    title = f"Shortcut diagnostics: {Path(result['run']).name} on {Path(result['data']).name}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{diagnostics_html(result, out_dir)}</body></html>\n")
