"""Retraining flow: inbox -> sync -> ingest -> version -> rebuild -> gate -> package -> promote -> summary.

A thin Prefect 3 shell over `covid_cxr.orchestrate.steps` / `covid_cxr.orchestrate.shell` / `covid_cxr.orchestrate.inbox` / `covid_cxr.orchestrate.ingest` / `covid_cxr.release.registry`
(which drive `dvc`, `git` and `covid-cxr`, the same entry points dvc.yaml and people use).
Run once from the project root:

    python flows/retrain.py --inbox ../shared/incoming [--remote PATH] [--commit]
    python flows/retrain.py --incoming ../shared/incoming/batch-001      # one batch, whatever the ledger

With `inbox`, only batches whose content is not in registry/inbox-ledger.json are processed;
with none new the run ends Completed "nothing new" without retraining. Schedule it with
flows/deploy.py or prefect.yaml (work pool). A failure anywhere ends the run Failed with the
step and the reason (the on-failure hook also publishes them as the `retrain-failure` artifact
and appends them to logs/retrain-failures.jsonl), leaves registry/production.json as it was, and
still publishes the summary artifact.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

# Offline machine: no analytics; the ephemeral server (a one-off run without PREFECT_API_URL)
# gets time to start on a busy 2-core box. Set before Prefect reads its settings.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed  # noqa: E402

from covid_cxr.orchestrate import inbox as inbox_mod  # noqa: E402
from covid_cxr.orchestrate.ingest import ingest_batch  # noqa: E402
from covid_cxr.orchestrate import steps as orch  # noqa: E402
from covid_cxr import vcs  # noqa: E402
from covid_cxr.orchestrate import shell  # noqa: E402
from covid_cxr.runner import StepError  # noqa: E402
from covid_cxr.config import Paths, project_root  # noqa: E402

SUMMARY_KEY = "retrain-summary"
FAILURE_KEY = "retrain-failure"
NOTHING_NEW = "nothing new"
# Declared retry backoff (seconds) per task; `backoff_s` scales all of them (tests use tiny ones).
NETWORK_DELAYS = [10.0, 30.0, 90.0]  # dvc pull / push: a remote that is briefly unreachable
LOCAL_DELAYS = [5.0]  # file copies, git
BUILD_DELAYS = [30.0]  # one retry of a crashed stage; dvc resumes at the stage that failed


def _log():
    logger = get_run_logger()
    return logger.info


@task(name="scan-inbox", retries=1, retry_delay_seconds=LOCAL_DELAYS, cache_policy=NO_CACHE)
def scan_inbox(inbox: str, root: str) -> dict[str, Any]:
    """The inbox's batches, split into new ones and ones the ledger has (by content key)."""
    return inbox_mod.new_batches(inbox, Paths(Path(root)))


@task(name="record-batches", retries=1, retry_delay_seconds=LOCAL_DELAYS, cache_policy=NO_CACHE)
def record_batches(root: str, batches: list[dict[str, Any]], outcome: str, data_version: str | None,
                   commit: bool) -> None:
    """Write the processed batches to registry/inbox-ledger.json (and commit it with `commit`)."""
    paths = Paths(Path(root))
    from prefect.runtime import flow_run

    inbox_mod.record(paths, batches, outcome, data_version=data_version, flow_run=str(flow_run.id or ""))
    if commit:
        vcs.git_commit_files(Path(root), [paths.ledger],
                              "inbox: processed " + ", ".join(b["name"] for b in batches), log=_log())


@task(name="sync", retries=3, retry_delay_seconds=NETWORK_DELAYS, retry_jitter_factor=0.2, cache_policy=NO_CACHE)
def sync(root: str, remote: str | None) -> None:
    """`dvc pull data.dvc`: the data version this checkout pins."""
    shell.dvc_pull(Path(root), remote, log=_log())


@task(name="ingest", retries=1, retry_delay_seconds=LOCAL_DELAYS, cache_policy=NO_CACHE)
def ingest(batch: str, root: str) -> dict[str, Any]:
    """Check a batch; merge accepted files into data/; copy rejected ones to quarantine."""
    return ingest_batch(batch, Path(root), log=_log())


@task(name="dvc-add", retries=1, retry_delay_seconds=LOCAL_DELAYS, cache_policy=NO_CACHE)
def dvc_add(root: str) -> str:
    return shell.dvc_add_data(Path(root), log=_log())


@task(name="dvc-push", retries=3, retry_delay_seconds=NETWORK_DELAYS, retry_jitter_factor=0.2, cache_policy=NO_CACHE)
def dvc_push(root: str, remote: str | None) -> None:
    shell.dvc_push(Path(root), remote, log=_log())


@task(name="git-commit", retries=1, retry_delay_seconds=LOCAL_DELAYS, cache_policy=NO_CACHE)
def git_commit(root: str, message: str) -> str | None:
    return shell.git_commit_data(Path(root), message, log=_log())


