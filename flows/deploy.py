"""Scheduled retraining: serve the `retrain` flow as a deployment on a cron schedule.

Needs a real Prefect server (the ephemeral one cannot schedule):

    export PREFECT_SERVER_ANALYTICS_ENABLED=false
    prefect server start --host 127.0.0.1            # terminal 1 (UI on http://127.0.0.1:4200)
    export PREFECT_API_URL=http://127.0.0.1:4200/api  # terminal 2
    python flows/deploy.py --inbox ../shared/incoming --remote /path/to/dvc-remote

The cron string defaults to params.yaml `schedule.cron`. This process registers the deployment
(with its schedule) and runs each scheduled or manually triggered run, one at a time, until
stopped (Ctrl-C pauses the schedule). Trigger a run now with
`prefect deployment run retrain/weekly-retrain`. Each run processes the inbox's new batches
(by content, see covid_cxr/orchestrate/inbox.py) and says "nothing new" when there are none.

This is the `flow.serve` way (no work pool, one long-running process). The work-pool way is
prefect.yaml at the repo root (`prefect deploy --all` + `prefect worker start`): see the README.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefect.schedules import Cron  # noqa: E402


from covid_cxr.orchestrate import shell  # noqa: E402
from covid_cxr.config import load_params, project_root  # noqa: E402
from retrain import retrain  # noqa: E402

DEFAULT_NAME = "weekly-retrain"


def default_cron(root: Path | None = None) -> str:
    params = load_params((root or project_root()) / "params.yaml")
    return str(params.get("schedule", {}).get("cron") or "0 3 * * 1")


def deployment_spec(
    cron: str,
    *,
    timezone: str = "UTC",
    incoming: list[str] | None = None,
    inbox: str | None = None,
    remote: str | None = None,
    commit: bool = False,
    root: str | None = None,
    backoff_s: float | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `retrain.serve` / `retrain.to_deployment`: schedule and run parameters."""
    parameters: dict[str, Any] = {"incoming": incoming or None, "inbox": inbox, "remote": remote,
                                  "commit": commit, "root": root}
    if backoff_s is not None:
        parameters["backoff_s"] = backoff_s
    return {
        "schedules": [Cron(cron, timezone=timezone)],
        "parameters": parameters,
        "description": "Retrain on new data; gate, package and promote only a better model.",
        "tags": ["covid-cxr", "retraining"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve the retraining flow on a cron schedule.")
    ap.add_argument("--name", default=DEFAULT_NAME, help="deployment name")
    ap.add_argument("--cron", help="cron string (default: params.yaml schedule.cron)")
    ap.add_argument("--timezone", default="UTC", help="time zone the cron string is read in")
    ap.add_argument("--incoming", action="append", default=[], metavar="DIR", help="batch folder (repeatable)")
    ap.add_argument("--inbox", help="folder of batch folders: each run processes the new ones")
    ap.add_argument("--remote", help="DVC remote name, path or URL to pull from / push to")
    ap.add_argument("--commit", action="store_true", help="git commit data.dvc, the ledger and promotions")
    ap.add_argument("--root", help="project root (default: the folder holding params.yaml)")
    ap.add_argument("--backoff-s", type=float, default=None, help="first retry delay (s) for every task")
    a = ap.parse_args(argv)

    root = Path(a.root).resolve() if a.root else project_root()
    spec = deployment_spec(
        a.cron or default_cron(root),
        timezone=a.timezone,
        incoming=[str(Path(p).resolve()) for p in a.incoming],
        inbox=str(Path(a.inbox).resolve()) if a.inbox else None,
        remote=shell.normalize_remote(a.remote),
        commit=a.commit,
        root=str(root),
        backoff_s=a.backoff_s,
    )
    # limit=1: runs share one workspace (data/, dvc locks), so never two at once.
    retrain.serve(name=a.name, limit=1, **spec)


if __name__ == "__main__":
    main()
