"""DVC and git for the retraining steps, through the one tool runner (covid_cxr/runner.py) and
the remote handling of covid_cxr/vcs.py (a `--remote PATH` is never written to a config file)."""
from __future__ import annotations

from pathlib import Path

from covid_cxr.provenance import data_md5
from covid_cxr.runner import Log, run
from covid_cxr.vcs import dvc, git_commit_files


def dvc_pull(root: Path, remote: str | None = None, log: Log | None = None) -> None:
    """Bring the workspace's data version (data.dvc) from the remote (or the local cache)."""
    dvc(root, "pull", ["data.dvc"], remote, log)


def dvc_add_data(root: Path, log: Log | None = None) -> str:
    """`dvc add data`; returns the new data version (the md5 in data.dvc)."""
    run(["dvc", "add", "data"], root, log=log)
    return str(data_md5(root))


def dvc_push(root: Path, remote: str | None = None, log: Log | None = None) -> None:
    dvc(root, "push", ["data.dvc"], remote, log)


def git_commit_data(root: Path, message: str, log: Log | None = None) -> str | None:
    """Commit data.dvc (only that file) when it changed; returns the new commit sha or None."""
    return git_commit_files(root, ["data.dvc"], message, log)


def dvc_repro(root: Path, target: str, log: Log | None = None, timeout: float | None = None) -> list[str]:
    """`dvc repro <target>` (dvc.lock records what ran). Returns the output's last lines."""
    _, lines = run(["dvc", "repro", target], root, log=log, timeout=timeout)
    return lines


def rebuild(root: Path, log: Log | None = None, timeout: float | None = None) -> None:
    """`dvc repro gate`: prepare, validate, train, external, evaluate, gate; only what changed
    (dvc.lock records what ran). `covid-cxr gate` exits 0 whatever its verdict (the verdict is
    gate.json, read by the gate step), so any failure here is a build error and raises."""
    dvc_repro(root, "gate", log=log, timeout=timeout)
