"""The HTTP service on a real tiny run: uploads, validation, limits, the prediction log, batching of concurrent
requests beside Grad-CAM ones, the access token, and `covidcxr serve`'s refusal to serve beyond loopback without one."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import CLI_TIMEOUT_S, Images, xray
from covidcxr.config import ServeConfig
from covidcxr.deploy.predict import Predictor
from covidcxr.deploy.serve.app import MULTIPART_SLACK_BYTES, create_app
from covidcxr.deploy.serve.log import PredictionLog
from covidcxr.model.cam import OVERLAY_MIN_SIDE
from servers import free_port, serve_cli, wait_until_up

LIMIT = 50_000
TOKEN = "s3cret-token-for-tests"


def _image_bytes(seed: int, fmt: str = "PNG", mode: str = "L") -> bytes:
    """A toy film (like those the tiny run's gate was fitted on, so it is scored), encoded; each seed its own."""
    buf = io.BytesIO()
    Image.fromarray((xray(np.random.default_rng(seed), seed % 2 == 0) * 255).astype(np.uint8)).convert(mode).save(
        buf, format=fmt)
    return buf.getvalue()


def _encoded(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _noise_png(side: int, seed: int = 0) -> bytes:
    """Incompressible content, so the file size grows with the side."""
    arr = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _direct(predictor: Predictor, data: bytes, name: str = "x.png") -> float:
    """The probability the predictor gives the file outside the service."""
    return predictor.predict_squares({name: predictor.read_bytes(data, name)})[0].probability


def _heatmap_side(data_url: str) -> tuple[int, int]:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):]))).size


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "log" / "predictions.sqlite"


@pytest.fixture
def client(predictor: Predictor, db: Path):
    with TestClient(create_app(predictor, ServeConfig(db=str(db), max_upload_bytes=LIMIT))) as c:
        yield c


def _post(client: TestClient, name: str, data: bytes, cam: bool = False):
    return client.post("/api/predict", params={"cam": cam}, files={"file": (name, data, "application/octet-stream")})


def test_png_upload_scores_logs_and_returns_heatmap(client: TestClient, predictor: Predictor, db: Path) -> None:
    data = _image_bytes(191)
    res = _post(client, "chest.png", data, cam=True)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["probability"] == pytest.approx(_direct(predictor, data), abs=1e-6)
    assert body["label"] == predictor.spec.label_for(body["probability"]) and body["threshold"] == predictor.threshold
    assert body["model_id"] == predictor.model_id and body["sha256"] == hashlib.sha256(data).hexdigest()
    width, height = _heatmap_side(body["heatmap"])
    assert width == height >= OVERLAY_MIN_SIDE
    [row] = PredictionLog(db).records()
    assert (row.sha256, row.filename, row.label, row.model_id) == (body["sha256"], "chest.png", body["label"],
                                                                   predictor.model_id)
    assert row.probability == pytest.approx(body["probability"]) and row.threshold == predictor.threshold
    assert row.time_utc.endswith("+00:00")


def test_jpeg_upload_without_cam(client: TestClient, predictor: Predictor, images) -> None:
    data = _encoded(xray(np.random.default_rng(5), True), "JPEG")
    res = _post(client, "chest.jpg", data)
    assert res.status_code == 200, res.text
    assert res.json()["probability"] == pytest.approx(_direct(predictor, data), abs=1e-6)
    assert res.json()["heatmap"] is None


def test_dicom_upload_is_decoded(client: TestClient, predictor: Predictor, images) -> None:
    data = images.dicom(None, np.rint(xray(np.random.default_rng(6), False) * 4095))
    res = _post(client, "chest.dcm", data)
    assert res.status_code == 200, res.text
    assert res.json()["probability"] == pytest.approx(_direct(predictor, data, "chest.dcm"), abs=1e-6)
    assert res.json()["probability"] != pytest.approx(_direct(predictor, _image_bytes(191)), abs=1e-6)


def test_dicom_without_pixels_is_422(client: TestClient, db: Path, images) -> None:
    res = _post(client, "empty.dcm", images.dicom(None, None))
    assert res.status_code == 422
    assert res.json()["detail"] == "empty.dcm: DICOM file has no pixel data"
    [row] = PredictionLog(db).records()  # logged as not scored, with the reason, for `monitor` to count
    assert (row.status, row.reason, row.probability, row.label) == ("unreadable", "DICOM file has no pixel data", None,
                                                                    None)  # the file name has its own column
    assert row.sop_uid and row.sop_uid.startswith("1.2.")


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
        ("huge.png", Images.png_claiming_size(12_000, 12_000), "too large"),  # over the reader's pixel limit
        ("bomb.png", Images.png_claiming_size(60_000, 60_000), "too large"),  # Pillow's decompression-bomb error
        ("cut.png", _image_bytes(100)[:-30], "truncated or corrupt"),
        ("zero.png", b"", "empty file"),
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # expected for the huge header
def test_decodable_but_unusable_is_422(client: TestClient, db: Path, name: str, data: bytes, message: str) -> None:
    res = _post(client, name, data)
    assert res.status_code == 422, res.text
    assert res.json()["detail"].startswith(f"{name}: ") and message in res.json()["detail"]
    logged = PredictionLog(db).records()  # an image that was read but cannot be scored is logged with its reason
    assert [(r.status, r.reason) for r in logged] == ([] if message == "empty file" or name == "bomb.png"
                                                      else [("unreadable", res.json()["detail"][len(name) + 2:])])


