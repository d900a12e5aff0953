"""The data checks (rules, fingerprint, samefilm, filestats, layouts, imagecheck): one test per
rejection reason, layouts, report, cache and the `data check` CLI."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import imgfactory as fx
import numpy as np
import pytest
from typer.testing import CliRunner

from covid_cxr.config import KAGGLE_ROOT
from covid_cxr.data import filestats, fingerprint, imagecheck, pool, rules, samefilm
from covid_cxr.hashing import sha256_file
from covid_cxr.cli import app
from covid_cxr.config import load_params
REPO = Path(__file__).resolve().parents[2]

LIMITS = rules.Limits.from_params(load_params(REPO / "params.yaml"))  # 64..4096 px, modes L/I;16/I/RGB, 4 bits


def reason_of(path: Path) -> str:
    return rules.check_file(path, LIMITS)["reason"]


# --------------------------------------------------------------------------- single files


def test_good_png_is_accepted_with_stats(tmp_path):
    p = fx.png_gray(tmp_path / "a.png", size=(200, 180), seed=1)
    r = rules.check_file(p, LIMITS)
    assert r["accepted"] and r["reason"] == "ok"
    assert (r["width"], r["height"], r["mode"]) == (200, 180, "L")
    assert r["bytes"] == p.stat().st_size
    assert len(r["sha256"]) == 64
    assert isinstance(r["dhash"], int) and 0 <= r["dhash"] < 2**64


def test_16bit_greyscale_png_is_a_valid_xray(tmp_path):
    r = rules.check_file(fx.png16(tmp_path / "a16.png"), LIMITS)
    assert r["accepted"], r["message"]
    assert r["mode"] == "I;16"


def test_grey_film_saved_as_rgb_jpeg_is_not_taken_for_a_colour_photo(tmp_path):
    r = rules.check_file(fx.jpeg_gray_rgb(tmp_path / "a.jpg"), LIMITS)
    assert r["accepted"], r["message"]
    assert r["mode"] == "RGB"


def test_empty_file(tmp_path):
    assert reason_of(fx.zero_bytes(tmp_path / "z.png")) == "empty"


def test_text_file_is_not_an_image(tmp_path):
    assert reason_of(fx.text_file(tmp_path / "notes.png")) == "not_an_image"


def test_truncated_png_is_corrupt(tmp_path):
    r = rules.check_file(fx.truncated(tmp_path / "t.png"), LIMITS)
    assert r["reason"] == "corrupt"
    assert "truncated" in r["message"]


def test_too_small(tmp_path):
    r = rules.check_file(fx.tiny(tmp_path / "t.png", size=32), LIMITS)
    assert r["reason"] == "too_small" and "64" in r["message"]
    assert reason_of(fx.png_gray(tmp_path / "edge.png", size=(64, 300))) == "ok"  # the bound itself is fine


def test_too_large_side_decoded(tmp_path):
    r = rules.check_file(fx.wide(tmp_path / "w.png", width=4200, height=96), LIMITS)
    assert r["reason"] == "too_large" and "4096" in r["message"]


def test_too_large_header_is_refused_before_decoding(tmp_path):
    p = fx.huge_dims(tmp_path / "bomb.png", 30000, 30000)
    assert p.stat().st_size < 200
    r = rules.check_file(p, LIMITS)
    assert r["reason"] == "too_large"
    assert r["width"] is None  # never decoded


def test_mode_outside_validate_modes(tmp_path):
    r = rules.check_file(fx.la_png(tmp_path / "la.png"), LIMITS)
    assert r["reason"] == "bad_mode" and "LA" in r["message"]
    # and the same file passes when the params allow the mode
    assert rules.check_file(tmp_path / "la.png", dataclasses.replace(LIMITS, modes=("L", "LA")))["accepted"]


def test_colour_photo_is_not_an_xray(tmp_path):
    r = rules.check_file(fx.rgb_photo(tmp_path / "photo.png"), LIMITS)
    assert r["reason"] == "not_xray_colour"


def test_blank_image_is_not_an_xray(tmp_path):
    assert reason_of(fx.blank(tmp_path / "b.png")) == "not_xray_blank"


def test_animated_and_unsupported_format(tmp_path):
    assert reason_of(fx.animated_gif(tmp_path / "a.gif")) == "animated"
    assert reason_of(fx.tga(tmp_path / "a.tga")) == "unsupported_format"


def test_real_batch_images_pass(real_images, tmp_path):
    for files in real_images.values():
        for f in files:
            r = rules.check_file(f, LIMITS)
            assert r["accepted"], (f, r["message"])


# --------------------------------------------------------------------------- hash


def test_hash_catches_reexports_but_separates_different_films(real_images, tmp_path):
    files = [f for fs in real_images.values() for f in fs]
    hashes = [rules.check_file(f, LIMITS)["dhash"] for f in files]
    for i in range(len(files)):
        for j in range(i):
            assert fingerprint.hamming(hashes[i], hashes[j]) > LIMITS.near_dup_bits, (files[i], files[j])
    for k, f in enumerate(files[:3]):
        for size, fmt in ((299, "PNG"), (512, "PNG"), (256, "JPEG")):
            q = fx.resaved(f, tmp_path / f"r{k}_{size}.{fmt.lower()}", size, fmt)
            assert fingerprint.hamming(hashes[k], rules.check_file(q, LIMITS)["dhash"]) <= LIMITS.near_dup_bits


def _thumb(path: Path):
    return fingerprint.decode_thumbs([filestats.file_stats(path, LIMITS.max_pixels)["thumb"]])[0][0]


def test_thumbnail_is_stored_as_uint8_base64(tmp_path):
    st = filestats.file_stats(fx.png_gray(tmp_path / "a.png", seed=3), LIMITS.max_pixels)
    t, has = fingerprint.decode_thumbs([st["thumb"], None])
    assert has.tolist() == [True, False] and t.shape == (2, fingerprint.HASH_GRID, fingerprint.HASH_GRID)
    assert abs(float(t[0].std()) - st["std"]) < 0.5  # the same thumbnail as the std (and the hash)
    assert filestats.file_stats(fx.zero_bytes(tmp_path / "z.png"), LIMITS.max_pixels)["thumb"] is None


def test_film_score_matches_recrops_and_reexports_not_other_films(tmp_path):
    films = [fx.png_gray(tmp_path / f"f{k}.png", seed=k) for k in range(300, 306)]
    t = np.stack([_thumb(f) for f in films])
    copies = [
        fx.recropped(films[0], tmp_path / "c0.png", (0.03, 0.02, 0.0, 0.04)),
        fx.recropped(films[1], tmp_path / "c1.png", (0.10, 0.05, 0.10, 0.05)),  # larger: scored, if a candidate
        fx.recropped(films[2], tmp_path / "c2.png", (0.02, 0.02, 0.02, 0.02), size=299),
        fx.resaved(films[3], tmp_path / "c3.jpeg", 512, "JPEG"),
    ]
    c = np.stack([_thumb(f) for f in copies])
    assert (samefilm.film_scores(t[:4], c) >= 0.95).all()
    i, j = np.triu_indices(len(t), 1)
    assert samefilm.film_scores(t[i], t[j]).max() < 0.7
    pairs = samefilm.film_pairs(t, 0.85, others=c)
    assert {(a, b) for a, b, _ in pairs} <= {(0, 0), (1, 1), (2, 2), (3, 3)}
    assert {(0, 0), (2, 2), (3, 3)} <= {(a, b) for a, b, _ in pairs}  # small crops are always candidates
    assert samefilm.film_pairs(t, 0.85) == []


def test_film_score_on_real_films(real_images, tmp_path):
    files = [f for fs in real_images.values() for f in fs]
    t = np.stack([_thumb(f) for f in files])
    i, j = np.triu_indices(len(t), 1)
    assert samefilm.film_scores(t[i], t[j]).max() < 0.85
    copies = [fx.recropped(f, tmp_path / f"c{k}.png", (0.02, 0.0, 0.01, 0.02)) for k, f in enumerate(files)]
    c = np.stack([_thumb(f) for f in copies])
    assert (samefilm.film_scores(t, c) >= 0.9).all()
    assert sorted((a, b) for a, b, _ in samefilm.film_pairs(t, 0.85, others=c)) == [(k, k) for k in range(len(files))]


def test_hamming_vectorised():
    import numpy as np

    a = np.array([0, 0b1011, 2**64 - 1], dtype=np.uint64)
    assert fingerprint.hamming(a, 0).tolist() == [0, 3, 64]
    assert fingerprint.hamming(0b1111, 0b0101) == 2


# --------------------------------------------------------------------------- batches


def test_check_batch_flat_layout_every_reason(data_dir, tmp_path):
    batch = tmp_path / "batch"
    fx.png_gray(batch / "covid" / "new1.png", seed=1)  # lower-case class folder
    fx.png_gray(batch / "NORMAL" / "new2.png", seed=2)
    fx.png_gray(batch / "Viral_Pneumonia" / "new3.png", seed=3)
    fx.png_gray(batch / "viral-pneumonia" / "new4.png", seed=4)
    fx.png_gray(batch / "Lung Cancer" / "x.png", seed=5)  # not a class of ours
    fx.png_gray(batch / "stray.png", seed=6)  # no class folder
    (batch / "covid" / "z_copy.png").write_bytes((batch / "covid" / "new1.png").read_bytes())  # dup in batch
    existing = data_dir / KAGGLE_ROOT / "Normal" / "images" / "Normal-0.png"
    (batch / "Normal" / "again.png").parent.mkdir(exist_ok=True)
    (batch / "Normal" / "again.png").write_bytes(existing.read_bytes())  # dup of data/
    fx.resaved(existing, batch / "Normal" / "bigger.png", 299)  # near-dup of data/
    fx.zero_bytes(batch / "COVID" / "zero.png")
    fx.text_file(batch / "COVID" / "readme.txt")
    fx.truncated(batch / "COVID" / "cut.png", seed=8)
    fx.tiny(batch / "COVID" / "tiny.png")
    fx.huge_dims(batch / "COVID" / "huge.png")
    fx.rgb_photo(batch / "COVID" / "holiday.png")
    fx.blank(batch / "COVID" / "blank.png")
    fx.la_png(batch / "COVID" / "alpha.png", seed=9)

    res = {Path(r["path"]).relative_to(batch).as_posix(): r for r in imagecheck.check_batch(batch, data_dir, limits=LIMITS)}
    reasons = {k: v["reason"] for k, v in res.items()}
    assert reasons == {
        "COVID/alpha.png": "bad_mode",
        "COVID/blank.png": "not_xray_blank",
        "COVID/cut.png": "corrupt",
        "COVID/holiday.png": "not_xray_colour",
        "COVID/huge.png": "too_large",
        "COVID/readme.txt": "not_an_image",
        "COVID/tiny.png": "too_small",
        "COVID/zero.png": "empty",
        "Lung Cancer/x.png": "unknown_class",
        "Normal/again.png": "duplicate",
        "Normal/bigger.png": "near_duplicate",
        "NORMAL/new2.png": "ok",
        "Viral_Pneumonia/new3.png": "ok",
        "covid/new1.png": "ok",
        "covid/z_copy.png": "duplicate_in_batch",
        "stray.png": "unknown_class",
        "viral-pneumonia/new4.png": "ok",
    }
    assert res["covid/new1.png"]["label"] == "COVID"
    assert res["NORMAL/new2.png"]["label"] == "Normal"
    assert res["viral-pneumonia/new4.png"]["label"] == "Viral Pneumonia"
    assert res["Lung Cancer/x.png"]["label"] is None
    assert res["covid/z_copy.png"]["duplicate_of"] == str(batch / "covid" / "new1.png")  # the first copy is kept
    assert res["Normal/again.png"]["duplicate_of"] == str(existing)
    assert res["Normal/bigger.png"]["duplicate_of"] == str(existing)
    assert res["Normal/bigger.png"]["distance"] <= LIMITS.near_dup_bits
    assert all(set(REQUIRED) <= set(r) for r in res.values())
    assert all(r["accepted"] == (r["reason"] == "ok") for r in res.values())


REQUIRED = ("path", "label", "accepted", "reason", "width", "height", "mode", "bytes", "sha256", "dhash")


def test_check_batch_kaggle_layout_skips_masks_and_lung_opacity(data_dir, tmp_path):
    src = tmp_path / "kaggle" / KAGGLE_ROOT
    fx.png_gray(src / "COVID" / "images" / "COVID-9.png", seed=11)
    fx.png_gray(src / "COVID" / "masks" / "COVID-9.png", seed=12)
    fx.png_gray(src / "Lung_Opacity" / "images" / "Lung_Opacity-1.png", seed=13)
    fx.text_file(src / "COVID.metadata.xlsx")
    fx.text_file(src / "README.md.txt")
    results, scan = imagecheck.check_source(tmp_path / "kaggle", data_dir, limits=LIMITS)
    assert [(Path(r["path"]).name, r["label"], r["reason"]) for r in results] == [("COVID-9.png", "COVID", "ok")]
    assert dict(scan.skipped) == {"masks/": 1, "Lung_Opacity/": 1, "*.xlsx": 1, "README/licence": 1}


def test_recropped_copy_of_a_data_film_is_accepted_and_marked(data_dir, tmp_path, project):
    existing = data_dir / KAGGLE_ROOT / "Normal" / "images" / "Normal-1.png"
    fx.recropped(existing, tmp_path / "b" / "Normal" / "crop.png", (0.03, 0.02, 0.0, 0.04))
    fx.png_gray(tmp_path / "b" / "Normal" / "new.png", seed=51)
    res = {Path(r["path"]).name: r for r in imagecheck.check_batch(tmp_path / "b", data_dir, limits=LIMITS)}
    assert res["crop.png"]["reason"] == "ok" and res["crop.png"]["accepted"]
    assert res["crop.png"]["same_film_as"] == str(existing) and res["crop.png"]["film_corr"] >= LIMITS.near_dup_corr
    assert "same_film_as" not in res["new.png"]
    assert imagecheck.summarize(list(res.values()))["accepted_same_film"] == 1
    r = CliRunner().invoke(app, ["data", "check", str(tmp_path / "b"), "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output  # marked, never rejected
    assert "1 accepted file(s) look like a re-crop of a film already in data/" in r.output


def test_near_duplicates_inside_a_batch_are_both_accepted(data_dir, tmp_path):
    """Only near-duplicates of data/ are rejected; within a batch, prepare groups them."""
    a = fx.png_gray(tmp_path / "b" / "COVID" / "a.png", seed=21)
    fx.resaved(a, tmp_path / "b" / "COVID" / "a_big.png", 299)
    assert [r["reason"] for r in imagecheck.check_batch(tmp_path / "b", data_dir, limits=LIMITS)] == ["ok", "ok"]


def test_write_report_counts_and_lists_every_file(data_dir, tmp_path):
    fx.png_gray(tmp_path / "b" / "COVID" / "ok.png", seed=31)
    fx.zero_bytes(tmp_path / "b" / "COVID" / "zero.png")
    results = imagecheck.check_batch(tmp_path / "b", data_dir, limits=LIMITS)
    doc = json.loads(imagecheck.write_report(results, tmp_path / "r" / "report.json").read_text())
    assert doc["summary"]["files"] == 2 and doc["summary"]["accepted"] == 1 and doc["summary"]["rejected"] == 1
    assert doc["summary"]["by_reason"] == {"empty": 1, "ok": 1}
    assert doc["summary"]["accepted_by_class"]["COVID"] == 1
    assert sorted(Path(f["path"]).name for f in doc["files"]) == ["ok.png", "zero.png"]


# --------------------------------------------------------------------------- cache


def test_data_index_cache_is_reused_and_invalidated(data_dir, monkeypatch):
    cache_dir = filestats.default_cache_dir(data_dir)
    imagecheck.DataIndex.build(data_dir, LIMITS)
    assert list(cache_dir.glob("imagestats-*.json"))
    calls = []
    real = filestats.file_stats
    monkeypatch.setattr(filestats, "file_stats", lambda p, m: calls.append(Path(p).name) or real(p, m))
    idx = imagecheck.DataIndex.build(data_dir, LIMITS)
    assert calls == [] and len(idx.hashes) == 6  # all from the cache
    f = data_dir / KAGGLE_ROOT / "COVID" / "images" / "COVID-0.png"
    fx.png_gray(f, seed=999)  # same name, new content
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    idx = imagecheck.DataIndex.build(data_dir, LIMITS)
    assert calls == ["COVID-0.png"]
    assert sha256_file(f) in idx.by_sha


# --------------------------------------------------------------------------- CLI


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_cli_check_exit_codes_and_no_side_effects(data_dir, project, tmp_path):
    good = tmp_path / "good"
    fx.png_gray(good / "COVID" / "n1.png", seed=41)
    fx.png16(good / "Normal" / "n2.png", seed=42)
    bad = tmp_path / "bad"
    fx.png_gray(bad / "COVID" / "n1.png", seed=43)
    fx.text_file(bad / "COVID" / "notes.png")
    before_data, before_good = _snapshot(data_dir), _snapshot(good)
    runner = CliRunner()

    report = tmp_path / "good.json"
    r = runner.invoke(app, ["data", "check", str(good), "--report", str(report)])
    assert r.exit_code == 0, r.output
    assert "2 of 2 files accepted" in r.output
    assert json.loads(report.read_text())["summary"]["accepted"] == 2

    report = tmp_path / "bad.json"
    r = runner.invoke(app, ["data", "check", str(bad), "--report", str(report)])
    assert r.exit_code == 1, r.output
    assert "not_an_image" in r.output and "notes.png" in r.output
    assert json.loads(report.read_text())["summary"]["by_reason"] == {"not_an_image": 1, "ok": 1}

    assert _snapshot(data_dir) == before_data and _snapshot(good) == before_good


def test_cache_is_keyed_by_the_code_too(data_dir, monkeypatch):
    imagecheck.DataIndex.build(data_dir, LIMITS)
    [first] = filestats.default_cache_dir(data_dir).glob("imagestats-*.json")
    monkeypatch.setattr(filestats, "STATS_VERSION", filestats.STATS_VERSION + 1)  # as if the stats code changed
    calls = []
    real = filestats.file_stats
    monkeypatch.setattr(filestats, "file_stats", lambda p, m: calls.append(p) or real(p, m))
    imagecheck.DataIndex.build(data_dir, LIMITS)
    assert len(calls) == 6  # nothing reused
    [second] = filestats.default_cache_dir(data_dir).glob("imagestats-*.json")
    assert second != first  # and the stale cache file is gone


def test_compute_stats_process_pool_gives_the_serial_result(tmp_path, monkeypatch):
    files = [fx.png_gray(tmp_path / f"{i}.png", size=64, seed=i) for i in range(20)]
    files.append(fx.zero_bytes(tmp_path / "zero.png"))
    serial = filestats.compute_stats(files, LIMITS.max_pixels, workers=1)
    pools = []

    class Spy(pool.ProcessPoolExecutor):
        def __init__(self, *a, **kw):
            pools.append(a)
            super().__init__(*a, **kw)

    monkeypatch.setattr(pool, "ProcessPoolExecutor", Spy)
    monkeypatch.setattr(filestats, "POOL_MIN_FILES", 8)
    monkeypatch.setattr(pool.threading, "active_count", lambda: 1)  # pytest may run helper threads
    assert filestats.compute_stats(files, LIMITS.max_pixels, workers=2) == serial
    assert pools == [(2,)]
    assert serial[-1]["error"] == "empty"


def test_compute_stats_never_forks_a_threaded_process(tmp_path, monkeypatch):
    files = [fx.png_gray(tmp_path / f"{i}.png", size=64, seed=i) for i in range(10)]
    monkeypatch.setattr(filestats, "POOL_MIN_FILES", 4)
    monkeypatch.setattr(pool.threading, "active_count", lambda: 3)  # e.g. inside a Prefect worker
    monkeypatch.setattr(pool, "ProcessPoolExecutor", lambda *a, **k: pytest.fail("forked from a threaded process"))
    assert [s["sha256"] for s in filestats.compute_stats(files, LIMITS.max_pixels, workers=4)] == [
        sha256_file(f) for f in files
    ]


def test_no_library_warning_reaches_the_output(tmp_path):
    """Odd but readable files (a palette PNG whose transparency is bytes, a JPEG with a broken EXIF
    block) make Pillow warn; `data check` and `predict` print their own verdicts, not library warnings."""
    import subprocess
    import sys

    from PIL import Image

    batch = tmp_path / "batch" / "Normal"
    batch.mkdir(parents=True)
    pal = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (96, 1))).convert("P")
    pal.info["transparency"] = bytes(range(256))
    pal.save(batch / "palette.png", transparency=bytes(range(256)))
    with warnings_recorded() as w:
        Image.open(batch / "palette.png").convert("RGB")
    assert any("Transparency" in str(x.message) for x in w), "the fixture no longer makes Pillow warn"
    exe = Path(sys.executable).parent / "covid-cxr"
    r = subprocess.run([str(exe), "data", "check", str(tmp_path / "batch")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert "palette.png" in r.stdout + r.stderr
    assert "Warning" not in r.stderr and "warn" not in r.stderr.lower(), r.stderr


def warnings_recorded():
    import warnings

    cm = warnings.catch_warnings(record=True)
    w = cm.__enter__()
    warnings.simplefilter("always")

    class _Ctx:
        def __enter__(self):
            return w

        def __exit__(self, *exc):
            cm.__exit__(*exc)
    return _Ctx()
