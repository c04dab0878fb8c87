"""The per-image guard: is this image like those the run was validated on, so that its score means something?

Measured under the cross-source protocol (each held-out collection playing a new site): image statistics, thumbnail
PCA and feature-density terms each flag only 1-13 % of the wrong predictions on unseen collections, while
disagreement among models trained with different sources held out flags about a third. So the guard's main term is
`disagreement`: the mean |member - run| of the positive-class probability over member models stored with the run
(RUN/guard/, bf16); an optional `density` term is the whitened distance of the run's penultimate features from the
validation images' (top principal components).

Each term is divided by its own validation quantile and the image's `ood_score` is the largest: 1.0 means "as
unusual as the least typical 5 % of validation images". The threshold on it is set on validation images so that
`coverage` (default 95 %) of them are accepted. The score is always reported; only `predict --reject-ood` hides
the label.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from covidcxr.errors import InputError

GUARD_FILE = "guard.json"
GUARD_DIR = "guard"  # member checkpoints, loadable with `load_run(RUN/guard, member)`
DENSITY_FILE = "guard_density.npz"
COVERAGE = 0.95
DENSITY_DIMS = 32  # principal components of the penultimate features kept by the density term


@dataclass
class Guard:
    """A fitted guard: member files, per-term scales, the threshold on the combined score, and provenance."""

    members: list[str]
    scales: dict[str, float] = field(default_factory=dict)
    threshold: float = 1.0
    coverage: float = COVERAGE
    info: dict = field(default_factory=dict)  # member sources, stored size, scoring time: shown in reports
    density: dict[str, np.ndarray] | None = None  # {"mean": (D,), "whiten": (K, D)}

    def terms(self, scores: np.ndarray, member_scores: np.ndarray | None,
              features: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Raw per-image terms (higher = less typical): disagreement with the members, distance of the features."""
        out = {}
        if self.members:
            out["disagreement"] = np.abs(np.asarray(member_scores) - np.asarray(scores)[None]).mean(0)
        if self.density is not None:
            z = (np.asarray(features) - self.density["mean"]) @ self.density["whiten"].T
            out["density"] = np.sqrt((z ** 2).mean(1))
        return out

    def ood_scores(self, scores: np.ndarray, member_scores: np.ndarray | None,
                   features: np.ndarray | None = None) -> np.ndarray:
        """(N,) typicality score: the largest term in units of its validation quantile (higher = less typical)."""
        terms = self.terms(scores, member_scores, features)
        return np.max([terms[k] / self.scales[k] for k in terms], axis=0)

    def in_distribution(self, ood_scores: np.ndarray) -> np.ndarray:
        """(N,) bool: accepted by the guard."""
        return np.asarray(ood_scores) <= self.threshold

    def save(self, run_dir: str | Path) -> Path:
        run_dir = Path(run_dir)
        meta = {k: v for k, v in asdict(self).items() if k != "density"}
        meta["density"] = self.density is not None
        if self.density is not None:
            np.savez(run_dir / DENSITY_FILE,
                     **self.density)  # type: ignore[arg-type]  # mypy: a ** dict may fill savez's allow_pickle: bool
        (run_dir / GUARD_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return run_dir / GUARD_FILE

    @classmethod
    def load(cls, run_dir: str | Path) -> "Guard | None":
        """The run's guard, or None when it has none (then nothing is claimed about typicality)."""
        path = Path(run_dir) / GUARD_FILE
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
            density = dict(np.load(Path(run_dir) / DENSITY_FILE)) if meta.pop("density") else None
            return cls(**meta, density=density)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise InputError(f"{path}: unreadable guard ({e}); delete it or refit it with covidcxr calibrate") from None


def fit_density(features: np.ndarray, dims: int = DENSITY_DIMS) -> dict[str, np.ndarray]:
    """Mean and whitening matrix of the top principal components of validation features."""
    mean = features.mean(0)
    _, s, vt = np.linalg.svd(features - mean, full_matrices=False)
    k = max(1, min(dims, len(features) // 5, int((s > s[0] * 1e-6).sum())))  # far fewer than images: no overfit
    scale = s[:k] / np.sqrt(max(1, len(features) - 1))
    return {"mean": mean.astype(np.float32), "whiten": (vt[:k] / scale[:, None]).astype(np.float32)}


def fit_guard(scores: np.ndarray, member_scores: np.ndarray | None, members: list[str],
              features: np.ndarray | None = None, coverage: float = COVERAGE, info: dict | None = None) -> Guard:
    """Scales and threshold from validation images' scores (and features, when `features` is given)."""
    if not members and features is None:
        raise InputError("a guard needs member runs or a density term; give members or features")
    guard = Guard(list(members), coverage=coverage, info=dict(info or {}),
                  density=fit_density(np.asarray(features, dtype=np.float64)) if features is not None else None)
    terms = guard.terms(scores, member_scores, features)
    guard.scales = {k: max(float(np.quantile(v, coverage)), 1e-6) for k, v in terms.items()}
    guard.threshold = float(np.quantile(guard.ood_scores(scores, member_scores, features), coverage))
    return guard
