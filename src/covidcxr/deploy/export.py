"""Deployable copies of a run (ONNX, TorchScript) that do covidcxr's whole path, checked against covidcxr itself.

The exported graph takes `image`: float32 (1, 1, H, W) gray in [0, 1] at the decoded image's own size (H and W are
dynamic) and returns `probabilities`: (1, num_classes) softmax. Inside it is the run's `Preprocess` (square, resize
to the cache side, crop, equalization, resize to the model side, each rounded to gray levels as the cache is) and
the model, so onnxruntime and Pillow alone give `covidcxr predict`'s probability. Run facts (classes, positive class,
threshold, settings, the input contract) travel inside the file: ONNX metadata_props (each value JSON-encoded), or
TorchScript's extra file `meta.json`.

`serving` writes the service's engine folder instead (`covidcxr.deploy.engine`): the same steps split at the cache
square into two ONNX graphs, the second scoring a batch of cache squares.

ONNX uses torch's default (torch.export-based) exporter, which needs `onnxscript`. TorchScript scripts the
preprocessing (its shapes are data) around the traced model. CLAHE (kornia) and the lung crop (a U-Net with
connected-component clean-up) have no graph form here, so runs that use them are refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from covidcxr.deploy.engine import ENGINE_FILE, SCORE_GRAPH, OnnxScorer, fingerprint
from covidcxr.errors import ExportParityError, InputError
from covidcxr.preprocess.transform import Preprocess
from covidcxr.scoring import Scorer

FORMATS = ("onnx", "torchscript", "serving")
TOLERANCE = 1e-4  # on probabilities
PARITY_SHAPES = ((300, 200), (200, 333), (256, 256), (97, 131))  # portrait, landscape, square, odd sides
MAX_SIDE = 16384
CONTRACT = ("input `image`: float32 (1, 1, H, W), gray in [0, 1], at the decoded image's own size; "
            "output `probabilities`: float32 (1, {n}) in the order {classes}")


class ExportGraph(nn.Module):
    """Decoded gray image -> covidcxr's preprocessing -> model -> softmax probabilities."""

    def __init__(self, preprocess: Preprocess, model: nn.Module):
        super().__init__()
        self.preprocess, self.model = preprocess, model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(self.preprocess(image)), dim=1)


class ScoreGraph(nn.Module):
    """Cache squares (N, S, S) uint8 -> (N, 1) positive-class probabilities of the run, through its own
    preprocessing and folded network."""

    def __init__(self, scorer: Scorer):
        super().__init__()
        self.preprocess, self.net, self.positive = scorer.preprocess, scorer.net, scorer.spec.positive_index

    def forward(self, squares: torch.Tensor) -> torch.Tensor:
        levels = squares.unsqueeze(1).float()
        logits = self.net(self.preprocess.to_model(self.preprocess.normalise(levels)))
        return torch.softmax(logits, dim=1)[:, self.positive:self.positive + 1]


def export_run(run_dir: str | Path, fmt: str, out: str | Path,
               check_images: Sequence[np.ndarray] = ()) -> dict[str, Any]:
    """Export a run's best model with its whole preprocessing to `out`, then check it against the run's `Scorer` on
    images of several sizes and aspect ratios (`check_images`, decoded, plus synthetic ones).

    Returns {"format", "path", "size_bytes", "max_abs_diff", "contract"}; raises ExportParityError beyond TOLERANCE."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    scorer = Scorer.from_run(run_dir, "cpu", gate=False)
    _refuse_unexportable(scorer, run_dir)
    if fmt == "serving":
        return export_serving(scorer, Path(out), check_images)
    graph = ExportGraph(scorer.preprocess, scorer.model).eval()
    spec = scorer.spec
    contract = CONTRACT.format(n=len(spec.classes), classes=", ".join(spec.classes))
    meta = {"model_id": spec.model_id, "arch": spec.arch, "task": spec.task, "classes": list(spec.classes),
            "positive_index": spec.positive_index, "threshold": spec.threshold,
            "threshold_method": spec.threshold_method, "settings": {k: scorer.meta[k] for k in
                                                                     ("square", "cache_size", "image_size", "augment")},
            "contract": contract}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        (_export_onnx if fmt == "onnx" else _export_torchscript)(graph, out, meta)
    images = [*check_images, *synthetic_images()]
    diff = check_parity(scorer, fmt, out, images)
    return {"format": fmt, "path": str(out), "size_bytes": out.stat().st_size, "max_abs_diff": diff,
            "contract": contract}


def export_serving(scorer: Scorer, out: Path, check_images: Sequence[np.ndarray] = ()) -> dict[str, Any]:
    """The service's engine folder (`covidcxr.deploy.engine`): score.onnx and engine.json, written to a temporary
    folder that replaces `out` only once the engine (its numpy cache square included) matches the run's `Scorer`."""
    run_dir = scorer.spec.run_dir
    size = scorer.spec.preprocess.cache_size
    contract = (f"score.onnx: `squares` uint8 (N, {size}, {size}), cache squares -> `probabilities` "
                f"(N, 1): the {scorer.spec.positive_label} probability of the run")
    meta = {"square": scorer.meta.get("square", "pad"), "weights_used": scorer.meta.get("weights_used", ""),
            **{k: scorer.meta[k] for k in ("arch", "task", "classes", "positive_index", "threshold", "threshold_method",
                                           "cache_size", "image_size", "augment")}}
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # two servers may start at once
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    example = torch.randint(0, 256, (2, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        _onnx_program(ScoreGraph(scorer).eval(), example, "squares", ["probabilities"],
                      {0: batch}).save(tmp / SCORE_GRAPH, external_data=False)
    info = {"model_id": scorer.spec.model_id, "meta": meta, "fingerprint": fingerprint(run_dir),
            "contract": contract}
    (tmp / ENGINE_FILE).write_text(json.dumps(info, indent=1) + "\n")
    diff = check_engine_parity(scorer, OnnxScorer(tmp, run_dir), [*check_images, *synthetic_images()])
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"format": "serving", "path": str(out), "size_bytes": sum(f.stat().st_size for f in out.iterdir()),
            "max_abs_diff": diff, "contract": contract}


def _onnx_program(graph: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str],
                  dims: dict[int, Any]) -> Any:
    """torch.export-based ONNX program of `graph`, with the given dimensions of its one input dynamic."""
    with _quiet():
        return torch.onnx.export(graph, (example,), input_names=[input_name], output_names=output_names,
                                 dynamic_shapes={input_name: dims}, verbose=False)


