"""Production is shared through git and a DVC remote: two clones, one remote.

Clone A runs the real chain (`dvc repro`: real `covid-cxr` stages, smoke profile, 20 real images
per class), which builds a Bento and promotes nothing; `covid-cxr promote` exports it to the DVC
remote and commits registry/production.json; `git push` to a bare repo. Clone B (its own empty
BentoML store) clones, runs `covid-cxr pull-production` and `covid-cxr serve` on loopback, and
serves the same model version, with no training: no model directory, no data.
"""
from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from flowkit import SMALL_PARAMS, VENV_BIN, free_port, make_project, sh, stop_group, wait_for

pytestmark = pytest.mark.e2e


def test_a_second_clone_serves_the_promoted_model_without_training(tmp_path):
    a = make_project(tmp_path / "a", kind="real", per_class=20, params=SMALL_PARAMS)
    cli = lambda proj_env, *args: sh([str(VENV_BIN / "covid-cxr"), *args], proj_env["COVID_CXR_ROOT"],  # noqa: E731
                                     env=proj_env, timeout=600)
    record = a.root / "registry" / "production.json"

    a.dvc("repro")  # the whole chain, package included
    built = json.loads((a.root / "artifacts" / "bento.json").read_text())
    assert built["packaged"] is True and not record.exists()  # built, registered, not promoted
    cli(a.env, "promote")
    prod = json.loads(record.read_text())
    assert prod["bento"] == built["bento"] and prod["model"] == built["model"]

    origin = tmp_path / "origin.git"
    sh(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    a.git("remote", "add", "origin", str(origin))
    a.git("push", "-q", "origin", "HEAD:main")

    b_root = tmp_path / "b"
    sh(["git", "clone", "-q", "--branch", "main", str(origin), str(b_root)], tmp_path)
    b_env = {**a.env, "COVID_CXR_ROOT": str(b_root), "BENTOML_HOME": str(tmp_path / "bentoml-b")}
    out = cli(b_env, "pull-production")
    assert prod["bento"] in out
    assert not (b_root / "artifacts" / "model").exists()  # nothing was trained in B
    assert not (b_root / "data").exists()  # nor its data pulled
    stored = {p.name for p in (tmp_path / "bentoml-b" / "bentos" / "covid_cxr").iterdir()} - {"latest"}
    assert stored == {prod["bento"].split(":")[1]}  # imported: exactly the production Bento

    port = free_port()
    log = open(tmp_path / "serve-b.log", "wb")
    proc = subprocess.Popen([str(VENV_BIN / "covid-cxr"), "serve", "--port", str(port)], cwd=b_root,
                            env={**b_env, "COVID_CXR_TORCH_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, (tmp_path / "serve-b.log").read_text(errors="replace")[-3000:]
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 240, "clone B's `covid-cxr serve` to be ready", interval=1)
        meta = httpx.get(f"{url}/metadata", timeout=30).json()
    finally:
        stop_group(proc, grace=20)
        log.close()
    assert meta["model"] == prod["model"]  # the same model version A promoted
    model_json = json.loads((a.root / "artifacts" / "model" / "model.json").read_text())
    assert meta["data_version"] == model_json["data_md5"] and meta["gate"]["passed"] is True
    assert not (b_root / "artifacts" / "model").exists()