def test_upload_limit_is_exact_on_the_file(client: TestClient, db: Path) -> None:
    png = _image_bytes(128)
    at_limit = png + b"\0" * (LIMIT - len(png))  # decoders ignore bytes after the PNG's end
    assert _post(client, "ok.png", at_limit).status_code == 200
    res = _post(client, "big.png", at_limit + b"\0")
    assert res.status_code == 413 and res.json()["detail"] == f"big.png: file too large (limit {LIMIT:,} bytes)"
    assert len(PredictionLog(db).records()) == 1


def test_body_is_counted_while_streaming(predictor: Predictor, db: Path) -> None:
    """Chunked body, no Content-Length: the server must count bytes itself and stop reading soon after the limit."""
    app = create_app(predictor, ServeConfig(db=str(db), max_upload_bytes=LIMIT))
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


def test_health_page_and_docs(client: TestClient, predictor: Predictor) -> None:
    health = client.get("/api/health").json()
    shift = health.pop("shift")  # the stream's shift alarm: no batch full yet, so no verdict
    assert shift["alarm"] is False and shift["message"].startswith("no verdict")
    assert health.pop("monitor") == {"window": "7d", "current": None, "alert": None}  # nothing logged yet
    assert health == {
        "status": "ok",
        "engine": "torch",
        "model_id": predictor.model_id,
        "training": "gray alexnet trained from scratch (random initialisation, no transfer learning)",
        "positive_label": "covid",
        "negative_label": "normal",
        "threshold": predictor.threshold,
        "triage": None,
        "max_upload_bytes": LIMIT,
    }
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file-input"' in page.text and "not a diagnosis" in page.text
    assert "http" not in page.text.split("<script>")[1]  # no CDN, no remote scripts
    docs = client.get("/docs")
    assert docs.status_code == 200 and "https://" not in docs.text  # Swagger UI from local files (test_browser.py)
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/api/predict"]["post"]["responses"]
    assert {"200", "413", "415", "422"} <= set(responses)


def test_concurrent_requests_are_batched_and_answered_each_on_its_own(predictor: Predictor, db: Path, images) -> None:
    """16 different images from 8 threads, every third with Grad-CAM: each answer is its own image's score."""
    uploads = {f"img{i}.png": _encoded(xray(np.random.default_rng(100 + i), i % 2 == 0), "PNG") for i in range(16)}
    expected = {name: _direct(predictor, data) for name, data in uploads.items()}
    cams = {name for i, name in enumerate(uploads) if i % 3 == 0}
    cfg = ServeConfig(db=str(db), max_upload_bytes=LIMIT, max_wait_ms=50)  # a long wait: batches surely form
    app = create_app(predictor, cfg)
    with TestClient(app) as client:
        with ThreadPoolExecutor(8) as pool:
            responses = dict(zip(uploads, pool.map(lambda kv: _post(client, *kv, cam=kv[0] in cams), uploads.items())))
        stats = app.state.batcher.stats
    assert [r.status_code for r in responses.values()] == [200] * 16
    for name, res in responses.items():
        assert res.json()["probability"] == pytest.approx(expected[name], abs=1e-5), name
        assert (res.json()["heatmap"] is not None) == (name in cams), name
    # every request is scored in a batch (Grad-CAM requests too, their overlay drawn after): fewer passes than images
    assert stats.images == 16 and stats.passes < stats.images
    rows = PredictionLog(db).records()
    assert sorted((r.filename, r.sha256) for r in rows) == sorted(
        (name, hashlib.sha256(data).hexdigest()) for name, data in uploads.items()
    )


def test_token_is_required_and_never_logged(predictor: Predictor, db: Path) -> None:
    with TestClient(create_app(predictor, ServeConfig(db=str(db), max_upload_bytes=LIMIT), token=TOKEN)) as client:
        data = _image_bytes(90)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            res = client.post("/api/predict", files={"file": ("a.png", data)}, headers=headers)
            assert res.status_code == 401 and res.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in res.text
        assert client.get("/api/health").status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/api/health", headers=auth).status_code == 200
        res = client.post("/api/predict", files={"file": ("a.png", data)}, headers=auth)
        assert res.status_code == 200 and res.json()["probability"] == pytest.approx(_direct(predictor, data), abs=1e-6)
        assert client.get("/").status_code == 200 and client.get("/docs").status_code == 200  # no data in them
    assert len(PredictionLog(db).records()) == 1
    assert TOKEN.encode() not in b"".join(p.read_bytes() for p in db.parent.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "myhost.example"])
