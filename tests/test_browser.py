"""The web page in a real headless Chromium: upload a PNG, see the probability and the Grad-CAM overlay.

Needs the system Chromium (`apt-get install -y chromium`) and Playwright's Python client (`pip install playwright`;
no `playwright install`: the system browser is used). Skipped with a message when either is missing.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

from covidcxr.model.cam import OVERLAY_MIN_SIDE

from covidcxr.deploy.serve import background_server, create_app
from covidcxr.deploy.serve.log import PredictionLog

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python client is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)


def _bench_helpers():
    """The benchmark's random-run and test-image makers, so tests and benchmark serve the same thing."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def page_url(tmp_path: Path):
    from covidcxr.deploy.predict import Predictor

    bench = _bench_helpers()
    predictor = Predictor.from_run(bench.write_random_run(tmp_path / "run"))
    (tmp_path / "chest.png").write_bytes(bench.chest_like_png(384))
    (tmp_path / "notes.png").write_text("not an image\n")
    with background_server(create_app(predictor, tmp_path / "log.sqlite")) as url:
        yield url


def test_upload_shows_probability_and_heatmap(page_url: str, tmp_path: Path) -> None:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(page_url)
            sync_api.expect(page.locator("#model")).to_contain_text("threshold 0.500")
            page.set_input_files("#file-input", str(tmp_path / "chest.png"))
            sync_api.expect(page.locator("#result")).to_be_visible(timeout=30_000)
            [row] = PredictionLog(tmp_path / "log.sqlite").records()
            sync_api.expect(page.locator("#probability")).to_have_text(f"{100 * row.probability:.1f} %")
            sync_api.expect(page.locator("#label")).to_have_text(row.label)
            heatmap = page.locator("#heatmap")
            sync_api.expect(heatmap).to_be_visible()
            assert re.match(r"data:image/png;base64,", heatmap.get_attribute("src"))
            assert page.evaluate("document.getElementById('heatmap').naturalWidth") >= OVERLAY_MIN_SIDE  # enlarged overlay
            page.screenshot(path=str(tmp_path / "page-result.png"), full_page=True)

            page.set_input_files("#file-input", str(tmp_path / "notes.png"))
            sync_api.expect(page.locator("#error")).to_have_text(re.compile(r"^notes\.png: not a supported image"))
            sync_api.expect(page.locator("#result")).to_be_hidden()
            page.screenshot(path=str(tmp_path / "page-error.png"), full_page=True)
        finally:
            browser.close()
    assert len(PredictionLog(tmp_path / "log.sqlite").records()) == 1
