"""One team, one week: the production loop on real parts, through the README's commands only.

Two clones of one project (A builds, B serves), a bare git origin, a writable temporary DVC remote
(the project's default remote, committed), a real `prefect server`, the project's prefect.yaml
deployed from A with a real process worker, a real `bentoml serve` of the production Bento in B,
and a local webhook receiver for the drift alert. Both clones run on this machine as one user: they
share the prediction log's home (XDG_STATE_HOME) and nothing else (each has its own BentoML store).

    1. A: dvc repro, covid-cxr promote, git push.
    2. B (fresh clone, no .dvc/config.local, no settings): covid-cxr pull-production, covid-cxr serve.
    3. B's log gets 250 predictions, 200 of them the unseen hospital's films.
    4. The deployed monitor finds drift; the automations fire: the webhook gets the alert and a
       retrain run is created.
    5. That run retrains on the inbox's new batch and gates it; A promotes (or forces it when the
       champion rule keeps the old model) and pushes.
    6. B pulls and serves the new production; A rolls back; B serves the old one again.

The smoke training profile and loose gate thresholds: the point is the loop, not the model. Each
step's wall time is printed (pytest -s) for the notes. Marked slow.
"""
from __future__ import annotations

import datetime as dt
import http.server
import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from flowkit import (
    EXTERNAL,
    LOOSE_GATE,
    SMALL_PARAMS,
    VENV_BIN,
    api,
    deploy_project,
    free_port,
    make_batch,
    make_project,
    run_deployment_now,
    sh,
    stop_group,
    wait_for,
    wait_run,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

STEPS: list[tuple[str, float]] = []


class Receiver(http.server.BaseHTTPRequestHandler):
    """The team's webhook: keeps every JSON body POSTed to it."""

    bodies: list = []

    def do_POST(self):  # noqa: N802
        n = int(self.headers.get("content-length") or 0)
        Receiver.bodies.append(json.loads(self.rfile.read(n) or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def step(name: str, t0: float) -> None:
    STEPS.append((name, time.monotonic() - t0))
    print(f"  team week: {name}: {STEPS[-1][1]:.0f} s", flush=True)


def cli(env: dict, root: Path, *args: str, ok: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([str(VENV_BIN / "covid-cxr"), *args], cwd=root, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert not ok or r.returncode == 0, f"covid-cxr {' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


class Served:
    """`covid-cxr serve` in a clone, on a free port (the production Bento)."""

    def __init__(self, root: Path, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.fh = open(log, "wb")
        self.log = log
        self.proc = subprocess.Popen([str(VENV_BIN / "covid-cxr"), "serve", "--port", str(self.port)], cwd=root,
                                     env=env, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True)

        def ready():
            assert self.proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 300, "covid-cxr serve to be ready", interval=1)

    def metadata(self) -> dict:
        return httpx.get(f"{self.url}/metadata", timeout=30).json()

    def stop(self) -> None:
        stop_group(self.proc, grace=20)
        self.fh.close()


def test_one_team_one_week(prefect_server, tmp_path):
    base = tmp_path / "week"
    # 100 films per class: a test split of ~45, enough for the monitor's reference at a relaxed minimum
    a = make_project(base, kind="real", per_class=100, params={
        **SMALL_PARAMS, "gate": {**LOOSE_GATE, "champion_tolerance": 1.0}, "monitor": {"min_records": 30}})
    state = tmp_path / "state"                     # the prediction log's home, shared by both clones
    url = prefect_server["PREFECT_API_URL"]
    prefect_env = {k: v for k, v in prefect_server.items() if k.startswith("PREFECT_")}
    env_a = {**a.env, **prefect_env, "XDG_STATE_HOME": str(state)}
    env_a.pop("COVID_CXR_ROOT", None)              # every command runs in its clone, as a person does
    origin = tmp_path / "origin.git"
    sh(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    a.git("remote", "add", "origin", str(origin))
    a.git("push", "-q", "origin", "HEAD:main")

    # ---- 1. A builds, promotes and pushes -------------------------------------------------------
    t0 = time.monotonic()
    a.dvc("repro")
    cli(env_a, a.root, "promote")
    a.git("push", "-q", "origin", "HEAD:main")
    first = json.loads(a.production.read_text())
    assert Path(first["remote"]).resolve() == a.remote.resolve()   # the record says where its Bento lives
    assert a.git("status", "--porcelain", "dvc.lock", "registry").strip() == ""   # run and record committed
    step("1. A: dvc repro, promote, push", t0)

    # ---- 2. B: a fresh clone with no local config pulls production and serves it ----------------
    t0 = time.monotonic()
    b_root = tmp_path / "b"
    sh(["git", "clone", "-q", "--branch", "main", str(origin), str(b_root)], tmp_path)
    assert not (b_root / ".dvc" / "config.local").exists()
    env_b = {k: v for k, v in env_a.items() if not k.startswith("PREFECT_")}
    env_b["BENTOML_HOME"] = str(tmp_path / "bentoml-b")
    cli(env_b, b_root, "pull-production")
    assert not (b_root / ".dvc" / "config.local").exists()
    # the run's outputs are on the remote too: a clone gets the model without training
    sh([str(VENV_BIN / "dvc"), "pull", "-q", "artifacts/model"], b_root, env=env_b)
    assert (b_root / "artifacts" / "model" / "model.safetensors").read_bytes() == \
        (a.root / "artifacts" / "model" / "model.safetensors").read_bytes()
    served = Served(b_root, env_b, tmp_path / "serve-b-1.log")
    try:
        md = served.metadata()
        assert md["bento"] == first["bento"] and md["production"] is True
        step("2. B: clone, pull-production, serve", t0)

        # ---- 3. B's log gets 250 predictions, 200 of them the unseen hospital's --------------------
        t0 = time.monotonic()
        unseen = sorted((EXTERNAL / "unseen_hospital_normal").glob("*.png"))[:200]
        others = sorted((EXTERNAL / "other_normal").glob("*.png"))[:50]
        assert len(unseen) == 200 and len(others) == 50
        with httpx.Client(base_url=served.url, timeout=120) as c:
            for i in range(0, 250, 10):
                batch = (unseen + others)[i:i + 10]
                r = c.post("/predict_batch", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in batch])
                assert r.status_code == 200, r.text
        log = state / "covid-cxr" / "predictions.jsonl"
        recs = wait_for(lambda: (lambda x: x if len(x) >= 250 else None)(
            [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []), 30, "250 log records")
        assert {r["bento"] for r in recs} == {first["bento"]} and {r["model"] for r in recs} == {first["model"]}
        step("3. B: 250 predictions logged", t0)
    finally:
        served.stop()

    # ---- 4. deployed monitor finds drift; the alert reaches the webhook; a retrain run is created -
    t0 = time.monotonic()
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    inbox = base / "shared" / "incoming"           # prefect.yaml's inbox, relative to A's root
    make_batch(inbox, good_per_class=3, bad=False, offset=20, name="batch-week")
    worker = deploy_project(a.root, env_a, tmp_path / "worker.log")
    try:
        cli(env_a, a.root, "alerts", "--webhook", hook)
        mon = wait_run(url, run_deployment_now(url, "monitor/daily-drift-check"), 600)
        assert mon["state_name"] == "Drift", (mon["state"], (tmp_path / "worker.log").read_text()[-3000:])
        alert = wait_for(lambda: Receiver.bodies, 180, "the drift alert at the webhook", interval=1)
        assert "drift" in json.dumps(alert[0]).lower()
        soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)).isoformat()
        retrain = {"deployments": {"name": {"any_": ["weekly-retrain"]}},      # not the cron's future runs
                   "flow_runs": {"expected_start_time": {"before_": soon}}}
        runs = wait_for(lambda: api(url, "POST", "/flow_runs/filter", retrain), 180,
                        "the retrain run the automation creates", interval=2)
        step("4. monitor: drift -> webhook alert + retrain run", t0)

        # ---- 5. that run retrains on the new batch and gates; A promotes or forces; A pushes ------
        t0 = time.monotonic()
        done = wait_run(url, runs[0]["id"], 1200)
        assert done["state_type"] == "COMPLETED", (done["state"], (tmp_path / "worker.log").read_text()[-4000:])
        assert json.loads((a.root / "artifacts" / "gate.json").read_text())["passed"] is True
    finally:
        stop_group(worker, signal.SIGTERM, 30)
        receiver.shutdown()
    built = json.loads((a.root / "artifacts" / "bento.json").read_text())
    now = json.loads(a.production.read_text())
    if now["bento"] != built["bento"]:             # the champion rule kept the old model: the override
        cli(env_a, a.root, "promote", "--force", built["bento"])
    print(f"  team week: the retrained model {'was promoted by the flow' if now['bento'] == built['bento'] else 'was kept out by the champion rule: promote --force'}")
    second = json.loads(a.production.read_text())
    assert second["bento"] == built["bento"] != first["bento"]
    assert a.git("status", "--porcelain", "registry").strip() == ""    # the promotion is a commit
    a.git("push", "-q", "origin", "HEAD:main")
    step("5. retrain + gate (flow), promote, push", t0)

    # ---- 6. B pulls and serves the new production; rollback; B serves the old one again --------
    t0 = time.monotonic()
    sh(["git", "pull", "-q", "origin", "main"], b_root, env=env_b)
    cli(env_b, b_root, "pull-production")
    served = Served(b_root, env_b, tmp_path / "serve-b-2.log")
    try:
        assert served.metadata()["bento"] == second["bento"]
    finally:
        served.stop()
    cli(env_a, a.root, "rollback")
    a.git("push", "-q", "origin", "HEAD:main")
    sh(["git", "pull", "-q", "origin", "main"], b_root, env=env_b)
    cli(env_b, b_root, "pull-production")
    served = Served(b_root, env_b, tmp_path / "serve-b-3.log")
    try:
        md = served.metadata()
        assert md["bento"] == first["bento"] and md["production"] is True
    finally:
        served.stop()
    step("6. B: new production, rollback, old one again", t0)
    print("team week steps: " + "; ".join(f"{n} {s:.0f} s" for n, s in STEPS))
