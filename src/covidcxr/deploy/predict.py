"""Scoring images with a trained run: the same preprocessing as training's evaluation path, batched.

`Predictor` is what the CLI, the HTTP service and the shortcut diagnostics use, so a file is scored one way everywhere.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covidcxr.preprocess.augment import prepare_batch
from covidcxr.data.cache import to_square
from covidcxr.config import AugmentConfig, from_dict
from covidcxr.model.network import load_run
from covidcxr.data.reader import ImageReadError, read_image
from covidcxr.data.sources import IMAGE_SUFFIXES, file_problem, image_files


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(device: torch.device, amp: bool):
    """bf16 autocast where the hardware has bf16 matrix units (CUDA tensor cores, AVX512-BF16/AMX CPUs), with
    channels_last tensors: about twice the float32 speed of AlexNet on both, at no measurable cost in accuracy."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if (amp and bf16_supported(device)) else nullcontext()


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: torch.Tensor, augment: AugmentConfig, image_size: int,
                  device: torch.device, amp: bool = True, batch_size: int = 256) -> torch.Tensor:
    """Softmax probabilities (N, classes) for uint8 square images (N, S, S), evaluation preprocessing.

    A model already cast to bf16 (see `scoring_model`) gets bf16 input and is run as it is."""
    model.eval()
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    out = []
    for i in range(0, len(images), batch_size):
        x = prepare_batch(images[i:i + batch_size].to(device, non_blocking=True), False, augment, image_size)
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out.append(model(x).float().softmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def scoring_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model to score single files with: a bf16 copy where `predict_probs` would autocast to bf16, else itself.

    Autocast re-casts every weight on every call: for AlexNet's 57M parameters that is most of a single-image prediction
    on a CPU (92 ms -> 18 ms per 512 px PNG on one core, benchmarks/bench_predict.py). A copy cast once gives
    bit-identical scores (a bf16 conv/linear under autocast is a bf16 conv/linear), so a file is still scored exactly
    as `evaluate` scores its cached copy; it costs half the float32 model's memory again."""
    if not bf16_supported(device):
        return model
    return copy.deepcopy(model).to(torch.bfloat16).eval()


@dataclass
class Prediction:
    path: str
    probability: float | None
    label: str | None
    threshold: float
    error: str | None = None


class Predictor:
    """A run's best model, its preprocessing and its operating threshold, loaded once."""

    def __init__(self, model: torch.nn.Module, meta: dict, model_id: str, device: torch.device):
        self.model, self.meta, self.model_id, self.device = model, meta, model_id, device
        # self.model stays float32 for Grad-CAM's gradients; the scorer uses the precision the threshold was chosen in
        self.scorer = scoring_model(model, device) if meta.get("amp", True) else model
        self.augment = from_dict(AugmentConfig, meta["augment"])
        self.threshold = float(meta["threshold"])
        self.positive_index = int(meta["positive_index"])
        self.positive_label = meta["classes"][self.positive_index]
        self.negative_label = "non-" + self.positive_label if len(meta["classes"]) != 2 else meta["classes"][0]

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> "Predictor":
        run_dir = Path(run_dir)
        model, meta = load_run(run_dir, device=device)
        digest = hashlib.sha256((run_dir / "model.pt").read_bytes()).hexdigest()[:8]
        return cls(model, meta, f"{run_dir.resolve().name}-{digest}", torch.device(device))

    def preprocess(self, img: np.ndarray) -> np.ndarray:
        return to_square(img, int(self.meta["cache_size"]), self.meta.get("square", "pad"))

    def probabilities(self, squares: list[np.ndarray]) -> np.ndarray:
        """Positive-class probability for uint8 squares (already preprocessed)."""
        batch = torch.from_numpy(np.stack(squares))
        probs = predict_probs(self.scorer, batch, self.augment, int(self.meta["image_size"]), self.device, amp=False)
        return probs[:, self.positive_index].numpy()

    def model_input(self, square: np.ndarray) -> torch.Tensor:
        """(1, 1, H, W) float tensor: exactly what the model sees for one image."""
        return prepare_batch(torch.from_numpy(np.array(square))[None].to(self.device), False, self.augment, int(self.meta["image_size"]))

    def label_for(self, probability: float) -> str:
        return self.positive_label if probability >= self.threshold else self.negative_label

    def predict_paths(self, paths: list[Path], batch_size: int = 32) -> list[Prediction]:
        """Score files in batches; an unreadable file gets its own Prediction with the reason, the others go on."""
        results: list[Prediction] = []
        for start in range(0, len(paths), batch_size):
            chunk, squares, ok = paths[start:start + batch_size], [], []
            for path in chunk:
                try:
                    squares.append(self.preprocess(read_image(path)))
                    ok.append(path)
                except ImageReadError as exc:
                    results.append(Prediction(str(path), None, None, self.threshold, exc.reason))
            for path, p in zip(ok, self.probabilities(squares) if squares else []):
                results.append(Prediction(str(path), float(p), self.label_for(float(p)), self.threshold))
        order = {str(p): i for i, p in enumerate(paths)}
        return sorted(results, key=lambda r: order[r.path])

    def predict_bytes(self, data: bytes, filename: str, cam: bool = False) -> dict:
        """One uploaded file -> result dict for the HTTP service (raises ImageReadError for bad content)."""
        square = self.preprocess(read_image(data, name=filename))
        probability = float(self.probabilities([square])[0])
        heatmap = None
        if cam:
            from covidcxr.model.cam import cam_overlay_png
            heatmap = cam_overlay_png(self, square)
        return {"probability": probability, "label": self.label_for(probability), "threshold": self.threshold,
                "heatmap_png": heatmap}


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[Prediction]]:
    """Files as given plus image files found in folders (recursively); missing inputs, broken links, folders that
    cannot be read and folders without image files become error rows, so every input shows up in the output."""
    paths, errors = [], []
    for item in inputs:
        p = Path(item)
        found = image_files(p) if p.is_dir() else [p]
        if not found:
            errors.append(Prediction(str(p), None, None, float("nan"),
                                     f"folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"))
        for path in found:
            problem = file_problem(path)
            if problem:
                errors.append(Prediction(str(path), None, None, float("nan"), problem))
            else:
                paths.append(path)
    return paths, errors


def format_predictions(results: list[Prediction], fmt: str) -> str:
    rows = [r.__dict__ for r in results]
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    width = max([len(r.path) for r in results] + [4])
    lines = [f"{'file':<{width}}  {'P(covid)':>8}  {'label':<10} threshold"]
    for r in results:
        if r.error:
            lines.append(f"{r.path:<{width}}  {'-':>8}  {'ERROR':<10} {r.error}")
        else:
            lines.append(f"{r.path:<{width}}  {r.probability:>8.3f}  {r.label:<10} {r.threshold:.3f}")
    return "\n".join(lines)


def run_predict(run: str, inputs: list[str], fmt: str = "table", cam_dir: str | None = None, batch_size: int = 32) -> int:
    """`covidcxr predict`: prints one line per file; exit code 1 when any file could not be scored."""
    predictor = Predictor.from_run(run)
    paths, missing = expand_inputs(inputs)
    results = predictor.predict_paths(paths, batch_size) + missing
    for r in results:
        r.threshold = predictor.threshold
    print(format_predictions(results, fmt))
    if cam_dir:
        from covidcxr.model.cam import write_cams
        write_cams(predictor, [Path(r.path) for r in results if r.error is None], Path(cam_dir))
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"covidcxr: cannot score {r.path}: {r.error}", file=sys.stderr)
    return 1 if failed else 0