@task(name="rebuild", retries=1, retry_delay_seconds=BUILD_DELAYS, cache_policy=NO_CACHE)
def rebuild(root: str, timeout_s: float | None) -> None:
    """`dvc repro gate` (only what changed). A retry resumes at the stage that failed."""
    shell.rebuild(Path(root), log=_log(), timeout=timeout_s)


@task(name="gate", retries=0, cache_policy=NO_CACHE)
def gate(root: str) -> dict[str, Any]:
    """The gate decision (artifacts/gate.json): thresholds and the champion comparison."""
    return orch.read_gate(Path(root))


@task(name="package", retries=1, retry_delay_seconds=BUILD_DELAYS, cache_policy=NO_CACHE)
def package(root: str) -> dict[str, Any]:
    return orch.package_bento(Path(root), log=_log())


@task(name="promote", retries=0, cache_policy=NO_CACHE)
def promote(root: str, bento: str, remote: str | None, commit: bool) -> dict[str, Any]:
    """`covid-cxr promote`'s code: the Bento goes to production (registry/production.json, its
    export pushed to the DVC remote, committed with `commit`) only if it beats the champion."""
    return orch.promote_if_better(Path(root), bento, remote=remote, commit=commit, log=_log())


@task(name="summary", retries=1, retry_delay_seconds=[2.0], cache_policy=NO_CACHE)
def publish_summary(summary: dict[str, Any]) -> str:
    md = orch.summary_markdown(summary)
    create_markdown_artifact(markdown=md, key=SUMMARY_KEY, description="Retraining run summary")
    return md


def _scaled(t, backoff_s: float | None):
    """The task with its declared backoff scaled so that the first delay is `backoff_s`."""
    if backoff_s is None:
        return t
    delays = t.retry_delay_seconds if isinstance(t.retry_delay_seconds, list) else [t.retry_delay_seconds or 0]
    first = delays[0] or 1.0
    return t.with_options(retry_delay_seconds=[backoff_s * d / first for d in delays], retry_jitter_factor=None)


def _failure(state) -> tuple[str, str]:
    """(step, reason) from the final state's message ("retraining failed at step 'X': reason")."""
    msg = state.message or ""
    m = re.search(r"failed at step '([^']*)': (.*)", msg, re.S)
    return (m.group(1), m.group(2)) if m else ("unknown", msg or state.name)


def record_failure(flow, flow_run, state) -> None:
    """on_failure hook: the step and the reason as the `retrain-failure` markdown artifact of the
    run, and one JSON line in <root>/logs/retrain-failures.jsonl. Never raises."""
    import datetime as dt

    from prefect.artifacts import MarkdownArtifact
    from prefect.logging import get_logger

    log = get_logger("covid_cxr.retrain")
    step, reason = _failure(state)
    try:
        root = (flow_run.parameters or {}).get("root")
        path = (Path(root).expanduser().resolve() if root else project_root()) / "logs" / "retrain-failures.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                "flow_run": str(flow_run.id), "name": flow_run.name, "step": step,
                                "reason": reason[-2000:]}) + "\n")
    except Exception as e:  # the hook must not hide the failure it reports
        log.warning("could not append to the failure log: %s", e)
    try:
        md = (f"# Retraining failed at step `{step}`\n\n```\n{reason[-3000:]}\n```\n\n"
              f"Run `{flow_run.name}` ({flow_run.id}). registry/production.json is unchanged; the batches "
              "of this run are not in the ledger, so the next run tries them again.\n")
        MarkdownArtifact(key=FAILURE_KEY, markdown=md, description=f"Retraining failure: {step}",
                         flow_run_id=flow_run.id).create(_sync=True)
    except Exception as e:
        log.warning("could not publish the failure artifact: %s", e)


def _resolve(p: str, root: Path) -> Path:
    q = Path(p).expanduser()
    return (q if q.is_absolute() else root / q).resolve()


