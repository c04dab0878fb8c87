"""Evaluation figures as PNG files: ROC, confusion matrix, reliability diagram, score histograms, ROC overlay.

Each function draws one self-explanatory figure (title, axis labels, legend) and writes it to `path`.
matplotlib runs on the Agg backend, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from covidcxr.formatting import interval, number

plt.switch_backend("Agg")  # files only, no display: works wherever the CLI runs

DPI = 120
SQUARE = (5.0, 5.0)


def _save(fig: Figure, path: str | Path) -> Path:
    """Write and close the figure (matplotlib keeps open figures in memory); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _roc_axes(ax: plt.Axes, title: str) -> None:
    """The ROC frame every ROC figure shares: chance diagonal, square axes, labels and legend."""
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=title)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def plot_roc(
    y: Any,
    score: Any,
    auc: float | None,
    auc_ci: Sequence[float | None] | None,
    operating_point: float | None,
    path: str | Path,
) -> Path:
    """ROC curve with AUC [95 % CI] in the legend; `operating_point` is the decision threshold, marked on the curve."""
    y_arr, s_arr = np.asarray(y), np.asarray(score, dtype=float)
    fig, ax = plt.subplots(figsize=SQUARE)
    if y_arr.min() == y_arr.max():
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class present", ha="center", va="center")
    else:
        fpr, tpr, _ = roc_curve(y_arr, s_arr)
        ci = "" if auc_ci is None else f" {interval(auc_ci)}"
        ax.plot(fpr, tpr, lw=2, color="C0", label=f"AUC {number(auc)}{ci}")
        if operating_point is not None:
            called = s_arr >= operating_point
            op_fpr, op_tpr = called[y_arr == 0].mean(), called[y_arr == 1].mean()
            ax.plot(op_fpr, op_tpr, "o", ms=8, color="C3",
                    label=f"threshold {operating_point:.3f}\nsens {op_tpr:.3f}, spec {1 - op_fpr:.3f}")
    _roc_axes(ax, "ROC curve")
    return _save(fig, path)


def plot_confusion(confusion: Mapping[str, int], path: str | Path,
                   labels: Sequence[str] = ("negative", "positive")) -> Path:
    """Counts and row-normalised rates (rows = true class) side by side; `labels` = (negative, positive) names."""
    counts = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]], dtype=float)
    row_sums = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, row_sums, out=np.full_like(counts, np.nan), where=row_sums > 0)
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.2))
    panels = ((counts, "counts", lambda v: f"{int(v)}"), (rates, "fraction of true class", lambda v: number(v, 2)))
    for ax, (matrix, title, text) in zip(axes, panels):
        shade = matrix / np.nanmax(matrix) if np.nanmax(matrix) > 0 else np.zeros_like(matrix)
        ax.imshow(np.nan_to_num(shade), cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(matrix):
            dark = np.nan_to_num(shade[i, j]) > 0.55
            ax.text(j, i, text(v), ha="center", va="center", fontsize=14, color="white" if dark else "black")
        ax.set_xticks([0, 1], [f"called {labels[0]}", f"called {labels[1]}"])
        ax.set_yticks([0, 1], [f"true {labels[0]}", f"true {labels[1]}"], rotation=90, va="center")
        ax.set_title(title)
    fig.suptitle("Confusion matrix")
    return _save(fig, path)


def plot_calibration(calibration_bins: Sequence[Mapping[str, Any]], ece: float | None, path: str | Path) -> Path:
    """Reliability diagram: fraction positive against mean score per bin, the diagonal, and bin counts below."""
    filled = [b for b in calibration_bins if b["count"] > 0]
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.0, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
    ax.plot([b["mean_score"] for b in filled], [b["frac_positive"] for b in filled], "o-", color="C0",
            label=f"model (ECE {number(ece)})")
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="fraction positive", title="Calibration (reliability diagram)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    lefts = [b["lo"] for b in calibration_bins]
    widths = [b["hi"] - b["lo"] for b in calibration_bins]
    bars = ax_n.bar(lefts, [b["count"] for b in calibration_bins], width=widths, align="edge", color="C0",
                    alpha=0.5, edgecolor="C0")
    ax_n.bar_label(bars, fontsize=7, padding=1)
    ax_n.set(xlabel="predicted probability (bin)", ylabel="images")
    ax_n.set_ylim(0, max(b["count"] for b in calibration_bins) * 1.3 + 1)
    return _save(fig, path)


def plot_score_histograms(
    y: Any, score: Any, threshold: float, path: str | Path, labels: Sequence[str] = ("negative", "positive")
) -> Path:
    """Score distribution of each true class (one panel each, so a rare class stays visible) and the threshold."""
    y_arr, s_arr = np.asarray(y), np.asarray(score, dtype=float)
    fig, axes = plt.subplots(2, 1, figsize=(6.0, 5.0), sharex=True)
    edges = np.linspace(0, 1, 41)
    # legends opposite each class's usual mass: negatives score low, positives high
    for ax, cls, color, corner in zip(axes, (0, 1), ("C0", "C3"), ("upper right", "upper left")):
        values = s_arr[y_arr == cls]
        wrong = int(((values >= threshold) != bool(cls)).sum())
        ax.hist(values, bins=edges, color=color, alpha=0.7)
        if values.size == 0:
            ax.text(0.5, 0.5, "no images of this class", ha="center", va="center", transform=ax.transAxes)
            ax.set_ylim(0, 1)
        ax.axvline(threshold, color="k", ls="--", lw=1.5, label=f"threshold {threshold:.3f}")
        ax.set(ylabel="images", title=f"true {labels[cls]} (n={values.size}, {wrong} called {labels[1 - cls]})")
        ax.legend(fontsize=8, loc=corner)
    axes[1].set(xlim=(0, 1), xlabel=f"score (probability of {labels[1]})")
    fig.suptitle("Scores by true class")
    return _save(fig, path)


def plot_roc_overlay(curves: Mapping[str, tuple[Any, Any]], path: str | Path) -> Path:
    """Several ROC curves on one set of axes, each labelled with its AUC, for comparing runs or test sets."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for name, (y, score) in curves.items():
        y_arr, s_arr = np.asarray(y), np.asarray(score, dtype=float)
        if y_arr.min() == y_arr.max():
            ax.plot([], [], " ", label=f"{name}: one class, no ROC")
            continue
        fpr, tpr, _ = roc_curve(y_arr, s_arr)
        ax.plot(fpr, tpr, lw=2, label=f"{name} (AUC {roc_auc_score(y_arr, s_arr):.3f})")
    _roc_axes(ax, "ROC comparison")
    return _save(fig, path)
