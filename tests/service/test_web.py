"""The analysis page in a real browser (Debian chromium driven by Playwright) against the real server."""
from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    blocked = []
    # the page must not need anything outside the server (offline machine, no CDN)
    pg.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
             or route.request.url.startswith("data:") else (blocked.append(route.request.url), route.abort()))
    pg.goto(server.url + "/")
    yield pg
    ctx.close()
    assert not blocked, f"the page asked for external resources: {blocked}"


def enter_token(page):
    from svckit import TOKEN

    if not page.locator("#auth").evaluate("d => d.open"):
        page.click("#auth summary")
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")


def wait_report(page):
    page.wait_for_selector("#report:not([hidden])", timeout=30_000)


def test_upload_xray_shows_report(page, files, server, api):
    enter_token(page)
    page.set_input_files("#file", str(files["xray"]))
    wait_report(page)
    expected = api.post("/predict", files={"image": ("x.png", files["xray"].read_bytes(), "image/png")}).json()
    assert page.text_content("#label") == expected["label"]
    rows = page.locator("#probs tbody tr")
    assert rows.count() == 3
    table = {rows.nth(i).locator("td").nth(0).text_content(): float(rows.nth(i).locator("td").nth(1).text_content())
             for i in range(3)}
    assert set(table) == set(expected["probabilities"])
    for cls, p in expected["probabilities"].items():
        assert table[cls] == pytest.approx(100 * p, abs=0.01)
    for img in ("#xray", "#heatmap"):
        assert page.locator(img).evaluate("i => i.complete && i.naturalWidth > 0"), img
        assert page.get_attribute(img, "src").startswith("data:image/png;base64,")
    assert expected["verdict"] == "ok"
    assert page.is_hidden("#refer") and page.is_visible("#label-box")
    assert page.is_hidden("#error")
    assert "not for diagnostic use" in page.text_content("body").lower()
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('covid_cxr')")
    assert server.model in page.text_content("#model-info")


def test_non_image_shows_error(page, files):
    enter_token(page)
    page.set_input_files("#file", str(files["text"]))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    msg = page.text_content("#error")
    assert "notes.txt" in msg and "not a readable image" in msg
    assert page.is_hidden("#report")


@pytest.mark.parametrize("name,words", [("ood", "unlike the films the model was trained on"),
                                        ("colour_photo", "does not look like a chest X-ray")])
def test_refer_leads_and_the_label_is_not_the_answer(page, files, name, words):
    enter_token(page)
    page.set_input_files("#file", str(files[name]))
    wait_report(page)
    assert page.is_visible("#refer")
    assert words in page.text_content("#refer-msg")
    assert page.is_hidden("#label-box")                  # no "Predicted Label" for a referred film
    assert "not an answer" in page.text_content("#refer-label")
    # the refer banner comes before the report's cards
    assert page.evaluate("document.querySelector('#report').firstElementChild.id") == "refer"


def test_drag_and_drop(page, files):
    enter_token(page)
    data = list(files["xray"].read_bytes())
    dt = page.evaluate_handle(
        """([bytes, name]) => { const dt = new DataTransfer();
             dt.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/png'})); return dt; }""",
        [data, files["xray"].name])
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dt})
    wait_report(page)
    assert page.text_content("#label") in ("COVID", "Normal", "Viral Pneumonia")


def test_without_token_the_page_asks_for_it(page, files):
    page.set_input_files("#file", str(files["xray"]))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "API token" in page.text_content("#error")
    assert page.locator("#auth").evaluate("d => d.open")
