"""Packaging (gate check, model store, bentoml build) and the promotion rule (promotion.py)."""
from __future__ import annotations

import json
import subprocess
import shutil
from pathlib import Path

import pytest
import yaml

import svcmodel
from svckit import base_env, run_cli
from covid_cxr.config import Paths
from covid_cxr.release.package import PackagingError, read_gate
from covid_cxr.release.promotion import is_better

CHAMP = {"accuracy": 0.98, "macro_f1": 0.975, "covid_recall": 0.98}


# ---------------------------------------------------------------- rule (unit)
def test_nothing_in_production_promotes():
    ok, why = is_better(CHAMP, None)
    assert ok and "nothing in production" in why[0]


def test_better_on_every_key_metric_promotes():
    ok, why = is_better({"accuracy": 0.99, "macro_f1": 0.98, "covid_recall": 0.99}, CHAMP)
    assert ok and "net improvement" in why[-1]


def test_a_tie_keeps_the_champion():
    ok, why = is_better(dict(CHAMP), CHAMP)
    assert not ok and "no net improvement" in why[-1]


def test_worse_model_is_not_better():
    ok, _ = is_better({"accuracy": 0.97, "macro_f1": 0.97, "covid_recall": 0.97}, CHAMP)
    assert not ok


def test_small_drop_within_tolerance_with_net_gain_promotes():
    ok, _ = is_better({"accuracy": 0.977, "macro_f1": 0.985, "covid_recall": 0.985}, CHAMP, tolerance=0.005)
    assert ok


def test_a_drop_beyond_tolerance_blocks_even_with_gains_elsewhere():
    ok, why = is_better({"accuracy": 0.999, "macro_f1": 0.999, "covid_recall": 0.97}, CHAMP, tolerance=0.005)
    assert not ok
    assert any("covid_recall" in r and "tolerance" in r for r in why)


def test_missing_metrics():
    assert is_better({"accuracy": 0.99}, CHAMP)[0] is False
    assert is_better(CHAMP, {"accuracy": "n/a"})[0] is True  # a champion without comparable metrics


# ---------------------------------------------------------------- gate file (unit)
@pytest.mark.parametrize("gate,msg", [
    (None, "missing"),
    ({"passed": False, "reasons": ["accuracy 0.5000 < 0.97"]}, "accuracy 0.5000 < 0.97"),
    ({"passed": "true"}, "did not pass"),
    ({"reasons": []}, "did not pass"),
])
def test_read_gate_refuses(tmp_path, gate, msg):
    paths = Paths(tmp_path)
    if gate is not None:
        paths.gate.parent.mkdir(parents=True)
        paths.gate.write_text(json.dumps(gate))
    with pytest.raises(PackagingError, match=msg):
        read_gate(paths)


def test_read_gate_accepts_passed(tmp_path):
    paths = Paths(tmp_path)
    paths.gate.parent.mkdir(parents=True)
    paths.gate.write_text(json.dumps({"passed": True, "reasons": []}))
    assert read_gate(paths)["passed"] is True


# ---------------------------------------------------------------- CLI + real BentoML store
def store_listing(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.glob("*/covid_cxr/*"))


@pytest.mark.e2e
def test_package_builds_a_bento_pinned_to_the_model(packaged, bentoml_home, test_model_dir):
    rec = packaged["record"]
    for k in ("bento", "model", "metrics", "data_md5", "params_hash"):
        assert rec.get(k), k
    # a pure function of its inputs: no time, no commit, no path of this machine
    assert not {"built_at", "git_sha", "model_path"} & set(rec)
    assert not [v for v in rec.values() if isinstance(v, str) and str(bentoml_home) in v]
    meta = json.loads((test_model_dir / "model.json").read_text())
    name, ver = rec["model"].split(":")
    model_dir = bentoml_home / "models" / name / ver
    my = yaml.safe_load((model_dir / "model.yaml").read_text())
    assert my["labels"]["gate"] == "passed"
    assert my["labels"]["data_md5"] == meta["data_md5"]
    history = subprocess.run(["git", "rev-list", "HEAD"], cwd=packaged["root"], capture_output=True, text=True)
    assert my["labels"]["git_sha"] in history.stdout.split()   # provenance as a label of the stored model
    assert my["labels"]["params_hash"] == rec["params_hash"]
    assert my["metadata"]["metrics"]["accuracy"] == pytest.approx(rec["metrics"]["accuracy"])
    for f in ("model.safetensors", "model.json", "ood.safetensors", "clean_head.safetensors", "metrics.json", "gate.json",
              "reference.csv"):
        assert (model_dir / f).is_file(), f
    assert (model_dir / "model.safetensors").read_bytes() == (test_model_dir / "model.safetensors").read_bytes()

    bname, bver = rec["bento"].split(":")
    bdir = bentoml_home / "bentos" / bname / bver
    by = yaml.safe_load((bdir / "bento.yaml").read_text())
    assert [m["tag"] for s in by["services"] for m in s["models"]] == [rec["model"]]
    assert by["labels"]["gate"] == "passed" and by["labels"]["data_md5"] == meta["data_md5"]
    for f in ("covid_cxr/serve/service.py", "covid_cxr/serve/bentoml_private.py", "covid_cxr/data/preprocess.py",
              "covid_cxr/model/gradcam.py", "covid_cxr/serve/web/index.html", "covid_cxr/serve/web/app.js"):
        assert (bdir / "src" / f).is_file(), f
    reqs = (bdir / "env" / "python" / "requirements.txt").read_text()
    assert "torch==" in reqs and "bentoml==" in reqs


