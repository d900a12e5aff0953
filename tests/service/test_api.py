"""The HTTP API of the packaged Bento, served by `covid-cxr serve` (real bentoml serve)."""
from __future__ import annotations

import base64
import io
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from covid_cxr.config import CLASSES
from svckit import prediction_log

pytestmark = pytest.mark.e2e


def post_image(c, path, route="/predict", field="image", ctype="application/octet-stream"):
    with open(path, "rb") as f:
        return c.post(route, files={field: (path.name, f.read(), ctype)})


def check_prediction(res: dict, model_tag: str) -> None:
    assert set(res) >= {"label", "probabilities", "verdict", "reason", "novelty", "in_distribution", "model"}
    assert res["verdict"] in ("ok", "refer")
    assert (res["reason"] is None) == (res["verdict"] == "ok")
    assert res["label"] in CLASSES
    assert list(res["probabilities"]) == list(CLASSES)
    p = np.array([res["probabilities"][c] for c in CLASSES])
    assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-4
    assert res["label"] == CLASSES[int(p.argmax())]
    assert isinstance(res["in_distribution"], bool)
    assert res["model"] == model_tag


def local_predict(model_dir, paths):
    """The same model and preprocessing, in-process: what the service must reproduce."""
    from covid_cxr.model.checkpoint import load_model
    from covid_cxr.data.preprocess import load_gray

    m = load_model(model_dir)
    return m.predict(np.stack([load_gray(p, m.size) for p in paths]))


def test_health_ready_and_page_need_no_token(server):
    with server.client(token=None) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/livez").status_code == 200
        assert c.get("/readyz").status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "Chest X-Ray" in page.text and "/static/app.js" in page.text
        js = c.get("/static/app.js")
        assert js.status_code == 200 and "/explain" in js.text
        assert c.get("/static/style.css").status_code == 200


def test_predict_matches_in_process_model(server, api, train_images):
    paths = train_images[::6]
    ref = local_predict(server.model_dir, paths)
    for i, p in enumerate(paths):
        r = post_image(api, p)
        assert r.status_code == 200, r.text
        res = r.json()
        check_prediction(res, server.model)
        got = np.array([res["probabilities"][c] for c in CLASSES])
        np.testing.assert_allclose(got, ref.probs[i], atol=1e-4)
        assert res["in_distribution"] is not bool(ref.novel[i])
        assert res["novelty"] == pytest.approx(float(ref.novelty[i]), rel=1e-3, abs=1e-3)
        assert (res["verdict"], res["reason"]) == (ref.verdict[i], ref.reason[i])


def test_training_xrays_are_in_distribution_and_noise_is_not(api, train_images, files):
    assert post_image(api, train_images[1]).json()["in_distribution"] is True
    res = post_image(api, files["ood"]).json()
    assert res["in_distribution"] is False
    assert res["label"] in CLASSES  # still answered, but referred
    assert (res["verdict"], res["reason"]) == ("refer", "outside_training_data")
    assert "unlike the films" in res["message"]


@pytest.mark.parametrize("name,reason", [("colour_photo", "not_an_xray"), ("gradient", "not_an_xray"),
                                         ("blank", "not_an_xray"), ("grey_photo", None)])
def test_pictures_that_are_not_xrays_are_referred(api, files, name, reason):
    """Never a bare diagnosis for a photograph or a blank frame: `refer`, with label and probabilities kept."""
    r = post_image(api, files[name])
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["verdict"] == "refer", res
    if reason:  # colour and blank: the same rules as `data check`
        assert res["reason"] == reason and "does not look like a chest X-ray" in res["message"]
    else:       # a greyscale photograph passes those rules; the novelty score catches it
        assert res["reason"] == "outside_training_data"
    assert res["label"] in CLASSES and set(res["probabilities"]) == set(CLASSES)


def test_explain_and_batch_carry_the_verdict(api, files, train_images):
    r = post_image(api, files["colour_photo"], route="/explain")
    assert r.status_code == 200 and r.json()["verdict"] == "refer" and r.json()["reason"] == "not_an_xray"
    paths = [train_images[0], files["blank"]]
    r = api.post("/predict_batch", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths])
    assert r.status_code == 200, r.text
    assert [x["verdict"] for x in r.json()] == ["ok", "refer"]


def test_predict_batch_keeps_order_and_equals_single(server, api, train_images):
    paths = [train_images[0], train_images[13], train_images[26], train_images[5]]
    r = api.post("/predict_batch", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths])
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out) == len(paths)
    for p, res in zip(paths, out):
        check_prediction(res, server.model)
        single = post_image(api, p).json()
        for c in CLASSES:
            assert res["probabilities"][c] == pytest.approx(single["probabilities"][c], abs=1e-5)


@pytest.mark.parametrize("kind", ["png16", "rgba", "cmyk", "jpeg", "exif", "progressive"])
def test_valid_unusual_formats_are_predicted(server, api, files, kind):
    r = post_image(api, files[kind])
    assert r.status_code == 200, r.text
    check_prediction(r.json(), server.model)


def test_exif_orientation_is_applied(api, files):
    """An EXIF-rotated JPEG is the upright film: same prediction and the same picture back."""
    up = post_image(api, files["jpeg"]).json()
    rot = post_image(api, files["exif"]).json()
    for c in CLASSES:
        assert rot["probabilities"][c] == pytest.approx(up["probabilities"][c], abs=0.02)
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(
        post_image(api, files["exif"], "/explain").json()["image_png"]))).convert("L"), np.float32)
    upright = np.asarray(Image.open(files["jpeg"]).convert("L"), np.float32)
    sideways = np.rot90(upright)
    assert shown.shape == upright.shape
    corr_up = np.corrcoef(shown.ravel(), upright.ravel())[0, 1]
    corr_side = np.corrcoef(shown.ravel(), sideways.ravel())[0, 1]
    assert corr_up > 0.98 and corr_up > corr_side + 0.1


