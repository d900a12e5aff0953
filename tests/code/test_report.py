"""report.py: the downloadable analysis report, as PDF and PNG, without a server."""
from __future__ import annotations

import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_cxr.model.gradcam import overlay
from covid_cxr.serve.report import MEDIA_TYPES, build_report, filename

WHEN = datetime(2024, 5, 6, 7, 8, tzinfo=timezone.utc)
SHA = "a2295e558bb8ad8e76da1224199cdd92c1d1dea59eb1e45d98d75d88778eee2a"
DATA = "0123456789abcdef0123456789abcdef.dir"
OK = {"label": "Viral Pneumonia", "probabilities": {"COVID": 0.02, "Normal": 0.0345, "Viral Pneumonia": 0.9455},
      "verdict": "ok", "reason": None, "message": None, "novelty": 7.5, "in_distribution": True,
      "model": "covid_cxr:abc123def456"}
REFER = dict(OK, verdict="refer", reason="outside_training_data", novelty=25.1, in_distribution=False,
             message="this film is unlike the films the model was trained on")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} is missing: apt-get install -y poppler-utils (.ci/setup --dev does)")
    return path


@pytest.fixture(scope="module")
def film() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:300, :240]
    gray = (128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)
    cam = np.exp(-((yy - 150) ** 2 + (xx - 100) ** 2) / 3000.0)
    return gray, overlay(gray, cam)


def pdf_text(data: bytes, tmp_path: Path) -> str:
    p = tmp_path / "r.pdf"
    p.write_bytes(data)
    return subprocess.run([need("pdftotext"), "-layout", str(p), "-"], capture_output=True, text=True,
                          check=True).stdout


def test_pdf_ok(film, tmp_path):
    data = build_report(*film, OK, data_version=DATA, when=WHEN, image_sha256=SHA, cam_method="grad-cam")
    assert data.startswith(b"%PDF")
    text = pdf_text(data, tmp_path)
    for s in ("Chest X-ray analysis report", "Predicted label: Viral Pneumonia", "covid_cxr:abc123def456", DATA,
              "2024-05-06 07:08 UTC", SHA, "Not for diagnostic use", "Uploaded image", "Grad-CAM",
              "Confidence (%)", "94.55", "3.45", "2.00"):
        assert s in text, s
    assert "Refer" not in text and "not an answer" not in text
    # one page, and it rasterises
    out = tmp_path / "page"
    subprocess.run([need("pdftoppm"), "-png", "-r", "40", str(tmp_path / "r.pdf"), str(out)], check=True)
    pages = sorted(tmp_path.glob("page*.png"))
    assert len(pages) == 1
    im = Image.open(pages[0])
    assert im.size[1] > im.size[0]                                       # A4 portrait
    a = np.asarray(im.convert("RGB")).astype(int)
    assert (np.abs(a[..., 0] - a[..., 2]) > 60).any()                    # the heat map's colours are drawn


def test_pdf_refer_leads_with_refer(film, tmp_path):
    text = pdf_text(build_report(*film, REFER, data_version=DATA, when=WHEN), tmp_path)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    refer_at = next(i for i, ln in enumerate(lines) if ln.startswith("Refer: this film is unlike the films"))
    assert refer_at < next(i for i, ln in enumerate(lines) if "Uploaded image" in ln)
    assert "Most probable class, not an answer: Viral Pneumonia" in text
    assert "Predicted label" not in text
    assert "covid_cxr:abc123def456" in text and "not for diagnostic use" in text.lower()


def test_png(film):
    import io

    data = build_report(*film, OK, fmt="png", data_version=DATA, when=WHEN)
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG" and im.size[1] > im.size[0] > 800
    assert set(im.info) <= {"Title", "Software", "dpi"}, im.info


def test_bad_format(film):
    with pytest.raises(ValueError):
        build_report(*film, OK, fmt="svg")
    assert set(MEDIA_TYPES) == {"pdf", "png"}


def test_nothing_but_pixels_goes_in(film, tmp_path):
    """No upload name and no header field: the report is built from pixels and the result only."""
    import inspect

    params = set(inspect.signature(build_report).parameters)
    assert not params & {"filename", "name", "patient", "info", "dicom", "path"}
    assert filename(SHA, "pdf") == "covid-cxr-report-a2295e558bb8.pdf"
