"""prefect.yaml against a REAL `prefect server` and a REAL process worker, on loopback.

`prefect work-pool create --type process`, `prefect --no-prompt deploy --all` (the repo's own
prefect.yaml, from a copy of the checkout), `prefect worker start --pool ...`; a run of the
retrain deployment with an empty inbox goes through the pool and completes "nothing new" in
seconds. Also: prefect.yaml's cron strings are params.yaml's.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from flowkit import MAIN, VENV_BIN, api, sh, stop_group, summary_artifacts, wait_for

POOL = "covid-cxr-process"


def _prefect_yaml() -> dict:
    return yaml.safe_load((MAIN / "prefect.yaml").read_text())


def test_prefect_yaml_crons_are_the_params_ones():
    params = yaml.safe_load((MAIN / "params.yaml").read_text())
    deps = {d["entrypoint"]: d for d in _prefect_yaml()["deployments"]}
    assert [s["cron"] for s in deps["flows/retrain.py:retrain"]["schedules"]] == [params["schedule"]["cron"]]
    assert [s["cron"] for s in deps["flows/monitor.py:monitor"]["schedules"]] == [params["monitor"]["cron"]]
    assert {d["work_pool"]["name"] for d in deps.values()} == {POOL}


@pytest.mark.e2e
def test_deploy_all_and_a_process_worker_run_the_retrain_deployment(prefect_server, tmp_path):
    proj = tmp_path / "checkout"
    proj.mkdir()
    for f in ("prefect.yaml", "params.yaml"):
        shutil.copy2(MAIN / f, proj / f)
    shutil.copytree(MAIN / "flows", proj / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    empty_inbox = tmp_path / "inbox"
    empty_inbox.mkdir()
    env = {**prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    env.pop("COVID_CXR_ROOT", None)
    prefect = str(VENV_BIN / "prefect")
    url = prefect_server["PREFECT_API_URL"]

    sh([prefect, "work-pool", "create", POOL, "--type", "process"], proj, env=env)
    sh([prefect, "--no-prompt", "deploy", "--all"], proj, env=env, timeout=300)

    for flow_name, dep in (("retrain", "weekly-retrain"), ("monitor", "daily-drift-check")):
        d = api(url, "GET", f"/deployments/name/{flow_name}/{dep}")
        assert d["work_pool_name"] == POOL and d["schedules"][0]["active"] is True
        assert d["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(proj)

    log_path = tmp_path / "worker.log"
    log = open(log_path, "w")
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", POOL, "--type", "process"], cwd=tmp_path,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):
            run = run_deployment("retrain/weekly-retrain", parameters={"inbox": str(empty_inbox)},
                                 timeout=0, as_subflow=False)

        def finished():
            assert worker.poll() is None, log_path.read_text()[-3000:]
            r = api(url, "GET", f"/flow_runs/{run.id}")
            return r if r["state_type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

        done = wait_for(finished, 240, "the worker to run the deployment", interval=2)
    finally:
        stop_group(worker, grace=20)
        log.close()
    assert done["state_type"] == "COMPLETED", (done["state"], log_path.read_text()[-3000:])
    assert done["state"]["message"].startswith("nothing new"), done["state"]
    assert done["work_pool_name"] == POOL and done["infrastructure_pid"]  # run by the pool's worker
    # the run worked in the checkout `prefect deploy` recorded (root=None: the working directory)
    (art,) = summary_artifacts(url, done["id"])
    assert f"project: `{proj.resolve()}`" in art["data"] and "nothing new" in art["data"]
