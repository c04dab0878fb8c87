"""Fit a run's gate (covidcxr.trust.gate): a small CNN on 48 px thumbnails that tells a frontal chest radiograph from
a rotated or inverted film, a lateral view, another modality, a photograph or screenshot, a document, and a blank or
noise image.

Positives are the run's own training films, augmented (small rotations, scale, shifts, gamma, contrast, mirror
images: a mirrored film is still a frontal film, and a rotation's direction is where the head points, mirrored or
not). Rotated and inverted classes are the same films turned and inverted in the loop. The other kinds come from
covidcxr.trust.negatives. The acceptance threshold is set on the run's validation films, which the network never
saw, so that nearly all of them pass; it never rises above 0.5 (the network's own call).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from covidcxr.config import GateSettings, to_dict
from covidcxr.data.cache import ImageCache
from covidcxr.trust import negatives
from covidcxr.trust.gate import CLASSES, GATE_FILE, GATE_GRAPH, REASONS
from covidcxr.trust.negatives import THUMB, thumbnail

log = logging.getLogger(__name__)

MAX_FILMS = 20_000  # training films a gate is fitted on at most (a seeded sample beyond), a quarter as many validation
ACCEPT_QUANTILE = 0.005  # the threshold lets through all but this share of the run's validation films
TRANSFORMED = ("rotated_cw", "rotated_180", "rotated_ccw", "inverted")  # made from the frontal films in the loop
ROTATION = {"rotated_cw": -1, "rotated_180": 2, "rotated_ccw": 1}  # torch.rot90's k (positive: counter-clockwise)


def network(classes: int = len(CLASSES)) -> nn.Module:
    """Four conv blocks (48 -> 3 px) keep where things are (orientation) and a small head reads it."""
    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(block(1, 12), block(12, 24), block(24, 48), block(48, 48), nn.Flatten(),
                         nn.Linear(48 * (THUMB // 16) ** 2, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, classes))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random small rotation, scale and shift, mirror, gamma, contrast and brightness for (B, 1, G, G) in [0, 1]."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=g) - 0.5) * np.deg2rad(24)
    scale = 1 + (torch.rand(b, generator=g) - 0.5) * 0.3
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    shift = (torch.rand(b, 2, generator=g) - 0.5) * 0.16
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    rows = [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)]
    theta = torch.stack(rows, 1)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="border",
                      align_corners=False).clamp(0, 1)
    x = x ** torch.exp((torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.8)
    mean = x.mean((2, 3), keepdim=True)
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.5
    brightness = (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.2
    return ((x - mean) * contrast + mean + brightness).clamp(0, 1)


def make_class(kind: str, pools: dict[str, torch.Tensor], count: int, g: torch.Generator) -> torch.Tensor:
    """`count` augmented examples of one class, (count, 1, G, G)."""
    source = pools["frontal"] if kind in TRANSFORMED else pools[kind]
    x = augment(source[torch.randint(0, len(source), (count,), generator=g)][:, None], g)
    if kind in ROTATION:
        return torch.rot90(x, ROTATION[kind], (2, 3))
    return 1 - x if kind == "inverted" else x


def film_thumbs(data: str | Path, paths: pd.Series, limit: int, seed: int = 0) -> np.ndarray:
    """Thumbnails of (at most `limit`, a seeded sample of) an ingested data folder's films, by manifest path, read a
    chunk at a time: a gate needs thousands of films, not the whole of a large data set in memory."""
    cache = ImageCache(data)
    index = cache.manifest(columns=["path", "cache_index"]).set_index("path")["cache_index"]
    rows = index.loc[paths].to_numpy()
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    thumbs = [thumbnail(s) for i in range(0, len(rows), 1024) for s in cache.load(rows[i:i + 1024]).numpy()]
    return np.stack(thumbs) if thumbs else np.zeros((0, THUMB, THUMB), np.float32)


def negative_pools(train: np.ndarray, settings: GateSettings, seed: int = 0,
                   package_files: list[Path] | None = None) -> dict[str, np.ndarray]:
    """Every refusable kind the gate can be shown: made here, shipped by packages (`package_files`: a subset of
    them, e.g. to measure the gate on the others), or in `settings.negatives`."""
    rng = np.random.default_rng(seed)
    pools = {k: list(v) for k, v in negatives.package_pools(rng, files=package_files).items()}
    pools["document"] += [negatives.document(rng) for _ in range(150)]
    pools["blank_or_noise"] = [negatives.blank_or_noise(rng) for _ in range(300)]
    pools["photograph"] += [negatives.screenshot(train[i], rng) for i in rng.integers(0, len(train), 150)]
    if settings.negatives:
        for kind, thumbs in negatives.folder_pools(settings.negatives, seed=seed).items():
            pools.setdefault(kind, []).extend(thumbs)
    return {k: np.stack(v).astype(np.float32) for k, v in pools.items() if v}


def fit_network(pools: dict[str, np.ndarray], settings: GateSettings, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """Train the gate network; returns it (eval mode) and the classes it was shown."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    shown = [k for k in CLASSES if k in TRANSFORMED or k in pools]
    tensors = {k: torch.from_numpy(v) for k, v in pools.items()}
    model = network()
    optimizer = torch.optim.AdamW(model.parameters(), settings.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps)
    frontal = settings.batch_size // 4  # a quarter of every batch is upright films, the rest spread over the kinds
    others = [k for k in shown if k != "frontal"]
    model.train()
    for _ in range(settings.steps):
        picks = torch.randint(0, len(others), (settings.batch_size - frontal,), generator=g)
        counts = {"frontal": frontal, **{k: int((picks == i).sum()) for i, k in enumerate(others)}}
        x = torch.cat([make_class(k, tensors, n, g) for k, n in counts.items() if n])
        y = torch.cat([torch.full((n,), CLASSES.index(k)) for k, n in counts.items() if n])
        loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), shown


