"""Subprocesses, DVC and git for the retraining steps: one way to run a tool, with its output
streamed to the log, a timeout that kills the whole process group, and a clear StepError."""
from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

Log = Callable[[str], None]
FLOW_REMOTE = "retrain-flow"  # name given to a `--remote PATH` that is not a configured remote


class StepError(RuntimeError):
    """A flow step failed; the message says which and why (shown as the flow's failure reason)."""


class CommandFailed(StepError):
    def __init__(self, cmd: list[str], returncode: int, tail: list[str]):
        self.cmd = cmd
        self.returncode = returncode
        self.tail = tail
        shown = "\n".join(tail[-15:])
        super().__init__(f"`{' '.join(cmd)}` exited {returncode}" + (f":\n{shown}" if shown else ""))


# ---------------------------------------------------------------------------------------------
# subprocesses
# ---------------------------------------------------------------------------------------------
def tool_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for `dvc` / `covid-cxr`: the running interpreter's bin dir is put on PATH
    when it is not there already (running `.venv/bin/python flows/retrain.py` without activating
    the venv). When it is already on PATH its position is kept, so a PATH entry placed before it
    (a wrapper, a test fake) still wins."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    if bindir not in parts:
        parts.insert(0, bindir)
    env["PATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run(
    cmd: list[str],
    cwd: Path | str,
    *,
    log: Log | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> tuple[int, list[str]]:
    """Run `cmd` in `cwd`, streaming merged stdout/stderr lines to `log`.

    Returns (returncode, last lines). Raises CommandFailed when `check` and the exit is non-zero,
    StepError when the command is missing or runs past `timeout` (the process group is killed).
    """
    env = tool_env()
    env["COVID_CXR_ROOT"] = str(Path(cwd).resolve())  # `covid-cxr` works on this project, whatever the caller's env
    exe = shutil.which(cmd[0], path=env["PATH"])
    if exe is None:
        raise StepError(f"`{cmd[0]}` was not found on PATH ({env['PATH']})")
    tail: collections.deque[str] = collections.deque(maxlen=60)
    proc = subprocess.Popen(
        [exe, *cmd[1:]],
        cwd=str(cwd),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if log and line:
                log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise StepError(f"`{' '.join(cmd)}` ran past its {timeout:.0f}s limit and was killed") from None
    except BaseException:
        _kill_group(proc)  # the flow is being cancelled: do not leave dvc running on its own
        raise
    reader.join(timeout=10)
    if check and rc != 0:
        raise CommandFailed(cmd, rc, list(tail))
    return rc, list(tail)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill `proc` and everything it started (dvc -> shell -> covid-cxr train)."""
    if proc.poll() is not None:
        return
    try:
        import psutil  # a dvc dependency

        victims = psutil.Process(proc.pid).children(recursive=True)
    except Exception:
        victims = []
    proc.kill()
    for v in victims:
        try:
            v.kill()
        except Exception:
            pass
    proc.wait()
    if victims:
        import psutil

        psutil.wait_procs(victims, timeout=10)  # SIGKILL is asynchronous: wait until they are gone


# ---------------------------------------------------------------------------------------------
# DVC / git
# ---------------------------------------------------------------------------------------------
def _is_location(remote: str) -> bool:
    """A path or URL, as opposed to the name of a configured DVC remote."""
    return "://" in remote or os.sep in remote or remote.startswith((".", "~")) or Path(remote).exists()


def remote_name(root: Path, remote: str | None, log: Log | None = None) -> str | None:
    """`remote` as a DVC remote name: a name (`team`) is used as is; a path or URL is written to
    `.dvc/config.local` (never committed) as the remote `retrain-flow`. None: the default remote."""
    if not remote:
        return None
    if not _is_location(remote):
        return remote
    url = remote
    if "://" not in remote:
        p = Path(remote).expanduser()
        url = str((p if p.is_absolute() else Path.cwd() / p).resolve())
    run(["dvc", "remote", "add", "--local", "--force", FLOW_REMOTE, url], root, log=log)
    return FLOW_REMOTE


def normalize_remote(remote: str | None) -> str | None:
    """A remote given on a command line: a local path becomes absolute (served runs start in
    another folder); a remote name (`team`) or a URL is kept as is."""
    if not remote or "://" in remote or not _is_location(remote):
        return remote or None
    return str(Path(remote).expanduser().resolve())


def dvc_pull(root: Path, remote: str | None = None, log: Log | None = None) -> None:
    """Bring the workspace's data version (data.dvc) from the remote (or the local cache)."""
    name = remote_name(root, remote, log)
    run(["dvc", "pull", *(["-r", name] if name else []), "data.dvc"], root, log=log)


def dvc_add_data(root: Path, log: Log | None = None) -> str:
    """`dvc add data`; returns the new data version (the md5 in data.dvc)."""
    run(["dvc", "add", "data"], root, log=log)
    return data_version(root)


def data_version(root: Path) -> str:
    import yaml

    meta = yaml.safe_load((Path(root) / "data.dvc").read_text())
    return str(meta["outs"][0]["md5"])


def dvc_push(root: Path, remote: str | None = None, log: Log | None = None) -> None:
    name = remote_name(root, remote, log)
    run(["dvc", "push", *(["-r", name] if name else []), "data.dvc"], root, log=log)


def git_commit_files(root: Path, files: list[Path | str], message: str, log: Log | None = None) -> str | None:
    """Commit exactly `files` (relative to root or absolute; whatever else is staged stays staged)
    when any of them changed; returns the new commit sha or None."""
    root = Path(root)
    rels = [(Path(f).resolve().relative_to(root.resolve()) if Path(f).is_absolute() else Path(f)).as_posix()
            for f in files]
    rels = [r for r in rels if (root / r).exists()
            or run(["git", "ls-files", "--error-unmatch", r], root, check=False)[0] == 0]  # a deletion
    if not rels:
        return None
    run(["git", "add", "--", *rels], root, log=log)
    if run(["git", "diff", "--cached", "--quiet", "--", *rels], root, check=False)[0] == 0:
        if log:
            log(f"{', '.join(rels) or 'nothing'} unchanged: nothing to commit")
        return None
    run(["git", "commit", "-q", "-m", message, "--", *rels], root, log=log)
    _, lines = run(["git", "rev-parse", "HEAD"], root)
    return lines[-1].strip()


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
