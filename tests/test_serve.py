"""The HTTP service: uploads, validation, limits, the prediction log and concurrency, with a stand-in predictor."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from covidcxr.data.reader import read_image
from covidcxr.deploy.serve import create_app
from covidcxr.deploy.serve.app import MULTIPART_SLACK_BYTES
from covidcxr.deploy.serve.log import PredictionLog

LIMIT = 50_000


class MeanPredictor:
    """Scores an image by its mean gray level; records how many calls overlap, to check the service's lock."""

    model_id = "fake-mean"
    threshold = 0.5
    positive_label = "covid"

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.active = 0
        self.max_active = 0
        self._count_lock = threading.Lock()

    def predict_bytes(self, data: bytes, filename: str, cam: bool) -> dict:
        with self._count_lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            gray = read_image(data, filename)
            time.sleep(self.delay_s)
            prob = float(gray.mean())
            return {
                "probability": prob,
                "label": "covid" if prob >= self.threshold else "normal",
                "threshold": self.threshold,
                "heatmap_png": _png(1.0 - gray) if cam else None,
            }
        finally:
            with self._count_lock:
                self.active -= 1


def _png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((gray * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_bytes(value: int, fmt: str = "PNG", size: int = 32, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value,) * 3).save(buf, format=fmt)
    return buf.getvalue()


def _noise_png(side: int, seed: int = 0) -> bytes:
    """Incompressible content, so the file size grows with the side."""
    arr = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid PNG header saying width x height, with one tiny data chunk: decodable header, absurd size."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def predictor() -> MeanPredictor:
    return MeanPredictor()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "log" / "predictions.sqlite"


@pytest.fixture
def client(predictor: MeanPredictor, db: Path):
    with TestClient(create_app(predictor, db, max_upload_bytes=LIMIT)) as c:
        yield c


def _post(client: TestClient, name: str, data: bytes, cam: bool = False):
    return client.post("/api/predict", params={"cam": cam}, files={"file": (name, data, "application/octet-stream")})


def test_png_upload_scores_logs_and_returns_heatmap(client: TestClient, db: Path) -> None:
    data = _image_bytes(191)
    res = _post(client, "chest.png", data, cam=True)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["probability"] == pytest.approx(191 / 255, abs=1e-6)
    assert body["label"] == "covid" and body["threshold"] == 0.5 and body["model_id"] == "fake-mean"
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    prefix = "data:image/png;base64,"
    assert body["heatmap"].startswith(prefix)
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["heatmap"][len(prefix):]))))
    assert heat.shape == (32, 32) and int(heat[0, 0]) == 255 - 191
    [row] = PredictionLog(db).records()
    assert (row.sha256, row.filename, row.label, row.model_id) == (body["sha256"], "chest.png", "covid", "fake-mean")
    assert row.probability == pytest.approx(body["probability"]) and row.threshold == 0.5
    assert row.time_utc.endswith("+00:00")


def test_jpeg_upload_without_cam(client: TestClient) -> None:
    res = _post(client, "chest.jpg", _image_bytes(40, fmt="JPEG", mode="RGB"))
    assert res.status_code == 200, res.text
    assert res.json()["probability"] == pytest.approx(40 / 255, abs=2 / 255)
    assert res.json()["label"] == "normal" and res.json()["heatmap"] is None


def test_dicom_upload_is_decoded(client: TestClient, images) -> None:
    pixels = np.zeros((16, 16), dtype=np.uint16)
    pixels[:, 8:] = 4000  # right half bright: mean gray exactly 0.5 after the reader's min-max scaling
    res = _post(client, "chest.dcm", images.dicom(None, pixels))
    assert res.status_code == 200, res.text
    assert res.json()["probability"] == pytest.approx(0.5)


def test_dicom_without_pixels_is_422(client: TestClient, db: Path, images) -> None:
    res = _post(client, "empty.dcm", images.dicom(None, None))
    assert res.status_code == 422
    assert res.json()["detail"] == "empty.dcm: DICOM file has no pixel data"
    assert PredictionLog(db).records() == []


