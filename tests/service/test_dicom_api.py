"""DICOM uploads to the packaged Bento (real `covid-cxr serve`): the service decodes them through
preprocess.open_image, so a radiograph is classified like its PNG and a CT / lateral / multi-frame
object gets a 422 with the reason, and no patient field appears in a response or the server log."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import imgfactory as fx
from covid_cxr.config import CLASSES

pytestmark = pytest.mark.e2e

SECRETS = (fx.FAKE_PATIENT_NAME, fx.FAKE_PATIENT_ID, "Testpatient", "PID-4242")


def _probs(res: dict) -> np.ndarray:
    return np.array([res["probabilities"][c] for c in CLASSES])


def _post(api, data: bytes, route: str = "/predict", name: str = "film.dcm", ctype: str = "application/dicom"):
    return api.post(route, files={"image": (name, data, ctype)})


@pytest.fixture(scope="module")
def film(train_images):
    return train_images[0], np.asarray(Image.open(train_images[0]).convert("L"))


@pytest.mark.parametrize("variant", ["rle_12_mono1", "j2k_lossless_16", "window_12", "jpeg_baseline_8"])
def test_dicom_is_classified_like_its_png(api, film, variant):
    png, gray = film
    ref = api.post("/predict", files={"image": (png.name, png.read_bytes(), "image/png")})
    assert ref.status_code == 200, ref.text
    r = _post(api, fx.dicom_bytes(gray, variant))
    assert r.status_code == 200, r.text
    assert r.json()["label"] == ref.json()["label"]
    assert np.abs(_probs(r.json()) - _probs(ref.json())).max() <= 0.02


def test_dicom_in_a_batch_and_explained(api, film):
    png, gray = film
    r = api.post("/predict_batch", files=[("images", (png.name, png.read_bytes(), "image/png")),
                                          ("images", ("a.dcm", fx.dicom_bytes(gray, "rescale_16"), "application/dicom"))])
    assert r.status_code == 200, r.text
    a, b = r.json()
    assert a["label"] == b["label"] and np.abs(_probs(a) - _probs(b)).max() <= 0.02
    r = _post(api, fx.dicom_bytes(gray, "signed_16_mono1"), route="/explain")
    assert r.status_code == 200, r.text
    assert r.json()["image_png"] and r.json()["heatmap_png"]


@pytest.mark.parametrize("kw,code,text", [
    ({"modality": "CT"}, "dicom_not_radiograph", "not a projection radiograph"),
    ({"view": "LL"}, "dicom_lateral", "lateral"),
    ({"frames": 2}, "dicom_multiframe", "2 frames"),
    ({"pixels": False}, "dicom_no_pixels", "no pixel data"),
])
@pytest.mark.parametrize("route", ["/predict", "/explain"])
def test_refused_dicom_gets_422_with_the_reason(api, server, film, kw, code, text, route):
    gray = film[1][:128, :128] if kw.get("frames") else film[1]
    r = _post(api, fx.dicom_bytes(gray, **kw), route=route)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == code and text in body["detail"], body
    for s in SECRETS:
        assert s.lower() not in r.text.lower()
    assert server.alive()


def test_no_patient_field_in_the_server_log(server, api, film):
    _post(api, fx.dicom_bytes(film[1], modality="CT"))
    _post(api, fx.dicom_bytes(film[1], "rle_12_mono1"))
    log = server.log_tail(10**7)
    for s in SECRETS:
        assert s.lower() not in log.lower(), s