def _side_dims() -> dict[int, Any]:
    """Height and width of a decoded image (1, 1, H, W): any size up to MAX_SIDE."""
    return {2: torch.export.Dim("height", min=8, max=MAX_SIDE), 3: torch.export.Dim("width", min=8, max=MAX_SIDE)}


def check_engine_parity(scorer: Scorer, engine: OnnxScorer, images: list[np.ndarray]) -> float:
    """Largest |engine - covidcxr| of the run's probabilities, on decoded images scored one at a time and as one
    batch, each through its own cache square (numpy in the engine, torch in covidcxr); raises ExportParityError above
    TOLERANCE."""
    ours = np.stack([engine.cache_square(image) for image in images])
    expected = scorer.scores(np.stack([scorer.cache_square(image) for image in images]))
    worst = float(np.abs(engine.scores(ours) - expected).max())
    one_by_one = np.concatenate([engine.scores(square[None]) for square in ours])
    worst = max(worst, float(np.abs(one_by_one - expected).max()))
    if worst > TOLERANCE:
        raise ExportParityError(f"{engine.spec.run_dir}: the serving engine differs from covidcxr by {worst:.3g} "
                                f"(max {TOLERANCE}); please report this as a bug")
    return worst


def _refuse_unexportable(scorer: Scorer, run_dir: str | Path) -> None:
    aug = scorer.spec.preprocess.augment
    if aug.crop == "lungs":
        raise InputError(f"{run_dir}: a lung-cropped run cannot be exported (its lung model has no graph form here); "
                         "score it with covidcxr predict or serve")
    if aug.equalize == "clahe":
        raise InputError(f"{run_dir}: a CLAHE run cannot be exported (kornia's CLAHE has no graph form here); "
                         "score it with covidcxr predict or serve")


def synthetic_images(seed: int = 0) -> list[np.ndarray]:
    """Smooth chest-like blobs with noise at PARITY_SHAPES: structure that a wrong pad, crop or resize would move."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in PARITY_SHAPES:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        blobs = sum(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02) for cx, cy in rng.uniform(0.2, 0.6, (3, 2)))
        images.append(np.clip(0.2 + 0.6 * blobs / blobs.max() + rng.normal(0, 0.05, (h, w)), 0, 1).astype(np.float32))
    return images


def _example(image_size: int) -> torch.Tensor:
    return torch.rand(1, 1, image_size + 37, image_size, generator=torch.Generator().manual_seed(0))


def _export_onnx(graph: ExportGraph, out: Path, meta: dict[str, Any]) -> None:
    program = _onnx_program(graph, _example(graph.preprocess.image_size), "image", ["probabilities"], _side_dims())
    program.model.metadata_props.update({key: json.dumps(value) for key, value in meta.items()})
    program.save(out, external_data=False)


def _export_torchscript(graph: ExportGraph, out: Path, meta: dict[str, Any]) -> None:
    size = graph.preprocess.image_size
    with _quiet():
        traced = torch.jit.trace(graph.model, torch.rand(1, 1, size, size))
        scripted = torch.jit.script(ExportGraph(graph.preprocess, traced))
        torch.jit.save(scripted, str(out), _extra_files={"meta.json": json.dumps(meta)})


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' progress lines and TorchScript's deprecation notice are not news to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit")
        warnings.filterwarnings("ignore", category=UserWarning)
        yield


def check_parity(scorer: Scorer, fmt: str, path: str | Path, images: list[np.ndarray]) -> float:
    """Largest |exported - covidcxr| probability over decoded images; raises ExportParityError above TOLERANCE."""
    run = runner(fmt, path)
    worst = 0.0
    for image in images:
        expected = scorer.probabilities(scorer.cache_square(image)[None])
        got = run(image[None, None].astype(np.float32))
        if got.shape != expected.shape:
            raise ExportParityError(f"{path}: output shape {got.shape}, expected {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > TOLERANCE:
        raise ExportParityError(f"{path}: exported probabilities differ from covidcxr's by {worst:.3g} "
                                f"(max {TOLERANCE}); please report this as a bug")
    return worst


def runner(fmt: str, path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """image (1, 1, H, W) float32 -> probabilities, with onnxruntime or TorchScript."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(["probabilities"], {"image": x})[0]
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run