def test_serving_beyond_loopback_without_a_token_is_refused(tiny_run, tmp_path: Path, host: str) -> None:
    proc = serve_cli(str(tiny_run), "--host", host, "--db", str(tmp_path / "log.sqlite"))
    out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 2 and out == ""
    [line] = err.splitlines()
    assert line.startswith(f"covidcxr: error: --host {host} is reachable from other machines")
    assert "--token-file" in line
    assert not (tmp_path / "log.sqlite").exists()


def test_token_comes_from_the_file_then_the_environment_and_no_auth_lifts_the_refusal(tmp_path, monkeypatch) -> None:
    from covidcxr.deploy.serve.access import access_token

    monkeypatch.setenv("COVIDCXR_TOKEN", "from-env")
    (tmp_path / "token").write_text(" from-file \n")
    assert access_token("0.0.0.0", tmp_path / "token", no_auth=False) == "from-file"
    assert access_token("0.0.0.0", None, no_auth=False) == "from-env"
    monkeypatch.delenv("COVIDCXR_TOKEN")
    assert access_token("0.0.0.0", None, no_auth=True) is None
    assert access_token("::1", None, no_auth=False) is None and access_token("localhost", None, no_auth=False) is None


@pytest.mark.slow
def test_empty_token_file_is_refused(tiny_run, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    proc = serve_cli(str(tiny_run), "--host", "0.0.0.0", "--token-file", str(tmp_path / "token"))
    _, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 2 and err.strip() == f"covidcxr: error: --token-file {tmp_path / 'token'}: the file is " \
        "empty; put the access token in it"


@pytest.mark.slow
def test_a_busy_port_is_a_one_line_error(tiny_run, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = serve_cli(str(tiny_run), "--port", str(port), "--db", str(tmp_path / "log.sqlite"))
        _, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 2
    [line] = err.splitlines()
    assert line.startswith(f"covidcxr: error: 127.0.0.1:{port} is already in use") and "--port" in line


@pytest.mark.slow
def test_cli_server_with_a_token_file_answers_only_with_it(tiny_run, tmp_path: Path) -> None:
    """The real `covidcxr serve` process (loopback, token from a file): 401 without it, 200 with it; the token
    appears neither in the server's output nor in the prediction log, nor in the settings saved beside it."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    port, db = free_port(), tmp_path / "log.sqlite"
    proc = serve_cli(str(tiny_run), "--port", str(port), "--db", str(db), "--token-file", str(tmp_path / "token"),
                      "--threads", "1", "--access-log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc)
        data = _image_bytes(60)
        assert httpx.post(f"{url}/api/predict", files={"file": ("a.png", data)}).status_code == 401
        res = httpx.post(f"{url}/api/predict", files={"file": ("a.png", data)},
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        assert res.status_code == 200, res.text
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert "token required" in err and "POST /api/predict" in out + err  # --access-log: uvicorn's lines
    assert TOKEN not in out + err
    assert [r.filename for r in PredictionLog(db).records()] == ["a.png"]
    assert TOKEN.encode() not in b"".join(f.read_bytes() for f in tmp_path.glob("log.sqlite*"))
    settings = json.loads((tmp_path / "log.serve.json").read_text())
    assert settings["run"] == str(tiny_run) and settings["token_file"] == str(tmp_path / "token")
    assert settings["port"] == port and settings["access_log"] is True and TOKEN not in json.dumps(settings)


@pytest.mark.slow
def test_cli_server_prints_no_line_per_request_by_default(tiny_run, tmp_path: Path) -> None:
    """Without --access-log the service prints its start-up lines but none per request; the prediction is logged."""
    port, db = free_port(), tmp_path / "log.sqlite"
    proc = serve_cli(str(tiny_run), "--port", str(port), "--db", str(db), "--threads", "1")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc)
        res = httpx.post(f"{url}/api/predict", files={"file": ("b.png", _image_bytes(60))}, timeout=60)
        assert res.status_code == 200, res.text
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert "INFO serving" in err and "/api/" not in out + err
    assert [r.filename for r in PredictionLog(db).records()] == ["b.png"]


def test_a_run_with_triage_thresholds_answers_with_the_triage_class(tiny_run, db: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    p = _direct(Predictor.from_run(tiny_run), _image_bytes(7))
    (run / "triage.json").write_text(json.dumps({"rule_out_max": p - 0.01, "rule_in_min": p + 0.01}))
    with TestClient(create_app(Predictor.from_run(run), ServeConfig(db=str(db), max_upload_bytes=LIMIT))) as client:
        assert client.get("/api/health").json()["triage"]["rule_in_min"] == p + 0.01
        assert _post(client, "x.png", _image_bytes(7)).json()["triage"] == "needs a reader"
        page = client.get("/").text
        assert 'id="triage"' in page and "transfer-learning model" not in page
    (run / "triage.json").write_text(json.dumps({"rule_out_max": p, "rule_in_min": None}))
    with TestClient(create_app(Predictor.from_run(run), ServeConfig(db=str(db), max_upload_bytes=LIMIT))) as client:
        assert _post(client, "x.png", _image_bytes(7)).json()["triage"] == "rule-out"
