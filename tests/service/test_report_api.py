"""POST /report against the real server: the analysis report as a PDF or PNG download."""
from __future__ import annotations

import io
import shutil
import subprocess

import pytest
from PIL import Image

pytestmark = pytest.mark.e2e


def post(api, path, **data):
    return api.post("/report", files={"image": (path.name, path.read_bytes(), "application/octet-stream")}, data=data)


def pdf_text(data: bytes, tmp_path) -> str:
    if not shutil.which("pdftotext"):
        pytest.fail("pdftotext is missing: apt-get install -y poppler-utils (.ci/setup --dev does)")
    p = tmp_path / "r.pdf"
    p.write_bytes(data)
    return subprocess.run(["pdftotext", "-layout", str(p), "-"], capture_output=True, text=True, check=True).stdout


def test_pdf_report_of_an_xray(api, server, files, tmp_path):
    r = post(api, files["xray"])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/pdf"
    cd = r.headers["content-disposition"]
    assert cd.startswith("attachment;") and cd.endswith('.pdf"') and files["xray"].stem not in cd
    assert r.content.startswith(b"%PDF")
    expected = api.post("/predict", files={"image": ("x.png", files["xray"].read_bytes(), "image/png")}).json()
    assert expected["verdict"] == "ok" == r.headers["x-verdict"]
    text = pdf_text(r.content, tmp_path)
    assert f"Predicted label: {expected['label']}" in text
    assert server.model in text and "0123456789abcdef0123456789abcdef.dir" in text   # model + data version
    for cls, p in expected["probabilities"].items():
        assert f"{100 * p:.2f}" in text, cls
    assert "not for diagnostic use" in text.lower()
    assert files["xray"].name not in text


def test_png_report(api, files):
    r = post(api, files["xray"], format="png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"].endswith('.png"')
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "PNG" and im.size[1] > im.size[0]


@pytest.mark.parametrize("name,words", [("ood", "unlike the films the model was trained on"),
                                        ("colour_photo", "does not look like a chest X-ray")])
def test_refer_report_leads_with_refer(api, files, tmp_path, name, words):
    r = post(api, files[name])
    assert r.status_code == 200 and r.headers["x-verdict"] == "refer"
    text = pdf_text(r.content, tmp_path)
    lead = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith("Refer:"))
    assert words in lead and "not an answer" in text and "Predicted label" not in text


def test_dicom_report_carries_no_patient_field(api, files, tmp_path, train_images):
    import numpy as np

    import imgfactory as fx

    gray = np.asarray(Image.open(train_images[0]).convert("L"))
    d = fx.dicom_file(tmp_path / "film.dcm", gray)
    r = post(api, d)
    assert r.status_code == 200, r.text
    text = pdf_text(r.content, tmp_path) + r.headers["content-disposition"]
    for secret in (fx.FAKE_PATIENT_NAME, fx.FAKE_PATIENT_ID, "Doe", "Testpatient"):
        assert secret.lower() not in text.lower()
        assert secret.encode().lower() not in r.content.lower()


def test_bad_inputs_are_4xx_json(api, files):
    for key, status, code in (("text", 415, "not_an_image"), ("truncated", 422, "corrupt"), ("zero", 400, "empty")):
        r = post(api, files[key])
        assert r.status_code == status and r.headers["content-type"].startswith("application/json"), r.text
        assert r.json()["error"] == code
    r = post(api, files["xray"], format="svg")
    assert r.status_code == 400 and r.json()["error"] == "bad_format"
    # a non-form body never reaches BentoML's other deserialisers (pickle!)
    r = api.post("/report", content=b"\x80\x04K\x01.", headers={"Content-Type": "application/vnd.bentoml+pickle"})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"


def test_report_needs_the_token(server, files):
    with server.client(token=None) as c:
        r = c.post("/report", files={"image": ("x.png", files["xray"].read_bytes(), "image/png")})
    assert r.status_code == 401
