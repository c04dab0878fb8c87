"""ONNX / TorchScript export of the gray AlexNet: outputs match PyTorch, the batch axis is dynamic, run facts travel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from covidcxr.deploy.export import ExportParityError, check_parity, export_model, export_run
from covidcxr.model.network import build_model, save_checkpoint

SIZE = 64  # AlexNet's adaptive pooling accepts it; keeps inference quick on 2 cores


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("alexnet", 2, weights="none").eval()


def _probabilities(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(7).random((5, 1, SIZE, SIZE), dtype=np.float32)


def test_onnx_export_of_a_run(tmp_path: Path, batch: np.ndarray) -> None:
    model = _model(0)
    meta = {"classes": ["normal", "covid"], "positive_index": 1, "image_size": SIZE, "threshold": 0.37, "task": "t",
            "square": "pad", "cache_size": 64, "augment": {"equalize": "global", "crop": "none"}}
    save_checkpoint(tmp_path / "model.pt", model, meta)
    out = tmp_path / "deploy" / "model.onnx"
    result = export_run(tmp_path, "onnx", out)
    assert result["ok"] and result["max_abs_diff"] <= 1e-4 and result["size_bytes"] == out.stat().st_size
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    [got] = session.run(["probabilities"], {"image": batch})  # batch of 5: not the batch it was traced with
    np.testing.assert_allclose(got, _probabilities(model, batch), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    props = {p.key: json.loads(p.value) for p in onnx.load(out, load_external_data=False).metadata_props}
    assert props["classes"] == ["normal", "covid"] and props["threshold"] == 0.37 and props["arch"] == "alexnet"
    # a deployer must know the preprocessing that comes before the graph
    assert props["augment"]["equalize"] == "global" and (props["square"], props["cache_size"]) == ("pad", 64)
    with pytest.raises(ExportParityError, match="differ from PyTorch"):
        check_parity(_model(1), "onnx", out, SIZE)  # another model's weights: the check must notice


def test_torchscript_export(tmp_path: Path, batch: np.ndarray) -> None:
    model = _model(2)
    out = tmp_path / "model.pt"
    result = export_model(model, "torchscript", out, SIZE, {"classes": ["normal", "covid"]})
    assert result["ok"] and result["format"] == "torchscript"
    extra = {"meta.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["meta.json"]) == {"classes": ["normal", "covid"]}
    with torch.no_grad():
        got = loaded(torch.from_numpy(batch[:4])).numpy()
    np.testing.assert_allclose(got, _probabilities(model, batch[:4]), atol=1e-6)
    with pytest.raises(ExportParityError):
        check_parity(_model(3), "torchscript", out, SIZE)


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(_model(0), "tflite", tmp_path / "m", SIZE)
    assert not (tmp_path / "m").exists()
