"""Drift monitoring flow: `covid-cxr monitor` on the prediction log, as a Prefect 3 flow.

A thin shell over `covid_cxr.serve.monitoring.monitor.run_monitor` (the same code as the CLI). One run:

    python flows/monitor.py [--since 7d] [--log PATH] [--report out.json]

Each run writes the JSON report and its page (default `logs/monitor/drift-<UTC time>.json`
+ `.md` + `_img/`), publishes the page as the markdown artifact `drift-report`, and ends in:

| outcome                  | final state (type / name)   | event an automation can match   |
|--------------------------|-----------------------------|---------------------------------|
| no drift                 | COMPLETED / `Completed`     | `prefect.flow-run.Completed`    |
| too few records to judge | COMPLETED / `Inconclusive`  | `prefect.flow-run.Inconclusive` |
| drift                    | FAILED / `Drift`            | `prefect.flow-run.Drift`        |
| an error (no reference…) | FAILED / `Failed`           | `prefect.flow-run.Failed`       |

Drift is a FAILED-type state so that the ordinary "a flow run failed" alerting fires on it, and
it has its own name (message: "drift: <what drifted>") so that an automation can tell it from a
crash: Prefect names each state-change event `prefect.flow-run.<state name>`. prefect.yaml
declares that automation on the retrain deployment (`retrain-on-drift`), and `covid-cxr alerts
--webhook URL` adds the one that notifies a person (covid_cxr/orchestrate/automations.py).

Deployed with the project's prefect.yaml (`daily-drift-check`, cron params.yaml `monitor.cron`).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed, Failed  # noqa: E402

from covid_cxr.serve.monitoring import monitor as mon  # noqa: E402
from covid_cxr.config import project_root  # noqa: E402

ARTIFACT_KEY = "drift-report"
DRIFT_STATE = "Drift"
INCONCLUSIVE_STATE = "Inconclusive"
FLOW_NAME = "monitor"


def default_report(root: Path, now: dt.datetime | None = None) -> Path:
    now = now or dt.datetime.now(dt.timezone.utc)
    return root / "logs" / "monitor" / f"drift-{now.strftime('%Y%m%dT%H%M%SZ')}.json"


@task(name="check-drift", retries=0, cache_policy=NO_CACHE)
def check_drift(report: str, log: str | None, since: str | None, until: str | None, reference: str | None,
                root: str) -> dict[str, Any]:
    rep = mon.run_monitor(report, log_path=log, since=since, until=until, reference=reference, root=root)
    get_run_logger().info("%s (report %s)", rep["verdict"], report)
    return rep


@task(name="publish-report", retries=1, retry_delay_seconds=[2.0], cache_policy=NO_CACHE)
def publish_report(markdown: str) -> None:
    create_markdown_artifact(markdown=markdown, key=ARTIFACT_KEY, description="Prediction drift check")


def final_state(report: dict[str, Any]):
    """The run's final state for a report: see the table in the module docstring."""
    if report["status"] == mon.DRIFT:
        return Failed(name=DRIFT_STATE, message=report["verdict"])
    if report["status"] == mon.INSUFFICIENT:
        return Completed(name=INCONCLUSIVE_STATE, message=report["verdict"])
    return Completed(message=report["verdict"])


@flow(name=FLOW_NAME, log_prints=True)
def monitor(
    since: str | None = None,
    until: str | None = None,
    log: str | None = None,
    reference: str | None = None,
    report: str | None = None,
    root: str | None = None,
):
    """Compare a window of the prediction log with the test split; end `Drift` (FAILED) on drift.

    Args:
        since: window start: ISO date/time or 30m/24h/7d/2w before now (default params.yaml monitor.window).
        until: window end (default now).
        log: prediction log (default: where the service writes it, predlog.configured_path); rotated files too.
        reference: reference predictions (default artifacts/eval/predictions.csv).
        report: JSON report path (default logs/monitor/drift-<UTC time>.json).
        root: project root (default $COVID_CXR_ROOT or the folder holding params.yaml).
    """
    logger = get_run_logger()
    root_p = Path(root).expanduser().resolve() if root else project_root()
    report_p = Path(report) if report else default_report(root_p)
    try:
        rep = check_drift(str(report_p), log, since, until, reference, str(root_p))
    except Exception as e:
        logger.error("drift check failed: %s", e)
        try:
            publish_report(f"# Prediction drift: check FAILED\n\n`{type(e).__name__}: {e}`\n")
        except Exception as pe:  # the run's own outcome matters more than its report
            logger.warning("could not publish the drift artifact: %s", pe)
        raise
    try:
        publish_report(mon.artifact_markdown(rep))
    except Exception as e:
        logger.warning("could not publish the drift artifact: %s", e)
    return final_state(rep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the drift-monitoring flow once, or serve it on a schedule.")
    ap.add_argument("--since", help="window start (ISO date/time or 30m/24h/7d/2w; default params monitor.window)")
    ap.add_argument("--until", help="window end (default now)")
    ap.add_argument("--log", help="prediction log (default: where the service writes it)")
    ap.add_argument("--reference", help="reference predictions CSV (default artifacts/eval/predictions.csv)")
    ap.add_argument("--report", help="JSON report to write (default logs/monitor/drift-<time>.json)")
    ap.add_argument("--root", help="project root (default: the folder holding params.yaml)")
    a = ap.parse_args(argv)
    root = Path(a.root).resolve() if a.root else project_root()
    state = monitor(since=a.since, until=a.until, log=a.log, reference=a.reference, report=a.report,
                    root=str(root), return_state=True)
    print(f"monitor: {state.type.value} / {state.name}: {state.message or ''}")
    return {"Completed": 0, DRIFT_STATE: 1, INCONCLUSIVE_STATE: 2}.get(state.name, 3)


if __name__ == "__main__":
    sys.exit(main())