def test_content_not_name_decides(client: TestClient, db: Path) -> None:
    res = _post(client, "notes.png", b"these are my notes, not an image\n" * 10)
    assert res.status_code == 415
    assert res.json()["detail"].startswith("notes.png: not a supported image")
    assert _post(client, "anim.png", _image_bytes(100, fmt="GIF")).status_code == 415  # an image, not an accepted one
    assert _post(client, "scan.txt", _image_bytes(100)).status_code == 200  # a real PNG under any name
    assert len(PredictionLog(db).records()) == 1


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("huge.png", _png_claiming_size(12_000, 12_000), "too large"),  # over the reader's pixel limit
        ("bomb.png", _png_claiming_size(60_000, 60_000), "too large"),  # Pillow's decompression-bomb error
        ("cut.png", _image_bytes(100)[:-30], "truncated or corrupt"),
        ("zero.png", b"", "empty file"),
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # expected for the huge header
def test_decodable_but_unusable_is_422(client: TestClient, db: Path, name: str, data: bytes, message: str) -> None:
    res = _post(client, name, data)
    assert res.status_code == 422, res.text
    assert res.json()["detail"].startswith(f"{name}: ") and message in res.json()["detail"]
    assert PredictionLog(db).records() == []


def test_upload_limit_is_exact_on_the_file(client: TestClient, db: Path) -> None:
    png = _image_bytes(128)
    at_limit = png + b"\0" * (LIMIT - len(png))  # decoders ignore bytes after the PNG's end
    assert _post(client, "ok.png", at_limit).status_code == 200
    res = _post(client, "big.png", at_limit + b"\0")
    assert res.status_code == 413 and res.json()["detail"] == f"big.png: file too large (limit {LIMIT:,} bytes)"
    assert len(PredictionLog(db).records()) == 1


def test_body_is_counted_while_streaming(predictor: MeanPredictor, db: Path) -> None:
    """Chunked body, no Content-Length: the server must count bytes itself and stop reading soon after the limit."""
    app = create_app(predictor, db, max_upload_bytes=LIMIT)
    head = b'--xx\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
    chunk, most = b"\0" * 4096, 1000  # the client would send 4 MB, far over the limit
    pulled, sent = 0, []

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        if pulled > most:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": head if pulled == 1 else chunk, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"content-type", b"multipart/form-data; boundary=xx"), (b"host", b"test")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/predict", "raw_path": b"/api/predict", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("test", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert (pulled - 2) * len(chunk) <= LIMIT + MULTIPART_SLACK_BYTES
    assert PredictionLog(db).records() == []


def test_missing_field_is_422(client: TestClient) -> None:
    res = client.post("/api/predict", files={"image": ("x.png", _image_bytes(1), "image/png")})
    assert res.status_code == 422
    assert res.json()["detail"][0]["loc"] == ["body", "file"]


def test_health_page_and_docs(client: TestClient) -> None:
    health = client.get("/api/health").json()
    assert health == {
        "status": "ok",
        "model_id": "fake-mean",
        "positive_label": "covid",
        "threshold": 0.5,
        "max_upload_bytes": LIMIT,
    }
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file-input"' in page.text and "not a diagnosis" in page.text
    assert "http" not in page.text.split("<script>")[1]  # no CDN, no remote scripts
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/api/predict"]["post"]["responses"]
    assert {"200", "413", "415", "422"} <= set(responses)


def test_concurrent_requests_all_succeed_and_are_logged(db: Path) -> None:
    predictor = MeanPredictor(delay_s=0.01)
    uploads = {f"img{i}.png": _image_bytes(10 * i) for i in range(16)}
    with TestClient(create_app(predictor, db, max_upload_bytes=LIMIT)) as client:
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda item: _post(client, *item), uploads.items()))
    assert [r.status_code for r in responses] == [200] * 16
    assert [r.json()["probability"] for r in responses] == pytest.approx([10 * i / 255 for i in range(16)])
    rows = PredictionLog(db).records()
    assert sorted((r.filename, r.sha256) for r in rows) == sorted(
        (name, hashlib.sha256(data).hexdigest()) for name, data in uploads.items()
    )
    assert predictor.max_active == 1  # the service serialises inference
