"""The one seam from a run folder to scores: `Scorer.from_run(run)` holds the model, its preprocessing, the device,
the precision, the positive class, the operating threshold and the run's gate, and every consumer (evaluate,
predict, serve, the diagnostics, the probe, export) builds its model input through it.

Images reach it in one of two forms, which give the model bit-identical input: a decoded file (`cache_square` makes
its cache copy, exactly as `ingest` would) or rows of an ingested data folder's uint8 cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from covidcxr.data.cache import to_square
from covidcxr.device import resolve_device
from covidcxr.model.checkpoint import load_run
from covidcxr.model.network import fold_pooling, unwrap
from covidcxr.model.spec import RunSpec, model_id
from covidcxr.preprocess.transform import Preprocess
from covidcxr.trust.gate import Gate, load_gate
from covidcxr.trust.guard import GUARD_DIR, Guard

log = logging.getLogger(__name__)

BATCH_SIZE = 256


@torch.no_grad()
def predict_probs(model: torch.nn.Module, normalised: torch.Tensor, preprocess: Preprocess, device: torch.device,
                  batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Softmax probabilities (N, classes) for normalised uint8 squares (N, S, S) (`Preprocess.normalise_u8`).

    Always in float32, whatever precision trained the model: the threshold is chosen on these scores, and the
    exported graph (float32 in every runtime) then gives the same answer on any hardware."""
    model.eval()
    out = []
    for i in range(0, len(normalised), batch_size):
        x = preprocess.model_input_u8(normalised[i:i + batch_size].to(device, non_blocking=True))
        out.append(model(x.contiguous(memory_format=torch.channels_last)).float().softmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


class Scorer:
    """A run's model, preprocessing, device, precision and threshold, loaded once."""

    def __init__(self, model: torch.nn.Module, spec: RunSpec, device: torch.device, meta: dict | None = None,
                 guard: Guard | None = None, members: list["Scorer"] | None = None, gate: Gate | None = None):
        self.model, self.spec, self.device = model.to(device).eval(), spec, device
        self.meta = meta or {}  # the checkpoint's meta as saved: provenance (epoch, hashes) for reports
        self.preprocess = Preprocess(spec.preprocess)
        self.gate = gate  # which images it answers about (trust/gate.py); None: every image is scored
        # the opt-in member guard (trust/guard.py), loaded only when asked for (evaluate measures it)
        self.guard, self.members = guard, members or []
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the scoring network from `model` (after its weights changed, e.g. by fine-tuning): the same model
        with AlexNet's average pool folded into its first linear layer, 2.4x fewer bytes read per image
        (`fold_pooling`); `model` itself stays whole for Grad-CAM."""
        self.net = fold_pooling(self.model, self.spec.preprocess.image_size)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", which: str = "model.pt", guard: bool = False,
                 gate: bool = True) -> "Scorer":
        """A run's scorer with its gate (`gate=False`: without, e.g. for a guard member) and, when `guard`, the
        run's opt-in member guard if it has one."""
        run_dir, dev = Path(run_dir), resolve_device(device)
        model, meta = load_run(run_dir, which, device=dev)
        the_guard = Guard.load(run_dir) if guard else None
        members = [cls.from_run(run_dir / GUARD_DIR, device, m, gate=False)
                   for m in the_guard.members] if the_guard else []
        spec = RunSpec.from_meta(meta, run_dir, model_id(run_dir, which))
        log.debug("loaded %s (%s, %s; %d px; threshold %.4f by %s; %d guard members) on %s", spec.model_id,
                  spec.arch, spec.task, spec.preprocess.image_size, spec.threshold, spec.threshold_method or "?",
                  len(members), dev)
        the_gate = load_gate(run_dir, trained_as=meta.get("config_hash")) if gate else None
        return cls(model, spec, dev, meta, the_guard, members, the_gate)

    def cache_square(self, image: np.ndarray) -> np.ndarray:
        """A decoded image (H, W) in [0, 1] -> the (S, S) uint8 square the cache would hold for it."""
        return to_square(image, self.spec.preprocess.cache_size, self.spec.preprocess.square)

    def normalise(self, squares: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Cache squares (N, S, S) uint8 -> normalised (cropped, equalized) uint8 squares."""
        return self.preprocess.normalise_u8(torch.as_tensor(np.asarray(squares)))

    def inputs(self, squares: torch.Tensor | np.ndarray, batch_size: int = BATCH_SIZE) -> Iterator[torch.Tensor]:
        """Model input batches (B, 1, M, M) float32 on the device, for cache squares (N, S, S) uint8."""
        normalised = self.normalise(squares)
        for i in range(0, len(normalised), batch_size):
            yield self.preprocess.model_input_u8(normalised[i:i + batch_size].to(self.device))

    def probabilities(self, squares: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, classes) softmax probabilities for cache squares (N, S, S) uint8."""
        return predict_probs(self.net, self.normalise(squares), self.preprocess, self.device).numpy()

    def scores(self, squares: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N,) probability of the positive class for cache squares."""
        return self.probabilities(squares)[:, self.spec.positive_index] if len(squares) else np.zeros(0)

    @torch.no_grad()
    def features(self, squares: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, D) penultimate features for cache squares."""
        net = unwrap(self.net)
        return torch.cat([net.features(x).cpu() for x in self.inputs(squares)] or [torch.zeros(0, 0)]).numpy()

    def member_scores(self, squares: torch.Tensor | np.ndarray) -> np.ndarray:
        """(members, N) positive-class probabilities of the guard's member models."""
        return np.stack([m.scores(squares) for m in self.members]) if self.members else np.zeros((0, len(squares)))

    def assess(self, squares: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(scores, ood_scores, in_distribution) for cache squares; the last two are None when the run has no guard."""
        scores = self.scores(squares)
        if self.guard is None or not len(squares):
            return scores, None, None
        features = self.features(squares) if self.guard.density is not None else None
        ood = self.guard.ood_scores(scores, self.member_scores(squares), features)
        return scores, ood, self.guard.in_distribution(ood)