class _WithSoftmax(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(1)


def export_gate(model: nn.Module, out: Path) -> None:
    """The network as ONNX: input `thumbnails` (N, 1, G, G) float32 in [0, 1], output `probabilities` (N, classes)."""
    example = torch.zeros(2, 1, THUMB, THUMB)
    with warnings.catch_warnings():  # the exporter's notes are not news to the user
        warnings.filterwarnings("ignore", category=UserWarning)
        program = torch.onnx.export(_WithSoftmax(model).eval(), (example,), input_names=["thumbnails"],
                                    output_names=["probabilities"], verbose=False,
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    assert program is not None  # the torch.export-based exporter always returns its program
    program.save(str(out))


@torch.no_grad()
def frontal_probability(model: nn.Module, thumbs: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(thumbs)[:, None]).softmax(1)[:, 0].numpy() if len(thumbs) else np.zeros(0)


def build_gate(out: Path, pools: dict[str, np.ndarray], val: np.ndarray, settings: GateSettings,
               seed: int = 0) -> dict:
    """Fit the network on `pools` (a "frontal" pool and one per refusable kind), set the threshold on the frontal
    validation thumbnails `val`, and write OUT/gate.onnx + OUT/gate.json; returns gate.json's content."""
    start = time.perf_counter()
    model, shown = fit_network(pools, settings, seed)
    p_val = frontal_probability(model, val)
    threshold = float(min(0.5, np.quantile(p_val, ACCEPT_QUANTILE))) if len(p_val) else 0.5
    out.mkdir(parents=True, exist_ok=True)
    export_gate(model, out / GATE_GRAPH)
    missing = [k for k in CLASSES if k not in shown]
    accepted = float((p_val >= threshold).mean()) if len(p_val) else None
    info = {"classes": list(CLASSES), "reasons": REASONS, "threshold": threshold, "thumbnail": THUMB,
            "kinds_shown": shown, "kinds_not_shown": missing, "examples": {k: int(len(v)) for k, v in pools.items()},
            "validation_films": int(len(val)), "validation_accepted": accepted,
            "settings": {**to_dict(settings), "seed": seed}, "fit_seconds": round(time.perf_counter() - start, 1)}
    (out / GATE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log.info("gate fitted in %.0f s on %d films: accepts %s of %d validation films%s", info["fit_seconds"],
             len(pools["frontal"]), "-" if accepted is None else f"{100 * accepted:.1f} %", len(val),
             f"; never shown {', '.join(missing)} (give --gate-negatives)" if missing else "")
    return info


def fit_gate(run: str | Path, data: str | Path, settings: GateSettings | None = None, seed: int = 0) -> dict:
    """Fit RUN/gate.onnx + RUN/gate.json on the run's training films (split.csv) and the negatives; the threshold on
    its validation films. Returns gate.json's content."""
    settings, run = settings or GateSettings(), Path(run)
    split = pd.read_csv(run / "split.csv")
    train = film_thumbs(data, split.loc[split["split"] == "train", "path"], MAX_FILMS, seed)
    val = film_thumbs(data, split.loc[split["split"] == "val", "path"], MAX_FILMS // 4, seed)
    log.info("fitting the run's gate (%d steps) ...", settings.steps)
    return build_gate(run, {"frontal": train, **negative_pools(train, settings, seed)}, val, settings, seed)
