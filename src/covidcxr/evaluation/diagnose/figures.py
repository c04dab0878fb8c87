"""The diagnostics' figures: occlusion score histograms, lung masks, Grad-CAM with lung outlines, image statistics."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from covidcxr.evaluation.diagnose.attribution import lung_share, spread_sample
from covidcxr.evaluation.diagnose.occlusion import CONDITIONS
from covidcxr.formatting import is_defined, number, percent
from covidcxr.model.cam import overlay
from covidcxr.scoring import Scorer

plt.switch_backend("Agg")  # files only, no display: works wherever the CLI runs

FIGURES = {"occlusion.png": "Scores per class, intact and occluded", "masks.png": "Lung masks",
           "cam_lungs.png": "Grad-CAM with lung outlines", "imagestats.png": "Image-statistics shortcut check"}


def write_figures(out: Path, result: dict, images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, y: np.ndarray,
                  cam_pick: np.ndarray, cams: np.ndarray, cam_masks: np.ndarray, scorer: Scorer) -> None:
    """The four figures into `out`, from the checks' results and the images they ran on (FIGURES names them)."""
    negative = "/".join(sorted(rows.loc[y == 0, "label"].unique())) or "negative"
    _plot_occlusion(result["occlusion"]["conditions"], y, result["threshold"], (negative, result["positive_label"]),
                    out / "occlusion.png")
    pick = spread_sample(rows, 12, seed=1)
    _plot_masks(images[pick], masks[pick], rows.iloc[pick], out / "masks.png")
    show = spread_sample(rows.iloc[cam_pick], 8, seed=1)
    x = torch.cat(list(scorer.inputs(images[cam_pick[show]]))).cpu() if len(show) else torch.zeros(0, 1, 1, 1)
    _plot_cams(x[:, 0].numpy(), cams[show], cam_masks[show], rows.iloc[cam_pick[show]],
               lung_share(cams[show], cam_masks[show]), out / "cam_lungs.png")
    _plot_image_stats(result["image_stats"], out / "imagestats.png")


def _savefig(fig: plt.Figure, path: Path) -> None:
    """Write and close the figure (matplotlib keeps open figures in memory)."""
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
        ax.set(title=f"{condition}: AUC {number(occ[condition]['auc'])}", xlabel=f"score (P {labels[1]})")
    axes[0].set_ylabel("share of the class")
    axes[0].legend(fontsize=8, loc="upper center")
    _savefig(fig, path)


def _grid(n: int, cols: int) -> tuple[plt.Figure, Iterable[plt.Axes]]:
    """A grid of blank axes for `n` thumbnails, `cols` per row."""
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


def _plot_masks(images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, path: Path) -> None:
    """Sample images with their lung outlines: a bad mask makes every lung-based check misleading."""
    fig, axes = _grid(len(images), 6)
    for ax, img, mask, (_, row) in zip(axes, images, masks, rows.iterrows()):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.contour(mask, levels=[0.5], colors="cyan", linewidths=1)
        ax.set_title(f"{row['source']} / {row['label']}", fontsize=8)
    _savefig(fig, path)


def _plot_cams(gray: np.ndarray, cams: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, shares: np.ndarray,
               path: Path) -> None:
    """Grad-CAM overlays with lung outlines, each titled with its share of attribution inside the lungs."""
    fig, axes = _grid(len(gray), 4)
    for ax, g, cam, mask, share, (_, row) in zip(axes, gray, cams, masks, shares, rows.iterrows()):
        ax.imshow(overlay(g, cam))
        ax.contour(mask, levels=[0.5], colors="white", linewidths=1)
        where = f"{percent(share)} in lungs" if is_defined(share) else "no positive evidence"
        ax.set_title(f"{row['source']} / {row['label']}: {where}", fontsize=8)
    _savefig(fig, path)


def _plot_image_stats(stats: dict, path: Path) -> None:
    """The image-statistics check: AUC per feature group, and the features that predict the label best."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    if stats["groups"]:
        names = list(stats["groups"])
        left.barh(names, [stats["groups"][k]["auc"] for k in names], color="C1")
        top = sorted(stats["features"].items(), key=lambda kv: kv[1])[-12:]
        right.barh([k for k, _ in top], [v for _, v in top], color="C2")
    for ax, title in ((left, "label from image statistics\n(CV by patient)"),
                      (right, "single features (AUC, either direction)")):
        ax.axvline(0.5, color="k", ls="--", lw=1)
        ax.set(xlim=(0.4, 1.0), xlabel="AUC", title=title)
        ax.tick_params(axis="y", labelsize=8)
    _savefig(fig, path)

