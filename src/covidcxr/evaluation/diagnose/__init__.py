"""Shortcut diagnostics: does a run's model read the disease from the lungs, or the hospital from everything else?

Four checks, on the run's test images (or on all unseen images of another ingested data set):
1. source probe: how well the source collection can be predicted from the model's penultimate features;
2. occlusion: the model's scores with the lung fields blanked and with only the lungs kept (occlusion.py says how
   the blanked regions are filled, and why);
3. image statistics: how well a classifier on non-anatomical features alone (size and aspect before resizing,
   padding and border, intensity histogram, sharpness and noise) predicts the label, cross-validated by patient
   (regularised logistic regression below 200 images, gradient boosting from there). High means the data itself
   carries a shortcut, whatever the model does;
4. Grad-CAM lung share: the share of the COVID-19 attribution that falls inside the lung fields, beside the
   share of the image the lungs cover (what an attribution spread evenly would give).
Lung fields come from a learned lung model (lungs/unet.py) when one is given or the run has one, else from
`lungs/heuristic.py` (a documented heuristic); diagnose.json names which. Each check has its module in this package
(probe.py holds the source probe); everything is written to one folder: diagnose.json, figures, diagnose.html
and verdict.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from covidcxr.data import tasks
from covidcxr.data.cache import ImageCache
from covidcxr.errors import InputError
from covidcxr.evaluation.bootstrap import patient_codes
from covidcxr.evaluation.diagnose import probe
from covidcxr.evaluation.diagnose.attribution import cam_lung_share, lung_share, sample_cams
from covidcxr.evaluation.diagnose.figures import FIGURES, write_figures
from covidcxr.evaluation.diagnose.imagestats import FEATURE_GROUPS, image_features, image_stats_check
from covidcxr.evaluation.diagnose.occlusion import CONDITIONS, fill_level, occlude, occlusion_test
from covidcxr.evaluation.diagnose.page import diagnostics_html, page
from covidcxr.evaluation.diagnose.verdict import flags, verdict
from covidcxr.evaluation.metrics_json import write_metrics
from covidcxr.evaluation.selection import select_images
from covidcxr.lungs import heuristic as lungs
from covidcxr.lungs.segment import MIN_LUNG_AREA, load_lung_model, segment
from covidcxr.model.checkpoint import LUNG_MODEL
from covidcxr.scoring import Scorer

log = logging.getLogger(__name__)

__all__ = ["CONDITIONS", "FEATURE_GROUPS", "FIGURES", "cam_lung_share", "diagnose", "diagnostics_html", "fill_level",
           "flags", "image_features", "image_stats_check", "lung_fields", "lung_share", "occlude", "occlusion_test",
           "verdict"]


def diagnose(run: str | Path, data: str | Path, out: str | Path, split: str | None = None, device: str = "auto",
             max_cam_images: int = 200, seed: int = 0, lung_model: str | Path | None = None) -> dict[str, Any]:
    """Run the four checks and write DIR/diagnose.json, the figures, diagnose.html and verdict.md; return the numbers.

    `split`: "test" (the run's own test images in DATA) or "all" (every image of DATA the run did not train or
    validate on); by default "test" when DATA holds the run's test images, else "all".
    `lung_model`: a lung segmentation checkpoint (covidcxr lungs train) for the lung fields; by default the run's own
    copy when it was trained with crop="lungs", else the heuristic of lungs/heuristic.py.
    """
    run, out = Path(run), Path(out)
    scorer = Scorer.from_run(run, device, gate=False)
    spec, dev = scorer.spec, scorer.device
    cache = ImageCache(data)
    split = split or ("test" if _holds_test_images(run, cache) else "all")
    rows = _task_rows(run, cache, split, spec.task)
    y = (tasks.encode(rows["label"], spec.task) == spec.positive_index).astype(int)
    images = cache.load(rows["cache_index"]).numpy()
    _log(f"{len(rows)} images ({split}); lung masks")
    lung_model = lung_model or (run / LUNG_MODEL if (run / LUNG_MODEL).is_file() else None)
    masks, mask_info = lung_fields(images, lung_model, dev)
    result: dict[str, Any] = {
        "run": str(run.resolve()), "data": str(Path(data).resolve()), "split": split, "task": spec.task,
        "positive_label": spec.positive_label, "threshold": spec.threshold,
        "n_images": len(rows), "n_patients": int(patient_codes(rows).max()) + 1,
        "counts": {f"{src}/{lab}": int(n) for (src, lab), n in rows.groupby(["source", "label"]).size().items()},
        "lung_masks": {**mask_info, "mean_area_fraction": float(masks.mean())},
    }
    _log("model passes: features, occlusion, Grad-CAM")
    features = scorer.features(images)
    result["occlusion"] = occlusion_test(scorer, images, masks, rows, y)
    cam_pick, cams, cam_masks = sample_cams(scorer, images, masks, rows, max_cam_images, seed)
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
    write_figures(out, result, images, masks, rows, y, cam_pick, cams, cam_masks, scorer)
    (out / "verdict.md").write_text(verdict(result) + "\n", encoding="utf-8")
    (out / "diagnose.html").write_text(page(result, out), encoding="utf-8")
    return json.loads((out / "diagnose.json").read_text())


def lung_fields(images: np.ndarray, lung_model: str | Path | None, device: torch.device,
                chunk: int = 256) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, S, S) bool lung masks and how they were made: the learned model when given, else the heuristic."""
    if lung_model is None:
        masks, refined = lungs.lung_masks(images)
        method = "heuristic (lungs/heuristic.py: anatomical template united with the dark lung regions)"
        return masks, {"method": method,
                       "sides_refined": float(refined.mean() / 2)}
    model = load_lung_model(lung_model).to(device)
    def masks_of(batch: np.ndarray) -> np.ndarray:
        return segment(model, torch.from_numpy(batch).to(device).unsqueeze(1).float().div_(255))[:, 0].cpu().numpy()
    masks = np.concatenate([masks_of(images[i:i + chunk]) for i in range(0, len(images), chunk)]) if len(images) \
        else np.zeros(images.shape, bool)
    found = masks.reshape(len(masks), -1).mean(1) >= MIN_LUNG_AREA
    return masks, {"method": f"learned (lungs/unet.py U-Net trained on hand-drawn masks): {lung_model}",
                   "images_without_lungs": int((~found).sum())}


def _log(message: str) -> None:
    log.info("diagnose: %s", message)


def _holds_test_images(run: Path, cache: ImageCache) -> bool:
    split = pd.read_csv(run / "split.csv")
    return bool(cache.manifest()["path"].isin(split.loc[split["split"] == "test", "path"]).any())


def _task_rows(run: Path, cache: ImageCache, split: str, task: str) -> pd.DataFrame:
    rows, _ = select_images(run, cache, split)
    rows = rows[tasks.encode(rows["label"], task) >= 0].reset_index(drop=True)
    if rows.empty:
        raise InputError(f"{cache.dir}: no images of split {split!r} with labels that task {task} uses")
    return rows

