"""Give a trained run its per-image guard: store member models beside it and set the guard's threshold on the
run's validation images (RUN/guard.json, RUN/guard/*.pt; see trust/guard.py for what the guard measures)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covidcxr.data.cache import ImageCache
from covidcxr.errors import InputError
from covidcxr.model.checkpoint import load_checkpoint
from covidcxr.scoring import Scorer
from covidcxr.trust.guard import COVERAGE, GUARD_DIR, fit_guard


def run_data(run: Path) -> Path:
    """The data folder a run was trained on (its config.json says)."""
    config = run / "config.json"
    data = Path(json.loads(config.read_text())["data"]) if config.is_file() else None
    if data is None or not data.is_dir():
        raise InputError(f"{run}: its training data folder ({data}) is not here; pass the data folder explicitly")
    return data


def squares_for(data: str | Path, paths: pd.Series) -> np.ndarray:
    """Cache squares (N, S, S) of the given manifest paths of an ingested data folder, in the given order."""
    cache = ImageCache(data)
    index = cache.manifest().set_index("path")["cache_index"]
    missing = ~paths.isin(index.index)
    if missing.any():
        raise InputError(f"{data}: {int(missing.sum())} image(s) are not in this data folder, e.g. "
                         f"{paths[missing].iloc[0]}; pass the folder the run was trained on")
    return cache.load(index.loc[paths].to_numpy()).numpy()


def attach_guard(run: str | Path, members: Sequence[str | Path], data: str | Path | None = None,
                 paths: pd.Series | None = None, density: bool = False, coverage: float = COVERAGE,
                 squares: np.ndarray | None = None) -> dict:
    """Store the `members` checkpoints (e.g. other runs' model.pt) in bf16 in RUN/guard/ and fit the guard on the
    run's validation images; returns guard.json.

    `paths` restricts the validation images used (e.g. half of them, to measure coverage on the other half);
    `squares` gives the reference images directly (calibrate: validation plus a site's images)."""
    run = Path(run)
    if squares is None:
        val = pd.read_csv(run / "val_predictions.csv")
        squares = squares_for(data or run_data(run), val["path"] if paths is None else paths)
    names = [f"member-{i}.pt" for i in range(len(members))]
    sizes = [store_member(m, run, n) for m, n in zip(members, names)]
    scorer = Scorer.from_run(run, "cpu", gate=False)  # the stored members, without a guard yet
    scorer.members = [Scorer.from_run(run / GUARD_DIR, "cpu", n, gate=False) for n in names]
    start = time.perf_counter()
    scores, member_scores = scorer.scores(squares), scorer.member_scores(squares)
    features = scorer.features(squares) if density else None
    seconds = (time.perf_counter() - start) / max(1, len(squares))
    info = {"member_checkpoints": [str(Path(m).resolve()) for m in members], "stored_dtype": "bfloat16",
            "stored_members_bytes": int(sum(sizes)), "cpu_seconds_per_image_run_and_members": seconds,
            "fitted_on_images": int(len(squares))}
    guard = fit_guard(scores, member_scores, names, features, coverage, info)
    return json.loads(guard.save(run).read_text())


def store_member(checkpoint: str | Path, run_dir: str | Path, name: str) -> int:
    """Copy a member run's model.pt into RUN/guard/NAME with its weights in bf16 (half the size); returns bytes.

    Scoring loads them back into float32 (the model's own dtype), so members score in float32 like the run."""
    ckpt = load_checkpoint(checkpoint)
    ckpt = {"model": {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ckpt["model"].items()},
            "meta": ckpt["meta"]}
    path = Path(run_dir) / GUARD_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path.stat().st_size