@pytest.mark.e2e
def test_failed_gate_refuses_and_changes_nothing(service_tmp, bentoml_home, test_model_dir, packaged):
    root = svcmodel.write_project(service_tmp / "proj-failed", test_model_dir, passed=False, accuracy=0.5)
    prod = root / "registry" / "production.json"
    prod.parent.mkdir(parents=True)
    shutil.copy2(packaged["root"] / "registry" / "production.json", prod)
    before_prod = prod.read_bytes()
    before_store = store_listing(bentoml_home)
    env = base_env(bentoml_home, root)
    r = run_cli(["package"], root, env)
    assert r.returncode == 1
    assert "did not pass the evaluation gate" in r.stderr and "accuracy 0.5000 < 0.97" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (root / "artifacts" / "bento.json").exists()

    # the dvc stage's form: the refusal is recorded, exit 0 (so `dvc exp run` keeps the experiment)
    r = run_cli(["package", "--if-passed"], root, env)
    assert r.returncode == 0, r.stderr
    assert "not packaged" in r.stderr and "accuracy 0.5000 < 0.97" in r.stderr
    rec = json.loads((root / "artifacts" / "bento.json").read_text())
    assert rec["packaged"] is False and rec["bento"] is None and rec["gate"]["reasons"] == ["accuracy 0.5000 < 0.97"]
    # and promote refuses what was not packaged
    r = run_cli(["promote"], root, env)
    assert r.returncode == 1 and "nothing was packaged" in r.stderr
    assert prod.read_bytes() == before_prod
    assert store_listing(bentoml_home) == before_store


def test_promote_refuses_a_model_that_failed_the_gate(tmp_path, monkeypatch):
    """Even with --force, a model whose store label says the gate failed never reaches production."""
    from covid_cxr.release import registry as release

    monkeypatch.setattr(release, "describe", lambda tag: {
        "bento": "covid_cxr:x", "model": "covid_cxr:m", "gate": "failed", "metrics": dict(CHAMP)})
    monkeypatch.setattr(release, "publish", lambda *a, **k: pytest.fail("nothing may be published"))
    with pytest.raises(release.PromotionError, match="did not pass the evaluation gate"):
        release.promote(Paths(tmp_path), "covid_cxr:x", force=True)
    assert not Paths(tmp_path).production.exists()


def test_serve_without_production_says_so(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    r = run_cli(["serve", "--port", "3999"], tmp_path, base_env(tmp_path / "bhome", tmp_path), timeout=60)
    assert r.returncode == 1
    assert "nothing is in production yet" in r.stderr


def test_serve_with_a_missing_bento_or_model_dir_says_so(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "production.json").write_text(json.dumps({"bento": "covid_cxr:doesnotexist"}))
    env = base_env(tmp_path / "bhome", tmp_path)
    r = run_cli(["serve", "--port", "3999"], tmp_path, env, timeout=120)
    assert r.returncode == 1 and "not in the BentoML store" in r.stderr and "covid-cxr pull-production" in r.stderr
    r = run_cli(["serve", "--model-dir", str(tmp_path)], tmp_path, env, timeout=60)
    assert r.returncode == 1 and "not a model directory (no model.json)" in r.stderr and "train first" not in r.stderr
    r = run_cli(["serve", "--model-dir", str(tmp_path / "gone")], tmp_path, env, timeout=60)
    assert r.returncode == 1 and "no such directory" in r.stderr
    assert "⏱" not in r.stderr           # no timing line after an error


def test_promotion_compares_with_the_gates_rescored_champion(tmp_path):
    """Same test split for both models: the gate's re-scoring wins over production's old record."""
    from covid_cxr.release.promotion import champion_metrics

    paths = Paths(tmp_path)
    paths.gate.parent.mkdir(parents=True)
    prod = {"bento": "covid_cxr:champ", "metrics": CHAMP}
    rescored = {"accuracy": 0.9, "macro_f1": 0.9, "covid_recall": 0.9}
    paths.gate.write_text(json.dumps({"passed": True, "champion": {"bento": "covid_cxr:champ", "metrics": rescored}}))
    assert champion_metrics(paths, prod) == rescored
    paths.gate.write_text(json.dumps({"passed": True, "champion": {"bento": "covid_cxr:other", "metrics": rescored}}))
    assert champion_metrics(paths, prod) == CHAMP  # the gate judged another champion: the record's metrics
    assert champion_metrics(paths, None) is None
