"""prefect.yaml against a REAL `prefect server` and a REAL process worker, on loopback.

`prefect work-pool create --type process`, `prefect --no-prompt deploy --all` (the repo's own
prefect.yaml, from a copy of the checkout), `prefect worker start --pool ...`; a run of the
retrain deployment with an empty inbox goes through the pool and completes "nothing new" in
seconds; its `retrain-on-drift` trigger is an automation that runs the retrain deployment. Also:
prefect.yaml is the one home of the schedules, and the one way to deploy.
"""
from __future__ import annotations

import shutil

import pytest
import yaml

from flowkit import MAIN, POOL, api, deploy_project, stop_group, summary_artifacts, wait_for


def _prefect_yaml() -> dict:
    return yaml.safe_load((MAIN / "prefect.yaml").read_text())


def test_prefect_yaml_is_the_one_home_of_the_schedules():
    params = yaml.safe_load((MAIN / "params.yaml").read_text())
    deps = {d["entrypoint"]: d for d in _prefect_yaml()["deployments"]}
    assert set(deps) == {"flows/retrain.py:retrain", "flows/monitor.py:monitor"}
    assert all(len(d["schedules"]) == 1 and d["concurrency_limit"] == 1 for d in deps.values())
    assert {d["work_pool"]["name"] for d in deps.values()} == {POOL}
    assert "schedule" not in params and "cron" not in params["monitor"]          # no second home for a cron
    assert not (MAIN / "flows" / "deploy.py").exists()                           # and no second way to deploy


@pytest.mark.e2e
def test_deploy_all_and_a_process_worker_run_the_retrain_deployment(prefect_server, tmp_path):
    proj = tmp_path / "checkout"
    proj.mkdir()
    shutil.copy2(MAIN / "params.yaml", proj / "params.yaml")
    empty_inbox = tmp_path / "inbox"
    empty_inbox.mkdir()
    env = dict(prefect_server)
    env.pop("COVID_CXR_ROOT", None)
    url = prefect_server["PREFECT_API_URL"]
    log_path = tmp_path / "worker.log"
    worker = deploy_project(proj, env, log_path)    # work pool, `prefect deploy --all`, a process worker

    for flow_name, dep in (("retrain", "weekly-retrain"), ("monitor", "daily-drift-check")):
        d = api(url, "GET", f"/deployments/name/{flow_name}/{dep}")
        assert d["work_pool_name"] == POOL and d["schedules"][0]["active"] is True
        assert d["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(proj)
    # prefect.yaml's trigger became an automation that runs the retrain deployment on drift
    autos = api(url, "POST", "/automations/filter", {})
    (auto,) = [a for a in autos if a["name"] == "retrain-on-drift"]
    assert auto["trigger"]["expect"] == ["prefect.flow-run.Drift"]
    assert auto["actions"][0]["type"] == "run-deployment"
    assert auto["actions"][0]["deployment_id"] == api(url, "GET", "/deployments/name/retrain/weekly-retrain")["id"]

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
    assert done["state_type"] == "COMPLETED", (done["state"], log_path.read_text()[-3000:])
    assert done["state"]["message"].startswith("nothing new"), done["state"]
    assert done["work_pool_name"] == POOL and done["infrastructure_pid"]  # run by the pool's worker
    # the run worked in the checkout `prefect deploy` recorded (root=None: the working directory)
    (art,) = summary_artifacts(url, done["id"])
    assert f"project: `{proj.resolve()}`" in art["data"] and "nothing new" in art["data"]
