"""flows/monitor.py against a REAL temporary Prefect server (prefect_api): synthetic logs and reference.

No drift ends COMPLETED with the report as a markdown artifact; drift ends FAILED in the state
named `Drift` (and the server emits `prefect.flow-run.Drift`, what an automation matches); too few
records end COMPLETED / `Inconclusive`; a missing reference is a plain failure.
"""
from __future__ import annotations

import datetime as dt
import json

import pytest

import monitorkit as mk
from flowkit import api, wait_for

N_REF, N_WIN = 1000, 400


@pytest.fixture
def proj(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((mk.REPO / "params.yaml").read_text())
    mk.write_reference(tmp_path, mk.sample(N_REF, seed=1))
    monkeypatch.setenv("COVID_CXR_ROOT", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("COVID_CXR_PREDICTION_LOG", raising=False)
    return tmp_path


def recent_log(proj, rows):
    """Records up to a minute ago, where the service writes them by default (the run reads that path
    on its own): inside the default window (params.yaml monitor.window) of a run now."""
    from covid_cxr.serve.monitoring.predlog import configured_path

    now = dt.datetime.now(dt.timezone.utc)
    return mk.write_log(configured_path(), rows, start=now - dt.timedelta(minutes=len(rows) + 1))


def artifacts(url: str, state) -> list[dict]:
    arts = api(url, "POST", "/artifacts/filter", {"flow_runs": {"id": {"any_": [str(state.state_details.flow_run_id)]}}})
    return [a for a in arts if a.get("type") == "markdown" and a.get("key") == "drift-report"]


def flow_run(url: str, state) -> dict:
    return api(url, "GET", f"/flow_runs/{state.state_details.flow_run_id}")


def test_no_drift_completes_with_the_report_artifact(prefect_api, proj):
    import monitor

    recent_log(proj, mk.sample(N_WIN, seed=2))
    state = monitor.monitor(root=str(proj), return_state=True)
    assert state.is_completed() and state.name == "Completed", state.message
    assert "no drift" in state.message
    run = flow_run(prefect_api, state)
    assert run["state_type"] == "COMPLETED" and run["state_name"] == "Completed"
    (art,) = artifacts(prefect_api, state)
    assert "# Prediction drift: no drift" in art["data"] and "| class mix (chi-square) | no |" in art["data"]
    (rep,) = (proj / "logs" / "monitor").glob("drift-*.json")  # the default report location
    assert json.loads(rep.read_text())["status"] == "ok" and rep.with_suffix(".md").exists()


def test_drift_fails_in_the_drift_state_an_automation_can_match(prefect_api, proj):
    import monitor

    recent_log(proj, mk.sample(N_WIN, seed=3, mix=(0.70, 0.20, 0.10), novelty=(1.0, 1.0)))
    state = monitor.monitor(root=str(proj), report=str(proj / "r.json"), return_state=True)
    assert state.is_failed() and state.name == "Drift"
    assert state.message.startswith("drift: ") and "class mix" in state.message and "novelty score" in state.message
    run = flow_run(prefect_api, state)
    assert run["state_type"] == "FAILED" and run["state_name"] == "Drift"
    assert run["state"]["message"] == state.message
    (art,) = artifacts(prefect_api, state)
    assert "# Prediction drift: DRIFT" in art["data"]
    assert "| class mix (chi-square) | **DRIFT** |" in art["data"]
    assert "| novelty score (two-sample KS) | **DRIFT** |" in art["data"]
    assert json.loads((proj / "r.json").read_text())["status"] == "drift"

    body = {"filter": {"event": {"name": ["prefect.flow-run.Drift"]},
                       "resource": {"id": [f"prefect.flow-run.{state.state_details.flow_run_id}"]}}}
    (ev,) = wait_for(lambda: api(prefect_api, "POST", "/events/filter", body)["events"], 60,
                     "the prefect.flow-run.Drift event")
    # prefect.yaml's retrain-on-drift trigger (and the alert, covid-cxr alerts) match it
    from covid_cxr.orchestrate.automations import drift_trigger_spec

    trig = drift_trigger_spec(mk.REPO)
    assert ev["event"] in trig["expect"]
    assert any(all(r.get(k) == v for k, v in trig["match_related"].items()) for r in ev["related"])


def test_too_few_records_is_inconclusive(prefect_api, proj):
    import monitor

    recent_log(proj, mk.sample(20, seed=4))
    state = monitor.monitor(root=str(proj), report=str(proj / "r.json"), return_state=True)
    assert state.is_completed() and state.name == "Inconclusive" and "too few records" in state.message
    assert flow_run(prefect_api, state)["state_name"] == "Inconclusive"
    (art,) = artifacts(prefect_api, state)
    assert "too few records to judge" in art["data"]


def test_a_missing_reference_is_a_plain_failure(prefect_api, proj):
    import monitor

    recent_log(proj, mk.sample(N_WIN, seed=5))
    (proj / "artifacts" / "eval" / "predictions.csv").unlink()
    state = monitor.monitor(root=str(proj), return_state=True)
    assert state.is_failed() and state.name == "Failed" and "predictions.csv does not exist" in state.message
    (art,) = artifacts(prefect_api, state)
    assert "check FAILED" in art["data"]
