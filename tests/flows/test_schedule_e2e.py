"""Scheduled retraining against a REAL `prefect server start --host 127.0.0.1` (temp PREFECT_HOME).

The project's prefect.yaml is deployed (`prefect deploy --all`) and run by a real process worker;
the test checks the server stored the cron schedule and created the upcoming Monday 03:00 runs,
then triggers runs of the deployment on a small temp project running the real chain (`covid-cxr` stages, smoke
profile, 20 real images per class + an inbox holding a batch with broken files), and checks it
Completed with its summary artifact and ledger entry; the next run (the batch renamed) says
"nothing new" without retraining; a run with strict gate thresholds must fail and keep the champion.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
import signal

import pytest
import yaml

from flowkit import (
    LOOSE_GATE,
    MAIN,
    SMALL_PARAMS,
    STRICT_GATE,
    api,
    deploy_project,
    make_batch,
    make_project,
    run_deployment_now,
    stop_group,
    summary_artifacts,
    task_runs,
    wait_for,
    wait_run,
)

pytestmark = pytest.mark.e2e

DEPLOYMENT = "retrain/weekly-retrain"   # prefect.yaml's


@pytest.fixture(scope="module")
def real_project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("sched"), kind="real", per_class=20, params=SMALL_PARAMS)


@pytest.fixture(scope="module")
def served(prefect_server, real_project):
    """prefect.yaml deployed from the project's root, and a process worker running its runs."""
    env = {**real_project.env, **{k: v for k, v in prefect_server.items() if k.startswith("PREFECT_")}}
    env.pop("COVID_CXR_ROOT", None)          # the runs find their project as deployed: their working directory
    log_path = real_project.root.parent / "worker.log"
    worker = deploy_project(real_project.root, env, log_path)
    url = prefect_server["PREFECT_API_URL"]
    try:
        dep = api(url, "GET", f"/deployments/name/{DEPLOYMENT}")
        yield {"url": url, "deployment": dep, "log": log_path, "env": env, "pid": worker.pid}
    finally:
        stop_group(worker, signal.SIGTERM, 30)


def _trigger(url: str, parameters: dict) -> str:
    """A run of the deployment; its prefect.yaml inbox (../shared/incoming) only when the test gives one."""
    return run_deployment_now(url, DEPLOYMENT, {"inbox": None, **parameters})


def _wait(url: str, run_id: str, timeout: float = 600) -> dict:
    return wait_run(url, run_id, timeout)


def _run(url: str, parameters: dict, timeout: float = 600) -> dict:
    return _wait(url, _trigger(url, parameters), timeout)


def test_deployment_is_stored_with_its_cron_schedule(served):
    (spec,) = [d for d in yaml.safe_load((MAIN / "prefect.yaml").read_text())["deployments"]
               if d["name"] == "weekly-retrain"]
    cron = spec["schedules"][0]["cron"]
    (sched,) = served["deployment"]["schedules"]
    assert sched["schedule"]["cron"] == cron and sched["active"] is True

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
    # the flow-run process is the worker's child that (indirectly) started the training
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
