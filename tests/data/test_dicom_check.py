"""`data check` and `data import` with DICOM files (.dcm / .dicom), built from real batch-001 films.

Accepted DICOMs are checked like any image and imported byte for byte; refused ones get their
own reason; no patient field reaches the console, the report or the stats cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import imgfactory as fx
import numpy as np
from PIL import Image
from typer.testing import CliRunner

from covid_cxr.data import filestats, imagecheck, layouts, rules
from covid_cxr.cli import app
from covid_cxr.config import load_params
REPO = Path(__file__).resolve().parents[2]
from covid_cxr.data.preprocess import load_gray

LIMITS = rules.Limits.from_params(load_params(REPO / "params.yaml"))
SECRETS = (fx.FAKE_PATIENT_NAME, fx.FAKE_PATIENT_ID, "Testpatient", "PID-4242")


def _gray(p: Path) -> np.ndarray:
    return np.asarray(Image.open(p).convert("L"))


def dicom_batch(root: Path, real: dict[str, list[Path]]) -> dict[str, Path]:
    covid, normal, viral = (real[c] for c in ("COVID", "Normal", "Viral Pneumonia"))
    return {
        "rle": fx.dicom_file(root / "COVID" / "film-rle.dcm", _gray(covid[0]), "rle_12_mono1"),
        "j2k": fx.dicom_file(root / "Normal" / "film-j2k.dicom", _gray(normal[0]), "j2k_lossless_16"),
        "raw": fx.dicom_file(root / "Viral Pneumonia" / "FILM0001", _gray(viral[0]), "implicit_no_preamble"),
        "ct": fx.dicom_file(root / "Normal" / "ct.dcm", _gray(normal[1]), modality="CT"),
        "lateral": fx.dicom_file(root / "COVID" / "lateral.dcm", _gray(covid[1]), view="LL"),
        "frames": fx.dicom_file(root / "COVID" / "cine.dcm", _gray(covid[1])[:96, :96], frames=2),
        "nopix": fx.dicom_file(root / "Viral Pneumonia" / "nopix.dcm", _gray(viral[1]), pixels=False),
    }


def assert_private(text: str) -> None:
    for s in SECRETS:
        assert s.lower() not in text.lower(), f"{s!r} leaked"


def test_check_accepts_good_dicoms_and_names_each_refusal(data_dir, project, tmp_path, real_images):
    files = dicom_batch(tmp_path / "b", real_images)
    res = {Path(r["path"]).name: r for r in imagecheck.check_batch(tmp_path / "b", data_dir, limits=LIMITS)}
    assert len(res) == len(files)  # .dcm, .dicom and an extension-less file are all enumerated
    for k in ("rle", "j2k", "raw"):
        r = res[files[k].name]
        assert r["accepted"] and r["reason"] == "ok", r
        assert r["mode"] == "L" and (r["width"], r["height"]) == (256, 256)
    assert {res[files[k].name]["reason"] for k in ("ct", "lateral", "frames", "nopix")} == {
        "dicom_not_radiograph", "dicom_lateral", "dicom_multiframe", "dicom_no_pixels"}
    assert res["ct.dcm"]["reason"] == "dicom_not_radiograph" and "modality CT" in res["ct.dcm"]["message"]
    assert filestats.file_stats(files["rle"], LIMITS.max_pixels)["format"] == "DICOM"


def test_cli_check_report_and_import_keep_patient_data_out(data_dir, project, tmp_path, real_images):
    files = dicom_batch(tmp_path / "b", real_images)
    report = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["data", "check", str(tmp_path / "b"), "--report", str(report)])
    assert r.exit_code == 1, r.output  # four refused
    doc = json.loads(report.read_text())
    assert doc["summary"]["by_reason"] == {"dicom_lateral": 1, "dicom_multiframe": 1, "dicom_no_pixels": 1,
                                           "dicom_not_radiograph": 1, "ok": 3}
    assert "dicom_not_radiograph" in r.output and "lateral view" in r.output
    assert_private(r.output)
    assert_private(report.read_text())
    for cache in (project / ".cache").rglob("*.json"):
        assert_private(cache.read_text())

    r = CliRunner().invoke(app, ["data", "import", str(tmp_path / "b"), "--check"])
    assert r.exit_code == 0, r.output
    assert "Added 3" in r.output and "4 rejected by the check" in r.output
    assert_private(r.output)
    imported = {p.name: p for p in (data_dir / fx.KAGGLE).rglob("*") if p.is_file() and not p.suffix == ".png"}
    assert set(imported) == {files[k].name for k in ("rle", "j2k", "raw")}
    for k in ("rle", "j2k", "raw"):  # the original bytes, under the original name and extension
        got = imported[files[k].name]
        assert hashlib.sha256(got.read_bytes()).hexdigest() == hashlib.sha256(files[k].read_bytes()).hexdigest()
    assert imported["film-rle.dcm"].parent.parent.name == "COVID"
    # data/ now holds DICOMs: the data index (prepare, later checks) reads them like the PNGs
    assert len(layouts.data_image_files(data_dir)) == 6 + 3
    again = imagecheck.check_batch(tmp_path / "b", data_dir, limits=LIMITS)
    assert {r["reason"] for r in again if Path(r["path"]).name in imported} == {"duplicate"}


def test_training_cache_decodes_dicoms_like_their_pngs(tmp_path, real_images):
    """datacache (training / evaluation pixels) goes through load_gray, so DICOM rows just work."""
    import pandas as pd

    from covid_cxr.data.cache import decoded

    pngs = [files[0] for files in real_images.values()]
    rows = []
    for i, (png, variant) in enumerate(zip(pngs, ("jpeg_lossless_12", "window_12", "mono1_8"))):
        f = fx.dicom_file(tmp_path / "root" / f"f{i}.dcm", _gray(png), variant)
        rows.append({"path": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()})
    arr = decoded(pd.DataFrame(rows), 224, tmp_path / "root", tmp_path / "cache", workers=1)
    for a, png in zip(arr, pngs):
        assert np.array_equal(a, load_gray(png, 224))
