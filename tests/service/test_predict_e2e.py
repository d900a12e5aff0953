"""`covid-cxr predict` (in-process, production model by default) agrees file by file with the
running service's /predict: label, verdict, reason, probabilities, model; and a bad file gets the
same reason code as the API's 4xx."""
from __future__ import annotations

import csv
import shutil

import pytest

from svckit import run_cli

pytestmark = pytest.mark.e2e

SYNTHETIC = ("png16", "rgba", "cmyk", "jpeg", "exif", "progressive", "ood", "colour_photo", "grey_photo", "blank",
             "gradient", "truncated", "truncated_jpeg", "corrupt", "zero", "text", "text_as_png", "svg", "pdf", "gif",
             "bomb", "bomb_header")


def test_predict_agrees_with_the_service(server, api, packaged, files, tmp_path):
    import svcmodel

    src = tmp_path / "batch"
    real = svcmodel.real_images(16)                    # 12 fitted per class (ok) + 4 beyond (mostly refer)
    for p, _ in real:
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, src / p.parent.name / p.name)
    (src / "other").mkdir()
    for k in SYNTHETIC:
        shutil.copy2(files[k], src / "other" / files[k].name)
    out = tmp_path / "pred.csv"
    r = run_cli(["predict", str(src), "--out", str(out), "--batch-size", "8", "--threads", "1"], packaged["root"],
                packaged["env"])
    assert r.returncode == 0, r.stderr
    with open(out, newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    assert len(rows) == len(real) + len(SYNTHETIC)
    verdicts = set()
    for path, row in rows.items():
        data = open(path, "rb").read()
        resp = api.post("/predict", files={"image": ("f", data, "application/octet-stream")})
        if row["error"]:
            assert resp.status_code >= 400 and resp.json()["error"] == row["error"], (path, resp.text)
            continue
        assert resp.status_code == 200, (path, resp.text)
        res = resp.json()
        assert (row["label"], row["verdict"], row["reason"] or None) == (res["label"], res["verdict"], res["reason"]), path
        assert row["model"] == res["model"] == server.model
        for cls, p in res["probabilities"].items():
            assert float(row["p_" + cls.replace(" ", "_")]) == pytest.approx(p, abs=2e-5), (path, cls)
        assert float(row["novelty"]) == pytest.approx(res["novelty"], abs=2e-3)
        assert row["in_distribution"] == str(res["in_distribution"]).lower()
        verdicts.add((res["verdict"], res["reason"]))
    # every kind of answer was compared
    assert {("ok", None), ("refer", "outside_training_data"), ("refer", "not_an_xray")} <= verdicts
    assert sum(1 for r in rows.values() if r["error"]) >= 10
