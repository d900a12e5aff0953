"""Retraining flow: sync -> ingest -> version -> rebuild -> gate -> package -> promote -> summary.

A thin Prefect 3 shell over `covid_cxr.orchestrate` (which drives `dvc` and `covid-cxr`, the
same entry points dvc.yaml uses). Run once from the project root:

    python flows/retrain.py --incoming ../shared/incoming/batch-001 [--remote PATH] [--commit]

Schedule it with flows/deploy.py. A failure anywhere ends the run Failed with the step and the
reason, leaves artifacts/production.json as it was, and still publishes the summary artifact.
"""
from __future__ import annotations

import argparse
import os
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

from covid_cxr import orchestrate as orch  # noqa: E402
from covid_cxr.config import project_root  # noqa: E402

SUMMARY_KEY = "retrain-summary"
# Declared retry backoff (seconds) per task; `backoff_s` scales all of them (tests use tiny ones).
NETWORK_DELAYS = [10.0, 30.0, 90.0]  # dvc pull / push: a remote that is briefly unreachable
LOCAL_DELAYS = [5.0]  # file copies, git
BUILD_DELAYS = [30.0]  # one retry of a crashed stage; dvc resumes at the stage that failed


def _log():
    logger = get_run_logger()
    return logger.info


@task(name="sync", retries=3, retry_delay_seconds=NETWORK_DELAYS, retry_jitter_factor=0.2, cache_policy=NO_CACHE)
def sync(root: str, remote: str | None) -> None:
    """`dvc pull data.dvc`: the data version this checkout pins."""
    orch.dvc_pull(Path(root), remote, log=_log())


@task(name="ingest", retries=1, retry_delay_seconds=LOCAL_DELAYS, cache_policy=NO_CACHE)
def ingest(batch: str, root: str) -> dict[str, Any]:
    """Check a batch; merge accepted files into data/; copy rejected ones to quarantine."""
    return orch.ingest_batch(batch, Path(root), log=_log())


@task(name="dvc-add", retries=1, retry_delay_seconds=LOCAL_DELAYS, cache_policy=NO_CACHE)
def dvc_add(root: str) -> str:
    return orch.dvc_add_data(Path(root), log=_log())


@task(name="dvc-push", retries=3, retry_delay_seconds=NETWORK_DELAYS, retry_jitter_factor=0.2, cache_policy=NO_CACHE)
def dvc_push(root: str, remote: str | None) -> None:
    orch.dvc_push(Path(root), remote, log=_log())


@task(name="git-commit", retries=1, retry_delay_seconds=LOCAL_DELAYS, cache_policy=NO_CACHE)
def git_commit(root: str, message: str) -> str | None:
    return orch.git_commit_data(Path(root), message, log=_log())


@task(name="rebuild", retries=1, retry_delay_seconds=BUILD_DELAYS, cache_policy=NO_CACHE)
def rebuild(root: str, timeout_s: float | None) -> bool:
    """`dvc repro gate` (only what changed). A retry resumes at the stage that failed."""
    return orch.rebuild(Path(root), log=_log(), timeout=timeout_s)


@task(name="gate", retries=0, cache_policy=NO_CACHE)
def gate(root: str) -> dict[str, Any]:
    """The gate decision (artifacts/gate.json): thresholds and the champion comparison."""
    return orch.read_gate(Path(root))


@task(name="package", retries=1, retry_delay_seconds=BUILD_DELAYS, cache_policy=NO_CACHE)
def package(root: str) -> dict[str, Any]:
    return orch.package_bento(Path(root), log=_log())


@task(name="promote", retries=0, cache_policy=NO_CACHE)
def promote(root: str, bento: str, model: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Make the Bento the production one (artifacts/production.json) if it beats the champion."""
    return orch.promote_if_better(Path(root), bento, model, metrics)


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


@flow(name="retrain", log_prints=True)
def retrain(
    incoming: list[str] | None = None,
    remote: str | None = None,
    commit: bool = False,
    root: str | None = None,
    backoff_s: float | None = None,
    train_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Retrain on the current data plus `incoming` batches; ship the model only if it earns it.

    Args:
        incoming: batch folders (`<Class>/*.png`) to check and merge into data/.
        remote: DVC remote name, path or URL to pull from and push to (default: the configured one).
        commit: `git commit data.dvc` after versioning the data.
        root: project root (default: $COVID_CXR_ROOT or the folder holding params.yaml).
        backoff_s: first retry delay for every task (default: each task's declared backoff).
        train_timeout_s: kill the rebuild (`dvc repro`) after this long.
    """
    log = get_run_logger()
    root_p = Path(root).expanduser().resolve() if root else project_root()
    r = str(root_p)
    summary: dict[str, Any] = {"root": r, "step": "start", "error": None, "ingest": []}
    try:
        summary["champion"] = orch.production(root_p)
        summary["step"] = "sync"
        _scaled(sync, backoff_s)(r, remote)

        for batch in incoming or []:
            summary["step"] = f"ingest {Path(batch).name}"
            summary["ingest"].append(_scaled(ingest, backoff_s)(batch, r))

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
            raise orch.StepError(f"gate failed, production unchanged: {reasons}")

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
            res = promote(r, rec["bento"], rec["model"], rec.get("metrics") or metrics)
            summary["production_after"] = res["production"]
            summary["promotion"] = {
                "decision": f"promoted {rec['bento']}" if res["promoted"]
                else "kept the champion (candidate is not better)",
                "reasons": res["reasons"],
            }
        summary["step"] = "done"
        log.info("retraining finished: %s", summary["promotion"]["decision"])
        return summary
    except Exception as e:
        summary["error"] = f"{type(e).__name__}: {e}"
        log.error("retraining failed at step %r: %s", summary["step"], e)
        raise orch.StepError(f"retraining failed at step '{summary['step']}': {e}") from e
    finally:
        try:
            publish_summary(summary)
        except Exception as e:  # the run's own outcome matters more than its report
            log.warning("could not publish the summary artifact: %s", e)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the retraining flow once.")
    ap.add_argument("--incoming", action="append", default=[], metavar="DIR",
                    help="an incoming batch folder (repeatable)")
    ap.add_argument("--remote", help="DVC remote name, path or URL to pull from / push to")
    ap.add_argument("--commit", action="store_true", help="git commit data.dvc after versioning")
    ap.add_argument("--root", help="project root (default: the folder holding params.yaml)")
    ap.add_argument("--backoff-s", type=float, default=None, help="first retry delay (s) for every task")
    ap.add_argument("--train-timeout-s", type=float, default=None)
    a = ap.parse_args(argv)
    state = retrain(
        incoming=[str(Path(p).resolve()) for p in a.incoming] or None,
        remote=orch.normalize_remote(a.remote),
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