@flow(name="retrain", log_prints=True, on_failure=[record_failure])
def retrain(
    incoming: list[str] | None = None,
    inbox: str | None = None,
    remote: str | None = None,
    commit: bool = False,
    root: str | None = None,
    backoff_s: float | None = None,
    train_timeout_s: float | None = None,
):
    """Retrain on the current data plus new batches; ship the model only if it earns it.

    Args:
        incoming: batch folders (`<Class>/*.png` or Kaggle layout) to check and merge into data/,
            whatever the ledger says.
        inbox: a folder of batch folders; only batches whose content is not in the ledger
            (registry/inbox-ledger.json) are processed. None new (and no `incoming`): the run
            ends Completed "nothing new" without retraining. Relative to the project root.
        remote: DVC remote name, path or URL to pull from and push to (default: the configured one).
        commit: `git commit` data.dvc, the ledger and the production record as they change.
        root: project root (default: $COVID_CXR_ROOT or the folder holding params.yaml).
        backoff_s: first retry delay for every task (default: each task's declared backoff).
        train_timeout_s: kill the rebuild (`dvc repro`) after this long.
    """
    log = get_run_logger()
    root_p = Path(root).expanduser().resolve() if root else project_root()
    r = str(root_p)
    summary: dict[str, Any] = {"root": r, "step": "start", "error": None, "ingest": []}
    batches: list[dict[str, Any]] = []

    def settle(outcome: str) -> None:  # the run reached a decision: its batches are processed
        if batches:
            _scaled(record_batches, backoff_s)(r, batches, outcome, summary.get("data_version"), commit)

    try:
        summary["champion"] = orch.production(root_p)
        for b in incoming or []:
            key, n = inbox_mod.batch_key(b)
            batches.append({"name": Path(b).name, "path": str(Path(b).resolve()), "key": key, "files": n})
        if inbox:
            summary["step"] = "inbox"
            summary["inbox"] = _scaled(scan_inbox, backoff_s)(str(_resolve(inbox, root_p)), r)
            batches += summary["inbox"]["new"]
            if not batches:
                summary.update(step="done", nothing_new=True)
                msg = (f"{NOTHING_NEW} in {summary['inbox']['path']} "
                       f"({len(summary['inbox']['seen'])} batch(es) processed before): no retraining")
                log.info(msg)
                return Completed(message=msg, data=summary)

        summary["step"] = "sync"
        _scaled(sync, backoff_s)(r, remote)

        for b in batches:
            summary["step"] = f"ingest {b['name']}"
            summary["ingest"].append(_scaled(ingest, backoff_s)(b["path"], r))

        summary["step"] = "version"
        summary["data_version"] = _scaled(dvc_add, backoff_s)(r)
        _scaled(dvc_push, backoff_s)(r, remote)
        if commit:
            names = ", ".join(b["batch"] for b in summary["ingest"]) or "no new batch"
            summary["commit"] = _scaled(git_commit, backoff_s)(r, f"data: retraining import ({names})")

        summary["step"] = "rebuild"
        _scaled(rebuild, backoff_s)(r, train_timeout_s)

        summary["step"] = "gate"
        decision = gate(r)
        summary["gate"] = decision
        summary["metrics"] = orch.eval_metrics(root_p)
        if not decision.get("passed"):
            reasons = "; ".join(decision.get("reasons") or []) or "no reasons given"
            settle("gate failed")
            raise StepError(f"gate failed, production unchanged: {reasons}")

        metrics = decision.get("metrics") or {}
        if orch.same_as_champion(root_p, metrics, summary["champion"]):
            summary["promotion"] = {
                "decision": "kept the champion",
                "reasons": ["the candidate is the model already in production: nothing to package"],
            }
        else:
            summary["step"] = "package"
            rec = _scaled(package, backoff_s)(r)
            summary["bento"], summary["model"] = rec.get("bento"), rec.get("model")

            summary["step"] = "promote"
            res = promote(r, rec["bento"], remote, commit)
            summary["production_after"] = res["production"]
            summary["promotion"] = {
                "decision": f"promoted {rec['bento']}" if res["promoted"]
                else "kept the champion (candidate is not better)",
                "reasons": res["reasons"],
            }
        summary["step"] = "record"
        settle(summary["promotion"]["decision"])
        summary["step"] = "done"
        log.info("retraining finished: %s", summary["promotion"]["decision"])
        return summary
    except Exception as e:
        summary["error"] = f"{type(e).__name__}: {e}"
        log.error("retraining failed at step %r: %s", summary["step"], e)
        raise StepError(f"retraining failed at step '{summary['step']}': {e}") from e
    finally:
        try:
            publish_summary(summary)
        except Exception as e:  # the run's own outcome matters more than its report
            log.warning("could not publish the summary artifact: %s", e)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the retraining flow once.")
    ap.add_argument("--incoming", action="append", default=[], metavar="DIR",
                    help="an incoming batch folder (repeatable)")
    ap.add_argument("--inbox", help="a folder of batch folders: process the new ones (by content)")
    ap.add_argument("--remote", help="DVC remote name, path or URL to pull from / push to")
    ap.add_argument("--commit", action="store_true", help="git commit data.dvc, the ledger and the production record")
    ap.add_argument("--root", help="project root (default: the folder holding params.yaml)")
    ap.add_argument("--backoff-s", type=float, default=None, help="first retry delay (s) for every task")
    ap.add_argument("--train-timeout-s", type=float, default=None)
    a = ap.parse_args(argv)
    state = retrain(
        incoming=[str(Path(p).resolve()) for p in a.incoming] or None,
        inbox=str(Path(a.inbox).resolve()) if a.inbox else None,
        remote=vcs.absolute(a.remote),
        commit=a.commit,
        root=a.root,
        backoff_s=a.backoff_s,
        train_timeout_s=a.train_timeout_s,
        return_state=True,
    )
    print(f"retrain: {state.type.value}: {state.message or ''}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
