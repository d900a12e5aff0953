"""One way to run a tool (`dvc`, `git`, `covid-cxr`) from Python: its output streamed line by line
to a log, a timeout that kills the whole process group, and a clear StepError on failure.
Used by the release commands (promote, pull-production) and the retraining steps."""
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


class StepError(RuntimeError):
    """A tool or a step failed; the message says which and why (a flow shows it as its failure reason)."""


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
    env: dict[str, str] | None = None,
) -> tuple[int, list[str]]:
    """Run `cmd` in `cwd`, streaming merged stdout/stderr lines to `log`; `env` adds to the environment.

    Returns (returncode, last lines). Raises CommandFailed when `check` and the exit is non-zero,
    StepError when the command is missing or runs past `timeout` (the process group is killed).
    """
    env = {**tool_env(), **(env or {})}
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
