"""Score chest X-ray PNG/JPEG files with a model exported by `covidcxr export --format onnx`.

Stand-alone: onnxruntime, Pillow and numpy only, no covidcxr. The graph does covidcxr's preprocessing itself, so
this gives `covidcxr predict`'s probability. Usage: python onnx_client.py MODEL.onnx IMAGE [IMAGE ...]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def load_gray(path: str) -> np.ndarray:
    """(1, 1, H, W) float32 gray in [0, 1], as covidcxr reads a PNG/JPEG: EXIF orientation applied, colour to
    luminance, alpha composited on black, 16-bit scaled by its own range."""
    img = ImageOps.exif_transpose(Image.open(path))
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)
    elif img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        arr = (rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)) * rgba[..., 3]
    elif img.mode == "L":
        arr = np.asarray(img, dtype=np.float32) / 255.0
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    return arr.astype(np.float32)[None, None]


def main(model: str, images: list[str]) -> None:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    positive, threshold = meta["positive_index"], meta["threshold"]
    for path in images:
        probability = float(session.run(["probabilities"], {"image": load_gray(path)})[0][0, positive])
        negative = meta["classes"][0] if len(meta["classes"]) == 2 else "non-" + meta["classes"][positive]
        label = meta["classes"][positive] if probability >= threshold else negative
        print(json.dumps({"path": path, "probability": probability, "label": label, "threshold": threshold}))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    main(sys.argv[1], sys.argv[2:])
