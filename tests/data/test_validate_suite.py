"""validate: the Great Expectations suite passes a good manifest and names what is wrong in a bad one."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from covid_cxr.data import validate
from covid_cxr.cli import app
from covid_cxr.data.prepare import assign_splits, write_manifest

COUNTS = {"COVID": 1300, "Normal": 1150, "Viral Pneumonia": 550}  # shares .43 / .38 / .18


def good_rows(counts: dict[str, int] = COUNTS) -> list[dict]:
    rows = []
    for cls, n in counts.items():
        for i in range(n):
            k = len(rows)
            rows.append({
                "path": f"data/COVID-19_Radiography_Dataset/{cls}/images/{cls}-{i}.png",
                "label": cls, "sha256": f"{k:064x}", "width": 256, "height": 256, "mode": "L",
                "bytes": 20000 + k, "group": f"g{k:012x}", "split": None,
            })
    splits = assign_splits([r["group"] for r in rows], [r["label"] for r in rows], 42, 0.15, 0.15)
    for r, s in zip(rows, splits):
        r["split"] = s
    return rows


def write(project, rows):
    write_manifest(rows, project / "artifacts" / "data" / "manifest.csv")


EXPECTED = {
    "columns", "not_empty", "label_set", "path_unique", "sha256_unique", "decodable", "width_bounds",
    "height_bounds", "mode_set", "bytes_positive", "split_set", "min_per_class", "class_fraction_min",
    "class_fraction_max", "split_fraction_min", "split_fraction_max", "group_one_split",
}


def test_good_manifest_passes_and_writes_summary_and_docs(project):
    rows = good_rows()
    write(project, rows)
    s = validate.run(project)
    assert s["success"] and s["failed"] == []
    assert set(s["expectations"]) == EXPECTED
    assert all(e["success"] for e in s["expectations"].values())
    assert s["counts"]["images"] == 3000 and s["counts"]["Viral Pneumonia"] == 550
    for split, n in Counter(r["split"] for r in rows).items():
        assert s["counts"][split] == n
    assert abs(s["counts"]["test"] - 450) <= 2
    on_disk = json.loads((project / "artifacts/validation/results.json").read_text())
    assert on_disk["success"] is True and set(on_disk["expectations"]) == EXPECTED
    metric = json.loads((project / "artifacts/validation/summary.json").read_text())
    assert metric["success"] is True and metric["n_failed"] == 0 and "expectations" not in metric
    index = project / "artifacts/validation/docs/index.html"
    assert index.is_file()
    pages = list((project / "artifacts/validation/docs/validations").rglob("*.html"))
    assert len(pages) == 4  # manifest, classes, splits, groups
    assert "covid_cxr_manifest" in index.read_text()


def test_bad_manifest_fails_naming_each_expectation_with_examples(project, params):
    rows = good_rows()
    base = "data/COVID-19_Radiography_Dataset/"
    rows[0]["label"] = "Lung_Opacity"
    rows[1]["sha256"] = rows[2]["sha256"]
    rows[3].update(width=None, height=None, mode=None)  # did not decode
    rows[4]["width"] = 32
    rows[5]["mode"] = "LA"
    # one group across two splits
    rows[6]["group"] = rows[7]["group"] = "gstraddle"
    rows[6]["split"], rows[7]["split"] = "train", "test"
    # too many test images overall and within COVID
    moved = [r for r in rows[10:] if r["label"] == "COVID" and r["split"] == "train"][:200]
    for r in moved:
        r["split"] = "test"
    write(project, rows)

    r = CliRunner().invoke(app, ["validate"])
    assert r.exit_code == 1
    out = r.output
    s = json.loads((project / "artifacts/validation/summary.json").read_text())
    assert s["success"] is False
    assert set(s["failed"]) == {
        "label_set", "sha256_unique", "decodable", "width_bounds", "mode_set", "group_one_split",
        "split_fraction_min", "split_fraction_max",
    }
    assert "Data validation FAILED: 8 of 17 expectations" in out
    for name in s["failed"]:
        assert f"- {name} [" in out
    # the examples name the offending files
    assert base + "COVID/images/COVID-0.png: label=Lung_Opacity" in out  # label_set
    assert base + "COVID/images/COVID-1.png" in out  # sha256_unique
    assert base + "COVID/images/COVID-3.png: mode=(empty)" in out  # decodable
    assert base + "COVID/images/COVID-4.png: width=32" in out  # width_bounds
    assert base + "COVID/images/COVID-5.png: mode=LA" in out  # mode_set
    assert "group=gstraddle: n_splits=2; files: " + base + "COVID/images/COVID-6.png (train)" in out
    assert "scope=COVID split=test: " in out and "scope=all split=train: " in out


def test_class_balance_and_minimum_count(project, params):
    write(project, good_rows({**COUNTS, "Viral Pneumonia": 200}))  # under 500 and under 10 %
    with pytest.raises(validate.ValidationFailed) as e:
        validate.run(project, docs=False)
    s = e.value.summary
    assert set(s["failed"]) == {"min_per_class", "class_fraction_min"}
    assert "label=Viral Pneumonia: count=200" in str(e.value)
