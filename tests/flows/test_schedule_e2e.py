"""Scheduled retraining against a REAL `prefect server start --host 127.0.0.1` (temp PREFECT_HOME).

flows/deploy.py serves the deployment with its cron schedule; the test checks the server stored
the schedule and created the upcoming Monday 03:00 runs, then triggers a run with
`run_deployment` on a small temp project running the real chain (`covid-cxr` stages, smoke
profile, 20 real images per class + an inbox holding a batch with broken files), and checks it
Completed with its summary artifact and ledger entry; the next run (the batch renamed) says
"nothing new" without retraining; a run with strict gate thresholds must fail and keep the champion.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from flowkit import (
    LOOSE_GATE,
    MAIN,
    SMALL_PARAMS,
    STRICT_GATE,
    api,
    make_batch,
    make_project,
    stop_group,
    summary_artifacts,
    task_runs,
    wait_for,
)

pytestmark = pytest.mark.e2e

DEPLOYMENT = "e2e-retrain"


@pytest.fixture(scope="module")
def real_project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("sched"), kind="real", per_class=20, params=SMALL_PARAMS)


@pytest.fixture(scope="module")
def served(prefect_server, real_project):
    """`python flows/deploy.py` (flow.serve) running against the server, for the project."""
    env = {**real_project.env, **{k: v for k, v in prefect_server.items() if k.startswith("PREFECT_")}}
    log_path = real_project.root.parent / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, str(MAIN / "flows" / "deploy.py"), "--name", DEPLOYMENT,
         "--root", str(real_project.root), "--backoff-s", "0.5"],
        cwd=MAIN, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = prefect_server["PREFECT_API_URL"]

    def registered():
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return api(url, "GET", f"/deployments/name/retrain/{DEPLOYMENT}")
        except Exception:
            return None

    try:
        dep = wait_for(registered, 120, "flows/deploy.py to register the deployment", interval=1)
        yield {"url": url, "deployment": dep, "log": log_path, "env": env, "pid": proc.pid}
    finally:
        stop_group(proc, signal.SIGINT, 30)  # Ctrl-C: the runner pauses the schedule and exits
        log.close()


def _trigger(url: str, parameters: dict) -> str:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        return str(run_deployment(f"retrain/{DEPLOYMENT}", parameters=parameters, timeout=0, as_subflow=False).id)


def _wait(url: str, run_id: str, timeout: float = 600) -> dict:
    def finished():
        run = api(url, "GET", f"/flow_runs/{run_id}")
        return run if run["state_type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

    return wait_for(finished, timeout, f"flow run {run_id} to finish", interval=2)


def _run(url: str, parameters: dict, timeout: float = 600) -> dict:
    return _wait(url, _trigger(url, parameters), timeout)


def test_deployment_is_stored_with_its_cron_schedule(served):
    cron = yaml.safe_load((MAIN / "params.yaml").read_text())["schedule"]["cron"]
    (sched,) = served["deployment"]["schedules"]
    assert sched["schedule"]["cron"] == cron and sched["active"] is True
    assert served["deployment"]["parameters"]["root"]

    # the server's scheduler turns it into upcoming runs at the cron times
    dep_id = served["deployment"]["id"]
    body = {"deployments": {"id": {"any_": [dep_id]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
    runs = wait_for(lambda: api(served["url"], "POST", "/flow_runs/filter", body), 90, "scheduled runs", interval=2)
    now = dt.datetime.now(dt.timezone.utc)
    starts = sorted(dt.datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00")) for r in runs)
    assert all(cron_matches(cron, s) for s in starts), starts
    # the first one is the next matching minute after now (checked minute by minute, at most 31 days)
    t = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    while not cron_matches(cron, t) and t < now + dt.timedelta(days=31):
        t += dt.timedelta(minutes=1)
    assert starts[0] == t


def _field(spec: str, value: int, lo: int) -> bool:
    for part in spec.split(","):
        rng, _, step = part.partition("/")
        if rng == "*":
            a, b = lo, 10**6
        elif "-" in rng:
            a, b = map(int, rng.split("-"))
        else:
            a = b = int(rng)
        if a <= value <= b and (value - a) % int(step or 1) == 0:
            return True
    return False


def cron_matches(cron: str, t: dt.datetime) -> bool:
    """A plain 5-field cron matcher (numbers, *, a-b, lists, /step; UTC), independent of Prefect's."""
    minute, hour, dom, month, dow = cron.split()
    day_ok = [_field(dom, t.day, 1), _field(dow.replace("7", "0"), (t.weekday() + 1) % 7, 0)]
    days = all(day_ok) if "*" in (dom, dow) else any(day_ok)
    return _field(minute, t.minute, 0) and _field(hour, t.hour, 0) and _field(month, t.month, 1) and days


