"""The page's "Download report" button in a real browser: the PDF arrives and says what the page says."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from test_web import browser, enter_token, page, wait_report  # noqa: F401 (fixtures)

pytestmark = pytest.mark.e2e


def pdf_text(path) -> str:
    for tool in ("pdftotext", "pdftoppm"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: apt-get install -y poppler-utils (.ci/setup --dev does)")
    return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True).stdout


def download(page, tmp_path):
    assert page.is_visible("#download-report")
    with page.expect_download(timeout=60_000) as dl:
        page.click("#download-report")
    d = dl.value
    assert d.suggested_filename.startswith("covid-cxr-report-") and d.suggested_filename.endswith(".pdf")
    dst = tmp_path / d.suggested_filename
    d.save_as(dst)
    return dst


def rasterise(pdf, tmp_path):
    from PIL import Image

    subprocess.run(["pdftoppm", "-png", "-r", "50", "-singlefile", str(pdf), str(tmp_path / "page")], check=True)
    im = Image.open(tmp_path / "page.png")
    assert im.size[1] > im.size[0] > 300
    return im


def test_download_report_of_an_xray(page, files, server, tmp_path):
    enter_token(page)
    page.set_input_files("#file", str(files["xray"]))
    wait_report(page)
    label = page.text_content("#label")
    pdf = download(page, tmp_path)
    assert pdf.read_bytes().startswith(b"%PDF")
    rasterise(pdf, tmp_path)
    text = pdf_text(pdf)
    assert f"Predicted label: {label}" in text
    assert server.model in text
    assert "not for diagnostic use" in text.lower()
    assert page.text_content("#download-status") == ""


def test_download_report_of_a_referred_film(page, files, server, tmp_path):
    enter_token(page)
    page.set_input_files("#file", str(files["ood"]))
    wait_report(page)
    assert page.is_visible("#refer")
    top = page.text_content("#top-class")
    text = pdf_text(download(page, tmp_path))
    assert "Refer: this film is unlike the films the model was trained on" in text
    assert f"Most probable class, not an answer: {top}" in text and server.model in text
