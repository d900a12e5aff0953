"""The real 6,119 images and batch-001 (slow: run with `pytest -m slow tests/data`)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import imgfactory as fx
import pytest

from covid_cxr.data import filestats, imagecheck, layouts, rules
from covid_cxr.data import prepare, validate
from covid_cxr.config import load_params

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"


@pytest.fixture(scope="module")
def real_project(tmp_path_factory):
    if not (DATA / fx.KAGGLE).is_dir():
        pytest.skip("data/ is not pulled (dvc pull)")
    root = tmp_path_factory.mktemp("full")
    os.symlink(DATA.resolve(), root / "data")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return root


def test_every_real_image_and_all_of_batch_001_pass(real_project):
    if not fx.BATCH_001.is_dir():
        pytest.skip("batch-001 is not available")
    limits = rules.Limits.from_params(load_params(real_project / "params.yaml"))
    idx = imagecheck.DataIndex.build(real_project / "data", limits, cache_dir=real_project / ".cache")
    assert len(idx.hashes) == 6119
    results = imagecheck.check_batch(fx.BATCH_001, real_project / "data", limits=limits, cache_dir=real_project / ".cache")
    assert len(results) == 383
    assert Counter(r["reason"] for r in results) == {"ok": 383}
    assert Counter(r["label"] for r in results) == {"COVID": 168, "Normal": 148, "Viral Pneumonia": 67}
    # four of them are re-crops of films already in data/ (checked by eye): accepted, but marked
    marked = {(Path(r["path"]).name, Path(r["same_film_as"]).name) for r in results if r.get("same_film_as")}
    assert marked == {("COVID-366.png", "COVID-681.png"), ("COVID-1063.png", "COVID-1120.png"),
                      ("COVID-168.png", "COVID-1079.png"), ("COVID-722.png", "COVID-1147.png")}
    # every image already in data/ passes the file rules too (colour, blank, size, mode)
    files = [f.path for f in layouts.data_image_files(real_project / "data")]
    stats = filestats.compute_stats(files, limits.max_pixels, cache=filestats.StatsCache(real_project / ".cache", limits.max_pixels))
    assert Counter(rules.judge(s, limits)[0] for s in stats) == {"ok": 6119}


def test_prepare_and_validate_pass_on_the_real_data(real_project):
    rows = prepare.run(real_project, progress=False)
    assert len(rows) == 6119
    per_group = {}
    for r in rows:
        per_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in per_group.values())
    sizes = Counter(r["group"] for r in rows)
    assert max(sizes.values()) < 10  # no giant near-duplicate component
    assert 40 <= sum(1 for n in sizes.values() if n > 1) <= 120
    group = {Path(r["path"]).name: r["group"] for r in rows}
    # re-cropped copies of one film (the dhash misses all but the first), in one group each
    for a, b in (("COVID-1517.png", "COVID-940.png"), ("COVID-1221.png", "COVID-1538.png"),
                 ("COVID-3512.png", "COVID-3513.png"), ("COVID-433.png", "COVID-512.png"),
                 ("COVID-326.png", "COVID-797.png"), ("COVID-1054.png", "COVID-1078.png")):
        assert group[a] == group[b], (a, b)
    s = validate.run(real_project, docs=False)
    assert s["success"], validate.failure_message(s)
