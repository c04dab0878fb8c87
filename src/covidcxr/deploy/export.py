"""Deployable copies of a model (ONNX, TorchScript) that are checked against PyTorch before anyone relies on them.

The exported graph takes `image`: float32 (B, 1, H, W) gray in [0, 1] (the same input contract as the model) and
returns `probabilities`: (B, num_classes) softmax; the batch axis is dynamic. Run facts (classes, positive class,
threshold, image size, and the preprocessing that comes before the graph: square mode, cache size, equalization and
crop settings) travel inside the file: ONNX metadata_props (each value JSON-encoded), or TorchScript's
extra file `meta.json`.

ONNX uses torch's default (dynamo, torch.export-based) exporter, which needs `onnxscript`; it writes weights
inside the one .onnx file (a gray AlexNet is ~230 MB, far under protobuf's 2 GB limit).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from covidcxr.errors import ExportParityError, InputError

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # on probabilities
PARITY_BATCHES = (1, 3)  # neither is the export example's batch of 2, so the dynamic batch axis is exercised


class _Probabilities(nn.Module):
    """Model logits -> softmax probabilities, so a deployment needs nothing but the exported file."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image), dim=1)


def export_model(
    model: nn.Module, fmt: str, out: str | Path, image_size: int, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Export `model` (gray (B,1,H,W) in [0,1] -> logits; moved to the CPU, eval mode) as probabilities to `out`,
    then check parity.

    Returns {"format", "path", "size_bytes", "max_abs_diff", "ok"}; raises ExportParityError beyond TOLERANCE.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _Probabilities(model).to("cpu").eval()
    example = torch.rand(2, 1, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (_export_onnx if fmt == "onnx" else _export_torchscript)(wrapped, example, out, metadata or {})
    diff = check_parity(model, fmt, out, image_size)
    return {"format": fmt, "path": str(out), "size_bytes": out.stat().st_size, "max_abs_diff": diff, "ok": True}


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> dict[str, Any]:
    """Export a training run's best model at its own image size, with its classes and threshold inside."""
    from covidcxr.model.network import load_run

    model, meta = load_run(run_dir)
    # the preprocessing the caller must apply before the graph (covidcxr.preprocess.augment.normalise): square mode, cache size,
    # equalization and crop settings; a lung crop also needs the run's lungs.pt
    keep = ("arch", "task", "classes", "positive_index", "image_size", "threshold", "threshold_method", "square",
            "cache_size", "augment")
    return export_model(model, fmt, out, int(meta["image_size"]), {k: meta[k] for k in keep if k in meta})


def _export_onnx(wrapped: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, Any]) -> None:
    program = torch.onnx.export(
        wrapped,
        (example,),
        input_names=["image"],
        output_names=["probabilities"],
        dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    program.model.metadata_props.update({key: json.dumps(value) for key, value in meta.items()})
    program.save(out, external_data=False)


def _export_torchscript(wrapped: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, Any]) -> None:
    with _quiet_jit():
        torch.jit.save(torch.jit.trace(wrapped, example), str(out), _extra_files={"meta.json": json.dumps(meta)})


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript is the format asked for; torch's notice that its API is deprecated is not news to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit")
        yield


def check_parity(model: nn.Module, fmt: str, path: str | Path, image_size: int, seed: int = 1) -> float:
    """Largest |exported - softmax(model)| over random batches; raises ExportParityError above TOLERANCE."""
    wrapped = _Probabilities(model).to("cpu").eval()
    run = _onnx_runner(path) if fmt == "onnx" else _torchscript_runner(path)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in PARITY_BATCHES:
        x = torch.rand(batch, 1, image_size, image_size, generator=gen)
        with torch.no_grad():
            expected = wrapped(x).numpy()
        got = run(x.numpy())
        if got.shape != expected.shape:
            raise ExportParityError(f"{path}: output shape {got.shape}, expected {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > TOLERANCE:
        raise ExportParityError(f"{path}: exported probabilities differ from PyTorch by {worst:.3g} (max {TOLERANCE})")
    return worst


def _onnx_runner(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["probabilities"], {"image": x})[0]


def _torchscript_runner(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run
