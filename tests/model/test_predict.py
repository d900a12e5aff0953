"""`covid-cxr predict`: inputs in every form, the CSV, resume, heat maps, and the same answers as
`LoadedModel.predict` (the service's forward and verdict), with a small real model."""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "service"))
import imgfactory as fx  # noqa: E402

from covid_cxr.config import CLASSES, KAGGLE_ROOT  # noqa: E402
from covid_cxr.serve.predict import resolve_model, run_predict  # noqa: E402
from covid_cxr.serve.predictcsv import COLUMNS, PROB_COLUMNS, ResultsCsv  # noqa: E402
from covid_cxr.serve.predicterror import PredictError  # noqa: E402

PER_CLASS = 3


@pytest.fixture(scope="module")
def real() -> dict[str, list[Path]]:
    r = fx.real_images(PER_CLASS + 12)
    if not r:
        pytest.skip(f"{fx.BATCH_001} is not available (set COVID_CXR_SHARED)")
    # past the 12 per class the test model was fitted on: some of these get refer verdicts
    return {c: files[-PER_CLASS:] for c, files in r.items()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import svcmodel

    return svcmodel.build_test_model(tmp_path_factory.mktemp("predict-model") / "m", image_size=96)


@pytest.fixture(scope="module")
def model(model_dir):
    from covid_cxr.model.checkpoint import load_model

    return load_model(model_dir)


@pytest.fixture
def flat(tmp_path, real) -> Path:
    """<Class>/*.png plus one text file posing as an image, and a README (left out)."""
    root = tmp_path / "flat"
    for c, files in real.items():
        (root / c).mkdir(parents=True)
        for f in files:
            shutil.copy2(f, root / c / f.name)
    fx.text_file(root / "Normal" / "notes.png", "not a PNG\n" * 10)
    (root / "README.md").write_text("batch notes\n")
    return root


def read_csv(p: Path) -> list[dict[str, str]]:
    with open(p, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def run(sources, out, model, **kw):
    return run_predict([str(s) for s in sources], out, model, "test-model", progress=False, **kw)


def test_flat_folder_columns_labels_and_bad_file(tmp_path, flat, model):
    out = tmp_path / "p.csv"
    s = run([flat], out, model, batch_size=4)
    rows = read_csv(out)
    assert tuple(rows[0]) == COLUMNS
    assert {"path", "label", "verdict", "reason", "novelty", "model", "error"} <= set(COLUMNS)
    assert PROB_COLUMNS == ("p_COVID", "p_Normal", "p_Viral_Pneumonia")
    assert len(rows) == 3 * PER_CLASS + 1 and s["scored"] == 3 * PER_CLASS
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("Normal/notes.png")
    assert bad[0]["error"] == "not_an_image" and "not a readable image" in bad[0]["error_detail"]
    assert bad[0]["label"] == "" and bad[0]["verdict"] == ""
    for r in rows:
        if r["error"]:
            continue
        assert r["true_label"] == Path(r["path"]).parent.name
        assert r["label"] in CLASSES and r["verdict"] in ("ok", "refer")
        assert (r["reason"] == "") == (r["verdict"] == "ok")
        assert sum(float(r[c]) for c in PROB_COLUMNS) == pytest.approx(1, abs=1e-5)
        assert r["model"] == "test-model" and len(r["sha256"]) == 64 and float(r["novelty"]) > 0
        assert r["path"].startswith(str(flat))
    assert s["left_out"] == {"README/licence": 1}
    assert s["errors"] == {"not_an_image": 1}


def test_kaggle_layout_skips_masks(tmp_path, real, model):
    root = tmp_path / "kaggle" / KAGGLE_ROOT
    for c, files in real.items():
        for sub in ("images", "masks"):
            (root / c / sub).mkdir(parents=True)
            shutil.copy2(files[0], root / c / sub / files[0].name)
    out = tmp_path / "k.csv"
    s = run([tmp_path / "kaggle"], out, model)
    rows = read_csv(out)
    assert len(rows) == 3 and not any("/masks/" in r["path"] for r in rows)
    assert sorted(r["true_label"] for r in rows) == sorted(CLASSES)
    assert s["left_out"] == {"masks/": 3}


def test_single_files_and_a_file_outside_a_class_folder(tmp_path, real, model):
    loose = tmp_path / "loose.png"
    shutil.copy2(real["COVID"][0], loose)
    out = tmp_path / "f.csv"
    run([real["Normal"][0], loose, loose], out, model)  # a repeated argument is scored once
    rows = read_csv(out)
    assert [r["path"] for r in rows] == [str(real["Normal"][0]), str(loose)]
    assert [r["true_label"] for r in rows] == ["Normal", ""]


def test_zip(tmp_path, flat, model):
    z = tmp_path / "batch.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(flat.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(flat).as_posix())
    out = tmp_path / "z.csv"
    s = run([z], out, model)
    rows = read_csv(out)
    assert len(rows) == 3 * PER_CLASS + 1 and s["scored"] == 3 * PER_CLASS
    assert all(r["path"].startswith(f"{z}::") for r in rows)
    ok = [r for r in rows if not r["error"]]
    assert all(r["true_label"] == r["path"].split("::")[1].split("/")[0] for r in ok)
    # the same films from the folder: the same answers
    ref = {Path(r["path"]).relative_to(flat).as_posix(): r for r in read_csv_of(tmp_path, flat, model)}
    for r in ok:
        m = ref[r["path"].split("::")[1]]
        assert (r["label"], r["verdict"], r["sha256"]) == (m["label"], m["verdict"], m["sha256"])
    # a second run resumes: the temporary folder differs, the rows' paths do not
    assert run([z], out, model)["skipped"] == 3 * PER_CLASS + 1


def read_csv_of(tmp_path, src, model):
    out = tmp_path / "ref.csv"
    run([src], out, model)
    return [r for r in read_csv(out) if not r["error"]]


def test_zip_member_outside_the_folder_is_refused(tmp_path, model, real):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("COVID/ok.png", real["COVID"][0].read_bytes())
        zf.writestr("../../escaped.png", real["COVID"][0].read_bytes())
    with pytest.raises(PredictError, match="outside the target folder"):
        run([z], tmp_path / "e.csv", model)
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path.parent / "escaped.png").exists()


def test_zip_bomb_is_refused_before_unpacking(tmp_path, model):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("COVID/zeros.png", b"\0" * (64 << 20))
    assert z.stat().st_size < 1 << 20
    with pytest.raises(PredictError, match="zip bomb"):
        run([z], tmp_path / "b.csv", model)


def test_resume_skips_and_a_changed_file_is_rescored(tmp_path, flat, model, real):
    out = tmp_path / "r.csv"
    first = run([flat], out, model, batch_size=4)
    rows1 = read_csv(out)
    again = run([flat], out, model, batch_size=4)
    assert again["scored"] == 0 and again["skipped"] == len(rows1) and read_csv(out) == rows1
    # change one film (another X-ray's bytes under the same name) and add a new one
    target = flat / "COVID" / real["COVID"][0].name
    shutil.copy2(real["Viral Pneumonia"][0], target)
    shutil.copy2(real["Normal"][0], flat / "Normal" / "new.png")
    third = run([flat], out, model, batch_size=4)
    assert third["scored"] == 2 and third["skipped"] == len(rows1) - 1
    rows3 = read_csv(out)
    assert len(rows3) == len(rows1) + 1                       # one row per path: the old one was dropped
    assert len({r["path"] for r in rows3}) == len(rows3)
    new = next(r for r in rows3 if r["path"] == str(target))
    old = next(r for r in rows1 if r["path"] == str(target))
    assert new["sha256"] != old["sha256"]
    assert first["scored"] == 3 * PER_CLASS
    # a new model scores everything again
    fourth = run_predict([str(flat)], out, model, "another-model", progress=False)
    assert fourth["scored"] == 3 * PER_CLASS + 1 and len(read_csv(out)) == len(rows3)


def test_a_torn_last_line_is_cut_off(tmp_path, flat, model):
    out = tmp_path / "t.csv"
    run([flat], out, model)
    n = len(read_csv(out))
    data = out.read_bytes()
    last = data[:-1].rfind(b"\n") + 1
    out.write_bytes(data[: last + 30])                        # killed halfway through the last row
    s = run([flat], out, model)
    assert s["scored"] + sum(s["errors"].values()) == 1 and len(read_csv(out)) == n
    assert out.read_bytes().endswith(b"\n")


def test_a_csv_of_another_layout_is_not_touched(tmp_path, flat, model):
    out = tmp_path / "other.csv"
    out.write_text("a,b\n1,2\n")
    with pytest.raises(PredictError, match="other columns"):
        run([flat], out, model)
    assert out.read_text() == "a,b\n1,2\n"


def test_heatmaps(tmp_path, flat, model):
    out, maps = tmp_path / "h.csv", tmp_path / "maps"
    s = run([flat], out, model, heatmaps=maps, batch_size=4)
    rows = [r for r in read_csv(out) if not r["error"]]
    assert s["heatmaps"] == len(rows) == len(list(maps.glob("*.png")))
    for r in rows:
        im = Image.open(r["heatmap"])
        src = Image.open(r["path"])
        assert im.mode == "RGB" and im.size == src.size      # 256 px films: shown at full size
        a = np.asarray(im).astype(int)
        assert (np.abs(a[..., 0] - a[..., 2]) > 30).any()     # coloured somewhere: a heat map, not the film


def test_same_answers_as_loaded_model_predict(tmp_path, real, model, model_dir):
    """Row by row: the same probabilities, novelty and verdict as one LoadedModel.predict call
    on the same films (decoded by scoring.load_film), whatever the batch size."""
    from covid_cxr.evaluation.scoring import load_film, score_paths

    fitted = fx.real_images(2)                                # films the test model was fitted on: verdict ok
    files = [f for c in CLASSES for f in fitted[c] + real[c]]
    films, rules = zip(*(load_film(f, model.size, model.min_side) for f in files))
    ref = model.predict(np.stack(films), not_xray=list(rules))
    assert "refer" in ref.verdict and "ok" in ref.verdict     # both verdicts are exercised
    for bs in (1, 4, 32):
        out = tmp_path / f"a{bs}.csv"
        run(files, out, model, batch_size=bs)
        rows = {r["path"]: r for r in read_csv(out)}
        for i, f in enumerate(files):
            r = rows[str(f)]
            assert r["label"] == ref.labels[i] and r["verdict"] == ref.verdict[i]
            assert (r["reason"] or None) == ref.reason[i]
            np.testing.assert_allclose([float(r[c]) for c in PROB_COLUMNS], ref.probs[i], atol=2e-6)
            assert float(r["novelty"]) == pytest.approx(float(ref.novelty[i]), abs=1e-3)
    sp, ok, errors = score_paths(model, files)
    assert ok == list(range(len(files))) and not errors and sp.verdict == ref.verdict


def test_not_an_xray_rules_and_too_small_as_the_service(tmp_path, model):
    d = tmp_path / "odd"
    fx.rgb_photo(d / "photo.png")
    fx.blank(d / "blank.png")
    fx.tiny(d / "tiny.png", size=12)
    out = tmp_path / "o.csv"
    run([d], out, model)
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    assert (rows["photo.png"]["verdict"], rows["photo.png"]["reason"]) == ("refer", "not_an_xray")
    assert (rows["blank.png"]["verdict"], rows["blank.png"]["reason"]) == ("refer", "not_an_xray")
    assert rows["tiny.png"]["error"] == "too_small"


def test_dicom_patient_fields_are_written_nowhere(tmp_path, real, model):
    gray = np.asarray(Image.open(real["COVID"][0]).convert("L"))
    d = tmp_path / "dicom" / "COVID"
    fx.dicom_file(d / "film.dcm", gray)
    fx.dicom_file(d / "ct.dcm", gray, modality="CT")          # refused: its reason must not echo the header
    out, maps = tmp_path / "d.csv", tmp_path / "dmaps"
    s = run([tmp_path / "dicom"], out, model, heatmaps=maps)
    assert s["scored"] == 1 and sum(s["errors"].values()) == 1
    blobs = [out.read_bytes()] + [p.read_bytes() for p in maps.iterdir()] + [p.name.encode() for p in maps.iterdir()]
    for secret in (fx.FAKE_PATIENT_NAME, fx.FAKE_PATIENT_ID, "Doe", "Testpatient", "PID-4242"):
        for b in blobs:
            assert secret.encode().lower() not in b.lower()
    im = Image.open(next(maps.iterdir()))
    assert not {k for k in im.info if k.lower() not in ("dpi", "gamma")}, im.info   # no text chunks


def test_results_csv_is_one_write_per_batch(tmp_path):
    out = tmp_path / "w.csv"
    rc = ResultsCsv(out)
    rows = [{"path": f"x{i}", "sha256": "ab", "model": "m"} for i in range(3)]
    rc.append(rows)
    assert len(read_csv(out)) == 3 and ResultsCsv(out).is_done("x1", "ab", "m")
    assert not ResultsCsv(out).is_done("x1", "cd", "m") and not ResultsCsv(out).is_done("x1", "ab", "m2")


def test_resolve_model(tmp_path, model_dir, monkeypatch):
    from covid_cxr.model.modelmeta import model_id

    d, tag = resolve_model(str(model_dir))
    assert d == model_dir.resolve() and tag == f"dir:{model_id(model_dir)}"   # what the service logs too
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    with pytest.raises(PredictError, match="not in the BentoML model store.*pull-production"):
        resolve_model("covid_cxr:doesnotexist")
    # a path is never read as a tag: no BentoML naming rules in the answer
    for spec, why in ((tmp_path / "gone", "no such model directory"), (tmp_path, "is not a model directory")):
        with pytest.raises(PredictError, match=why) as e:
            resolve_model(str(spec))
        assert "tag name" not in str(e.value).lower() and "lowercase" not in str(e.value).lower()
    from covid_cxr.config import Paths

    (tmp_path / "proj").mkdir()
    with pytest.raises(PredictError, match="nothing is in production"):
        resolve_model(None, Paths(tmp_path / "proj"))


def test_cli(tmp_path, flat, model_dir):
    """The console command end to end: summary on stderr, progress readable in a log."""
    import subprocess

    from covid_cxr.model.modelmeta import model_id

    from svckit import VENV_BIN

    out = tmp_path / "cli.csv"
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    r = subprocess.run([str(VENV_BIN / "covid-cxr"), "predict", str(flat), "--model", str(model_dir), "--out", str(out),
                        "--batch-size", "4", "--threads", "1"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "⏱" in r.stderr.splitlines()[-1]   # no library warnings; done
    # each scored film went to the prediction log, where the service writes it (the model named, no Bento)
    logged = [json.loads(x) for x in (tmp_path / "state" / "covid-cxr" / "predictions.jsonl").read_text().splitlines()]
    assert len(logged) == 3 * PER_CLASS and {r_["model"] for r_ in logged} == {f"dir:{model_id(model_dir)}"}
    assert all(r_["bento"] is None and r_["sha256"] for r_ in logged)
    assert "\r" not in r.stderr                               # not a terminal: plain lines
    assert "predict: 100%" in r.stderr and "images/s" in r.stderr
    assert f"Scored {3 * PER_CLASS} of {3 * PER_CLASS + 1} files" in r.stderr
    assert "errors: not_an_image 1" in r.stderr and "verdicts:" in r.stderr
    assert len(read_csv(out)) == 3 * PER_CLASS + 1
    r = subprocess.run([str(VENV_BIN / "covid-cxr"), "predict", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([str(VENV_BIN / "covid-cxr"), "predict", str(empty), "--model", str(model_dir),
                        "--out", str(tmp_path / "e.csv")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "no image files found" in r.stderr
    # files, but none could be scored: the job did not do its work
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.png").write_text("not an image\n")
    (junk / "empty.png").write_bytes(b"")
    r = subprocess.run([str(VENV_BIN / "covid-cxr"), "predict", str(junk), "--model", str(model_dir), "--no-log"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 1 and "none of the 2 files could be scored" in r.stderr
    assert "⏱" not in r.stderr and r.stdout.startswith("path,")              # the CSV still says why, row by row
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["cli.csv"]       # nothing written in the cwd
