"""The web page and the OpenAPI docs in a real headless Chromium: upload a PNG, see the probability and the Grad-CAM
overlay; open /docs with every request outside the server blocked and recorded (none may happen).

Needs the system Chromium (`apt-get install -y chromium`) and Playwright's Python client (`pip install playwright`;
no `playwright install`: the system browser is used). Skipped with a message when either is missing, except under
CI=true, where a missing browser fails the test: there it must be installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from covidcxr.config import ServeConfig
from covidcxr.deploy.predict import Predictor
from covidcxr.deploy.serve.app import create_app
from covidcxr.deploy.serve.log import PredictionLog
from covidcxr.model.cam import OVERLAY_MIN_SIDE
from covidcxr.trust.gate import REASONS
from servers import background_server, bench_serve

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # a real server and a headless Chromium

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TOKEN = "browser-test-token"


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if importlib.util.find_spec("playwright") is None:
    _missing("Playwright's Python client is not installed (pip install playwright)")
if not Path(CHROMIUM).exists():
    _missing(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
from playwright import sync_api  # noqa: E402 - only once it is known to be there


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.from_run(bench_serve().write_random_run(tmp_path_factory.mktemp("run") / "run"))


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _only_loopback(page, base_url: str) -> list[str]:
    """Abort and record every request that does not go to the server under test."""
    outside: list[str] = []

    def route(r) -> None:
        if r.request.url.startswith(base_url) or r.request.url.startswith("data:"):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return outside


def test_upload_shows_probability_and_heatmap(predictor, browser, tmp_path: Path) -> None:
    bench = bench_serve()
    (tmp_path / "chest.png").write_bytes(bench.chest_like_png(384))
    (tmp_path / "notes.png").write_text("not an image\n")
    Image.new("L", (300, 300), 128).save(tmp_path / "blank.png")
    with background_server(create_app(predictor, ServeConfig(db=str(tmp_path / "log.sqlite")))) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        outside = _only_loopback(page, url)
        page.goto(url)
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

        page.set_input_files("#file-input", str(tmp_path / "blank.png"))  # the gate's refusal, in its own words
        sync_api.expect(page.locator("#error")).to_have_text(f"blank.png: refused: {REASONS['blank_or_noise']}")
        sync_api.expect(page.locator("#result")).to_be_hidden()
    records = PredictionLog(tmp_path / "log.sqlite").records()  # the refusal is logged with its reason
    assert [r.status for r in records] == ["scored", "refused"] and REASONS["blank_or_noise"] in str(records[1].reason)
    assert outside == []


def test_docs_render_offline(predictor, browser, tmp_path: Path) -> None:
    with background_server(create_app(predictor, ServeConfig(db=str(tmp_path / "log.sqlite")))) as url:
        page = browser.new_page()
        outside = _only_loopback(page, url)
        page.goto(f"{url}/docs")
        operation = page.locator("#operations-default-predict_api_predict_post")
        sync_api.expect(operation).to_be_visible(timeout=30_000)  # Swagger UI ran and rendered the API from the spec
        sync_api.expect(page.locator(".info .title")).to_contain_text("covidcxr")
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
    assert outside == []


def test_page_asks_for_the_token_and_then_scores(predictor, browser, tmp_path: Path) -> None:
    (tmp_path / "chest.png").write_bytes(bench_serve().chest_like_png(256))
    with background_server(create_app(predictor, ServeConfig(db=str(tmp_path / "log.sqlite")), token=TOKEN)) as url:
        page = browser.new_page()
        page.goto(url)
        sync_api.expect(page.locator("#model")).to_have_text("access token required")
        page.fill("#token", TOKEN)
        page.click("#token-box button")
        sync_api.expect(page.locator("#model")).to_contain_text("threshold 0.500")
        sync_api.expect(page.locator("#token-box")).to_be_hidden()
        page.set_input_files("#file-input", str(tmp_path / "chest.png"))
        sync_api.expect(page.locator("#result")).to_be_visible(timeout=30_000)
    assert len(PredictionLog(tmp_path / "log.sqlite").records()) == 1


def test_a_reader_confirms_or_corrects_in_one_click(predictor, browser, tmp_path: Path) -> None:
    """After the answer, one click records the reader's verdict (agree: the model's label; disagree: the other);
    clicking again keeps both, the latest counting; the current window on the page counts the verdict."""
    (tmp_path / "chest.png").write_bytes(bench_serve().chest_like_png(256))
    db = tmp_path / "log.sqlite"
    with background_server(create_app(predictor, ServeConfig(db=str(db)))) as url:
        page = browser.new_page()
        outside = _only_loopback(page, url)
        page.goto(url)
        sync_api.expect(page.locator("#model")).to_contain_text("threshold 0.500")
        page.set_input_files("#file-input", str(tmp_path / "chest.png"))
        sync_api.expect(page.locator("#result")).to_be_visible(timeout=30_000)
        [row] = PredictionLog(db).records()
        other = "normal" if row.label == "covid" else "covid"
        sync_api.expect(page.locator("#confirm")).to_have_text(f"Agree: {row.label}")
        sync_api.expect(page.locator("#correct")).to_have_text(f"Disagree: {other}")
        page.fill("#reader", "dr page")
        page.fill("#comment", "faint opacity")
        page.click("#correct")
        sync_api.expect(page.locator("#verdict-status")).to_have_text(f"Recorded: {other}. Thank you.")
        sync_api.expect(page.locator("#monitor-line")).to_contain_text("readers agreed on 0 % of 1 verdicts")
        page.click("#confirm")
        sync_api.expect(page.locator("#verdict-status")).to_contain_text(f"Recorded: {row.label} (replaces")
    history = PredictionLog(db).verdicts(1)
    assert [(v["label"], v["reader"], v["comment"]) for v in history] == [(other, "dr page", "faint opacity"),
                                                                          (row.label, "dr page", None)]
    assert outside == []
