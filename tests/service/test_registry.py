"""Promotion is a decision: `dvc repro` / `dvc exp run` build Bentos and never touch production;
`covid-cxr promote` applies the champion rule and commits registry/production.json;
`covid-cxr rollback` restores the previous version the same way.

Real DVC (a project whose dvc.yaml is the real package stage), real `covid-cxr package` /
`promote` / `rollback`, a real BentoML store and a temporary DVC remote; the metrics the rule
compares are written by the test, so every decision is known in advance.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import svcmodel
from svckit import VENV_BIN, base_env, run_cli

pytestmark = pytest.mark.e2e

WORSE = {"accuracy": 0.97, "macro_f1": 0.97, "covid_recall": 0.971}
BETTER = {"accuracy": 0.99, "macro_f1": 0.99, "covid_recall": 0.99}


def test_dvc_builds_but_never_promotes_promote_decides_rollback_restores(service_tmp, bentoml_home,
                                                                           test_model_dir):
    root = service_tmp / "proj-registry"
    remote = service_tmp / "registry-dvc-remote"
    svcmodel.write_project(root, test_model_dir, passed=True)  # champion-grade: 0.98 / 0.975 / 0.98
    env = base_env(bentoml_home, root)
    svcmodel.init_repo(root, remote, env, dvc_yaml=svcmodel.PACKAGE_ONLY_DVC_YAML)
    record = root / "registry" / "production.json"

    def sh(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert not ok or r.returncode == 0, f"{cmd} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    dvc = lambda *a, **k: sh(str(VENV_BIN / "dvc"), *a, **k)  # noqa: E731
    git = lambda *a: sh("git", *a).stdout.strip()  # noqa: E731
    built = lambda: json.loads((root / "artifacts" / "bento.json").read_text())  # noqa: E731
    prod = lambda: json.loads(record.read_text())  # noqa: E731

    # 1. the pipeline builds a Bento; nothing is promoted
    dvc("repro")
    a = built()
    assert a["packaged"] is True and a["bento"] and not record.exists()

    # 2. promote: the record, the exported Bento on the DVC remote, one commit of exactly those files
    head = git("rev-parse", "HEAD")
    r = run_cli(["promote"], root, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert prod()["bento"] == a["bento"] and prod()["model"] == a["model"] and prod()["action"] == "promote"
    export = root / prod()["export"]
    assert export.is_file() and (root / (prod()["export"] + ".dvc")).is_file()
    assert git("rev-parse", "HEAD^") == head and git("log", "-1", "--format=%s").startswith(f"promote {a['bento']}")
    # the record, the export's .dvc file, and dvc.lock of the run that built it (its outputs were pushed too)
    assert sorted(git("show", "--name-only", "--format=", "HEAD").split()) == sorted(
        ["registry/production.json", prod()["export"] + ".dvc", "registry/bentos/.gitignore", "dvc.lock"])
    assert Path(prod()["remote"]).resolve() == remote.resolve()   # where another clone fetches it
    assert "in sync" in dvc("status", "-c", prod()["export"] + ".dvc").stdout.lower()
    assert any(p.is_file() for p in remote.rglob("*"))

    # 3. a worse candidate: `dvc repro` builds it and leaves production alone; the rule refuses it
    svcmodel.write_project(root, None, passed=True, **WORSE)
    before, head = record.read_bytes(), git("rev-parse", "HEAD")
    dvc("repro")
    w = built()
    assert w["bento"] != a["bento"] and record.read_bytes() == before and git("rev-parse", "HEAD") == head
    r = run_cli(["promote", w["bento"]], root, env)
    assert r.returncode == 2 and "champion stays" in r.stdout and record.read_bytes() == before
    r = run_cli(["promote", w["bento"], "--force"], root, env)  # a person overrides the rule
    assert r.returncode == 0, r.stdout + r.stderr
    assert prod()["bento"] == w["bento"] and prod()["action"] == "force"
    assert prod()["history"][0]["bento"] == a["bento"]

    # 4. a better model through `dvc exp run`: built, recorded as an experiment, still not promoted
    model_b = svcmodel.build_test_model(service_tmp / "model-b", image_size=96, seed=1)
    svcmodel.write_project(root, model_b, passed=True, **BETTER)
    before, head = record.read_bytes(), git("rev-parse", "HEAD")
    dvc("exp", "run", "-n", "better-model")
    b = built()
    assert b["bento"] not in (a["bento"], w["bento"])
    assert record.read_bytes() == before and git("rev-parse", "HEAD") == head
    assert "better-model" in dvc("exp", "list").stdout
    r = run_cli(["promote"], root, env)  # the rule: better on every key metric than the champion (w)
    assert r.returncode == 0 and "net improvement" in r.stdout, r.stdout + r.stderr
    assert prod()["bento"] == b["bento"] and prod()["action"] == "promote"

    # 5. rollback: the previous version, as a new commit; then back to the first one by name
    r = run_cli(["rollback"], root, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert prod()["bento"] == w["bento"] and prod()["action"] == "rollback"
    assert prod()["history"][0]["bento"] == b["bento"]
    r = run_cli(["rollback", "--to", a["bento"]], root, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert prod()["bento"] == a["bento"] and prod()["model"] == a["model"]
    subjects = git("log", "--format=%s", "--", "registry/production.json").splitlines()
    assert [s.split()[0] for s in subjects] == ["rollback", "rollback", "promote", "promote", "promote"]
    assert git("status", "--porcelain", "--", "registry") == ""  # every change is committed

    # the production Bento loads its own model, although the newest in the store is b's
    code = f"""
import bentoml
from bentoml._internal.service.loader import load
assert str(bentoml.models.get("covid_cxr:latest").tag) == {b['model']!r}
svc = load({a['bento']!r})
print("MODEL", svc().model_tag)
"""
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=180)
    assert f"MODEL {a['model']}" in r.stdout, r.stdout + r.stderr[-3000:]

    # 6. a failed gate: `dvc repro` completes, package refuses with the reason, production unchanged
    svcmodel.write_project(root, test_model_dir, passed=False, accuracy=0.5)
    before = record.read_bytes()
    r = dvc("repro")
    assert "not packaged" in r.stdout + r.stderr and "accuracy 0.5000 < 0.97" in r.stdout + r.stderr
    assert built()["packaged"] is False and record.read_bytes() == before