def test_inbox_run_completes_with_summary_next_says_nothing_new_then_strict_gate_keeps_champion(
        served, real_project, tmp_path):
    inbox = tmp_path / "inbox"
    batch, good, bad = make_batch(inbox, good_per_class=3)
    before = real_project.images()

    run = _run(served["url"], {"inbox": str(inbox)})

    assert run["state_type"] == "COMPLETED", (run["state"]["message"], served["log"].read_text()[-4000:])
    after = real_project.images()
    for cls, names in good.items():
        assert after[cls] == before[cls] | names
    for rel in bad:
        assert (real_project.root / "artifacts" / "quarantine" / batch.name / rel).exists()
    gate = json.loads((real_project.root / "artifacts" / "gate.json").read_text())
    assert gate["passed"] is True
    prod = json.loads(real_project.production.read_text())
    (art,) = summary_artifacts(served["url"], run["id"])
    md = art["data"]
    assert "Gate: PASSED" in md and f"promoted {prod['bento']}" in md
    assert f"| {batch.name} | {sum(map(len, good.values())) + len(bad)} | {sum(map(len, good.values()))} |" in md
    assert "up to date" in real_project.dvc("status", "--with-deps", "gate").lower()  # dvc.lock records the chain
    (entry,) = json.loads(real_project.ledger.read_text())["batches"].values()
    assert entry["batch"] == batch.name and entry["flow_run"] == run["id"]
    # the promotion shipped the Bento: exported under registry/bentos and pushed to the DVC remote
    assert "in sync" in real_project.dvc("status", "-c", prod["export"] + ".dvc").lower()

    # the next run, the same batch under another name: nothing new, no retraining
    champion = real_project.production.read_bytes()
    shutil.move(batch, inbox / "batch-test-copy")
    lock = (real_project.root / "dvc.lock").read_bytes()

    again = _run(served["url"], {"inbox": str(inbox)})

    assert again["state_type"] == "COMPLETED" and again["state"]["message"].startswith("nothing new"), again["state"]
    assert {t["name"].rsplit("-", 1)[0] for t in task_runs(served["url"], again["id"])} == {"scan-inbox", "summary"}
    assert (real_project.root / "dvc.lock").read_bytes() == lock and real_project.production.read_bytes() == champion
    assert real_project.images() == after

    # same model, strict thresholds: only the gate stage re-runs, and it fails
    real_project.set_params({"gate": STRICT_GATE})

    run2 = _run(served["url"], {})

    assert run2["state_type"] == "FAILED"
    assert "gate failed" in run2["state"]["message"]
    assert real_project.production.read_bytes() == champion
    md2 = summary_artifacts(served["url"], run2["id"])[0]["data"]
    assert "Gate: FAILED" in md2 and "production.json unchanged" in md2


def test_run_killed_during_training_completes_when_rerun(served, real_project, tmp_path):
    import psutil

    # any champion comparison passes: a smoke model retrained on more films may score lower on a
    # 9-film test split, and this test is about resuming, not about the champion rule
    real_project.set_params({"gate": {**LOOSE_GATE, "champion_tolerance": 1.0}})
    batch, good, _ = make_batch(tmp_path, good_per_class=3, bad=False, offset=10, name="batch-kill")
    root = str(real_project.root)

    def training():  # the real `covid-cxr train` that `dvc repro` started for this project
        for p in psutil.process_iter(["cmdline", "cwd"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "covid-cxr train" in cmd and p.info["cwd"] == root:
                return p
        return None

    run_id = _trigger(served["url"], {"incoming": [str(batch)]})
    trainer = wait_for(training, 300, "the served run to start training", interval=0.2)
    # the flow-run process is the served runner's child that (indirectly) started the training
    flow_proc = next(p for p in [trainer, *trainer.parents()] if p.ppid() == served["pid"])
    victims = [flow_proc, *flow_proc.children(recursive=True)]
    assert trainer in victims and trainer.is_running()
    for v in victims:  # kill -9 the whole run: flow, dvc repro, training
        try:
            v.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)

    killed = _wait(served["url"], run_id, 120)
    assert killed["state_type"] in {"CRASHED", "FAILED"}, killed["state"]
    assert "train" in real_project.dvc("status", "--with-deps", "gate")  # training did not finish: not in dvc.lock

    again = _run(served["url"], {"incoming": [str(batch)]})

    assert again["state_type"] == "COMPLETED", (again["state"]["message"], served["log"].read_text()[-4000:])
    assert "up to date" in real_project.dvc("status", "--with-deps", "gate").lower()
    images = real_project.images()
    assert all(names <= images[cls] for cls, names in good.items())
    assert json.loads((real_project.root / "artifacts" / "gate.json").read_text())["passed"] is True
    md = summary_artifacts(served["url"], again["id"])[0]["data"]
    assert "Gate: PASSED" in md and "| batch-kill | 9 | 0 | 9 |" in md  # the killed run had imported them