def test_explain_returns_report_images_and_same_prediction(server, api, files):
    pred = post_image(api, files["xray"]).json()
    r = post_image(api, files["xray"], "/explain")
    assert r.status_code == 200, r.text
    ex = r.json()
    check_prediction(ex, server.model)
    assert ex["label"] == pred["label"] and ex["explained_class"] == ex["label"]
    for c in CLASSES:
        assert ex["probabilities"][c] == pytest.approx(pred["probabilities"][c], abs=1e-6)
    img = Image.open(io.BytesIO(base64.b64decode(ex["image_png"])))
    heat = Image.open(io.BytesIO(base64.b64decode(ex["heatmap_png"])))
    src = Image.open(files["xray"])
    assert img.size == heat.size == src.size  # 256 px: shown at full size
    assert heat.mode == "RGB"
    h = np.asarray(heat, np.int16)
    assert np.abs(h[..., 0] - h[..., 2]).max() > 30, "the overlay carries colour"
    assert "not for diagnostic use" in ex["disclaimer"].lower()


def test_explain_downscales_large_images_for_display(api, files):
    ex = post_image(api, files["progressive"], "/explain").json()
    assert Image.open(io.BytesIO(base64.b64decode(ex["heatmap_png"]))).size == (512, 512)


def test_metadata_describes_the_packaged_model(server, api):
    r = api.get("/metadata")
    assert r.status_code == 200
    md = r.json()
    model_json = json.loads((server.model_dir / "model.json").read_text())
    metrics = json.loads((server.root / "artifacts" / "eval" / "metrics.json").read_text())
    assert md["model"] == server.model
    assert md["bento"] == server.bento and md["production"] is True    # `covid-cxr serve` serves production
    assert md["classes"] == list(CLASSES)
    assert md["data_version"] == model_json["data_md5"]
    history = subprocess.run(["git", "rev-list", "HEAD"], cwd=server.root, capture_output=True, text=True).stdout
    assert md["git_sha"] in history.split()      # the commit it was packaged at (a label of the stored model)
    assert md["image_size"] == model_json["image_size"] == 96
    assert md["temperature"] == pytest.approx(model_json["temperature"])
    for k in ("accuracy", "macro_f1", "covid_recall"):
        assert md["metrics"][k] == pytest.approx(metrics[k])
    assert md["gate"]["passed"] is True
    assert md["params_hash"] and md["ready"] is True
    assert "diagnostic" in md["intended_use"]


def test_concurrent_predictions_are_batched_and_correct(api, server, train_images):
    paths = train_images[:16]
    ref = local_predict(server.model_dir, paths)

    def one(i):
        with server.client() as c:
            r = post_image(c, paths[i])
        return i, r.status_code, r.json(), int(r.headers.get("x-batch-size", 0))

    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(one, range(len(paths))))
    assert all(code == 200 for _, code, _, _ in out)
    for i, _, res, _ in out:
        got = np.array([res["probabilities"][c] for c in CLASSES])
        np.testing.assert_allclose(got, ref.probs[i], atol=1e-4)
    sizes = [n for *_, n in out]
    assert max(sizes) > 1, f"8 concurrent clients were never batched together: {sizes}"
    seen = api.get("/metadata").json()["batching"]["batch_sizes_seen"]
    assert any(int(k) > 1 for k in seen)


def test_batch_larger_than_the_max_batch_is_split_and_reassembled(server, api, train_images):
    """20 files > max_batch_size: the batcher splits the job over passes that run side by side
    (and may end out of order); results come back in the request's order."""
    batching = api.get("/metadata").json()["batching"]
    assert batching["max_batch_size"] < 20 and batching["passes"] >= 2
    paths = train_images[:20]
    r = api.post("/predict_batch", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths])
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out) == 20
    ref = local_predict(server.model_dir, paths)
    got = np.array([[res["probabilities"][c] for c in CLASSES] for res in out])
    np.testing.assert_allclose(got, ref.probs, atol=1e-4)
    assert int(r.headers["x-batch-size"]) <= batching["max_batch_size"]


def test_every_prediction_is_logged_without_pixels_or_names(server, api, train_images):
    """The served Bento appends one whitelisted JSON line per prediction (predlog.py)."""
    import time as _t

    log = prediction_log(server.env)    # the one default location, outside the project and the Bento
    before = len(log.read_text().splitlines()) if log.exists() else 0
    r = post_image(api, train_images[2])
    assert r.status_code == 200
    deadline = _t.monotonic() + 10
    while _t.monotonic() < deadline:  # the writer thread appends in the background
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) > before:
            break
        _t.sleep(0.2)
    rec = json.loads(lines[-1])
    res = r.json()
    assert rec["label"] == res["label"] and rec["verdict"] == res["verdict"] and rec["model"] == server.model
    assert rec["bento"] == server.bento
    assert rec["format"] == "PNG" and rec["width"] > 0 and len(rec["sha256"]) == 64
    import hashlib

    assert rec["sha256"] == hashlib.sha256(train_images[2].read_bytes()).hexdigest()
    assert train_images[2].name not in lines[-1] and "image_png" not in rec
