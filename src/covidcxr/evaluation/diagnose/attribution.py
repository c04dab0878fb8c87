"""Grad-CAM lung share: the share of the positive-class attribution inside the lung fields, beside the share of the
image the lungs cover (what an attribution spread evenly would give).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from covidcxr.model.cam import grad_cam
from covidcxr.scoring import Scorer


def sample_cams(scorer: Scorer, images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, max_images: int,
                seed: int, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row positions, Grad-CAM maps for the positive class, lung masks at the model's input size) for a sample
    spread evenly over (source, label) groups."""
    pick = spread_sample(rows, max_images, seed)
    size = scorer.spec.preprocess.image_size
    cams = [grad_cam(scorer.model, x, scorer.spec.positive_index) for x in scorer.inputs(images[pick], batch_size)]
    small = F.interpolate(torch.from_numpy(masks[pick]).float()[:, None], size=(size, size), mode="nearest")
    cam_maps = np.concatenate(cams) if cams else np.zeros((0, size, size), np.float32)
    return pick, cam_maps, small[:, 0].numpy() > 0.5


def spread_sample(rows: pd.DataFrame, max_images: int, seed: int) -> np.ndarray:
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

