"""The page with the pipeline's own trained model (after README command 1): refer vs label.

Slow: it needs `artifacts/model` from `dvc repro` and `external/` from `dvc pull`
(`bash .ci/test -m slow`). It fails, rather than skips, when they are missing.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from svckit import VENV_BIN, free_port

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


@pytest.fixture(scope="module")
def real_server():
    model = REPO / "artifacts" / "model"
    if not (model / "model.json").exists() or not (REPO / "external" / "labels.csv").exists():
        pytest.fail("needs the trained model and external/: run README command 1 (bash .ci/pipeline) first")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVID_CXR_")}
    env.update({"BENTOML_DO_NOT_TRACK": "true", "COVID_CXR_PREDICTION_LOG": "off"})
    proc = subprocess.Popen([str(VENV_BIN / "covid-cxr"), "serve", "--port", str(port), "--model-dir", str(model)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, "the server exited"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server was not ready within 180 s"
        time.sleep(0.5)
    yield url, REPO
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(real_server):
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    url, _ = real_server
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = b.new_page(viewport={"width": 1280, "height": 900})
        pg.goto(url + "/")
        yield pg
        b.close()


def _post(url, path, mime="image/png"):
    return httpx.post(url + "/predict", files={"image": (path.name, path.read_bytes(), mime)}, timeout=60)


def _verdict(url, path):
    return _post(url, path).json()


def test_unseen_hospital_film_shows_the_refer_message(real_server, page):
    url, repo = real_server
    films = sorted((repo / "external" / "unseen_hospital_normal").glob("*.png"))
    answers = ((f, _verdict(url, f)) for f in films[:60])
    referred, answer = next(((f, a) for f, a in answers if a["verdict"] == "refer"), (None, None))
    assert referred is not None, "the model referred none of the first 60 unseen-hospital films"
    page.set_input_files("#file", str(referred))
    page.wait_for_selector("#report:not([hidden])", timeout=60_000)
    assert page.is_visible("#refer") and page.is_hidden("#label-box")
    assert answer["message"][:40].lower() in page.text_content("#refer-msg").lower()


def test_normal_test_film_shows_its_label(real_server, page):
    url, repo = real_server
    df = pd.read_csv(repo / "artifacts" / "data" / "manifest.csv")
    normals = [repo / p for p in df[(df["split"] == "test") & (df["label"] == "Normal")]["path"][:20]]
    answers = {f: _verdict(url, f) for f in normals}
    assert sum(a["label"] == "Normal" and a["verdict"] == "ok" for a in answers.values()) >= 15  # the model, too
    ok = next(f for f, a in answers.items() if a["label"] == "Normal" and a["verdict"] == "ok")
    page.set_input_files("#file", str(ok))
    page.wait_for_function("document.querySelector('#label').textContent.length > 0", timeout=60_000)
    assert page.is_hidden("#refer")
    assert page.text_content("#label") == "Normal"


@pytest.mark.parametrize("name", ["colour_photo", "grey_photo", "blank_frame"])
def test_pictures_that_are_not_xrays_are_referred_by_the_pipeline_model(real_server, tmp_path, name):
    """The must-show with the real thresholds: a photograph (colour or greyscale) or a blank frame is never `ok`."""
    import svcfiles

    url, _ = real_server
    suffix, mime = (".jpg", "image/jpeg") if name == "colour_photo" else (".png", "image/png")
    path = getattr(svcfiles, name)(tmp_path / f"{name}{suffix}")
    r = _post(url, path, mime)
    if r.status_code == 200:
        assert r.json()["verdict"] == "refer", r.json()
    else:
        assert 400 <= r.status_code < 500 and "error" in r.json(), r.text


def test_a_ct_slice_shows_the_refer_message(real_server, page, tmp_path):
    """Other medical images are referred: a CT slice saved as PNG, as a user would export it (the head CT
    of stage `negatives`, soft-tissue window), shows the refer message, not a label."""
    url, repo = real_server
    heads = sorted((repo / "artifacts" / "negatives" / "medical").glob("ct-head-*.png"))
    if not heads:
        pytest.fail("needs artifacts/negatives: run `dvc repro negatives`")
    ct = heads[0]
    answer = _verdict(url, ct)
    assert answer["verdict"] == "refer" and answer["reason"] == "not_a_chest_film", answer
    page.set_input_files("#file", str(ct))
    page.wait_for_selector("#report:not([hidden])", timeout=60_000)
    assert page.is_visible("#refer") and page.is_hidden("#label-box")
    assert "does not look like a frontal chest radiograph" in page.text_content("#refer-msg")


def test_a_small_icon_shows_the_refusal(real_server, page, tmp_path):
    """A 24-pixel arrow icon, as documentation folders hold: refused with the reason, on the page."""
    import numpy as np
    from PIL import Image

    icon = np.zeros((24, 24, 4), np.uint8)
    for r in range(6, 18):                       # a grey arrow pointing right, on transparent
        icon[r, 4:14 + (r - 6 if r < 12 else 17 - r)] = (90, 90, 90, 255)
    path = tmp_path / "arrow-right.png"
    Image.fromarray(icon, "RGBA").save(path)
    r = _post(real_server[0], path)
    assert r.status_code == 422 and r.json()["error"] == "too_small"
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    text = page.text_content("#error")
    assert "24x24" in text and "at least 64 px" in text
    assert page.is_hidden("#report")
