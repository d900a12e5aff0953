"""Package-side helpers for the retraining flow (flows/retrain.py).

The flow is a thin Prefect shell; everything it does is here (and in inbox.py, release.py,
runsummary.py), over the same entry points dvc.yaml uses (`dvc`, `covid-cxr ...`) plus the
in-process `imagecheck` / `dataimport` / `release` functions. No Prefect import here:
these helpers run (and are tested) without a Prefect server.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from .config import Paths
from .promotion import KEY_METRICS

QUARANTINE = "quarantine"
FLOW_REMOTE = "retrain-flow"  # name given to a `--remote PATH` that is not a configured remote
Log = Callable[[str], None]


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


def read_gate(root: Path) -> dict[str, Any]:
    """The gate decision `dvc repro gate` left in artifacts/gate.json."""
    path = Paths(root).gate
    gate = _read_json(path)
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        raise StepError(f"{path} is missing or is not a gate decision")
    return gate


def eval_metrics(root: Path | str) -> dict[str, Any]:
    """artifacts/eval/metrics.json (every test metric), or {}."""
    return _read_json(Paths(root).eval_dir / "metrics.json") or {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# ingest
# ---------------------------------------------------------------------------------------------
def _batch_rel(batch: Path, p: str | Path) -> Path:
    p = Path(p)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(batch)
        except ValueError:
            return Path(p.name)
    return p


def _data_class(paths: Paths, p: str | Path) -> str | None:
    """The class folder a data/ file lives in (data/<KAGGLE_ROOT>/<Class>/images/x.png)."""
    try:
        return Path(p).resolve().relative_to(paths.dataset.resolve()).parts[0]
    except (ValueError, IndexError):
        return None


def ingest_batch(batch_dir: str | Path, root: Path | str, log: Log | None = None) -> dict[str, Any]:
    """Check one incoming batch, merge the accepted files into data/, quarantine the rejected.

    A file already in data/ byte for byte, under the same class, is "already present" (a re-run
    of a batch), not a rejection. Every other rejected file is *copied* to
    artifacts/quarantine/<batch>/<same relative path>, beside `report.json` (every file with its
    verdict, from imagecheck) and `reasons.json` (the quarantined ones). The batch is only read.
    """
    from . import dataimport, imagecheck
    from .config import load_params

    log = log or (lambda _m: None)
    paths = Paths(root)
    batch = Path(batch_dir).expanduser().resolve()
    if not batch.is_dir():
        raise StepError(f"incoming batch {batch} is not a directory")
    limits = imagecheck.Limits.from_params(load_params(paths.root / "params.yaml"))
    results = imagecheck.check_batch(batch, paths.data, limits=limits)

    accepted, present, rejected = [], [], []
    for r in results:
        if r["accepted"]:
            accepted.append(r)
        elif r["reason"] == "duplicate" and r.get("label") and _data_class(paths, r.get("duplicate_of", "")) == r["label"]:
            present.append(r)
        else:
            rejected.append(dict(r))
    log(f"{batch.name}: {len(results)} files checked: {len(accepted)} new, {len(present)} already in data/, "
        f"{len(rejected)} rejected")

    stats: dict[str, Any] = {"added": [], "skipped_identical": [], "conflicts": []}
    if accepted:
        stats = dataimport.import_tree(batch, paths.data, only={Path(r["path"]) for r in accepted})
    added = len(stats.get("added") or [])
    if added != len(accepted) - len(stats.get("skipped_identical") or []):
        raise StepError(f"{batch.name}: {len(accepted)} files accepted but {added} imported: {stats}")
    for c in stats.get("conflicts") or []:
        log(f"{batch.name}: name clash with {c.get('existing')}: kept as {c.get('kept_as')}")

    qdir = paths.artifacts / QUARANTINE / batch.name
    if rejected:
        qdir.mkdir(parents=True, exist_ok=True)
        for r in rejected:
            rel = _batch_rel(batch, r["path"])
            dst = qdir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(batch / rel, dst)
            r["quarantined_as"] = dst.relative_to(paths.root).as_posix()
        imagecheck.write_report(results, qdir / "report.json")
        (qdir / "reasons.json").write_text(json.dumps(
            [{k: r.get(k) for k in ("path", "label", "reason", "message", "duplicate_of", "quarantined_as")}
             for r in rejected], indent=2, default=str) + "\n")
        log(f"{batch.name}: quarantined {len(rejected)} files under {qdir}")

    by_reason = collections.Counter(str(r["reason"]) for r in rejected)
    return {
        "batch": batch.name,
        "source": str(batch),
        "checked": len(results),
        "accepted": len(accepted),
        "added": added,
        "skipped_identical": len(present) + len(stats.get("skipped_identical") or []),
        "renamed_on_clash": len(stats.get("conflicts") or []),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "quarantine": qdir.relative_to(paths.root).as_posix() if rejected else None,
    }


# ---------------------------------------------------------------------------------------------
# package / promote
# ---------------------------------------------------------------------------------------------
def production(root: Path | str) -> dict[str, Any] | None:
    """The entry in production (registry/production.json), or None."""
    from . import promotion

    return promotion.production(Paths(root))


def _sha256(path: Path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def same_as_champion(root: Path | str, metrics: dict[str, Any], champion: dict[str, Any] | None) -> bool:
    """Is the candidate the model already in production (an unchanged pipeline)? Then there is
    nothing to package or promote. Decided on the weights when production's model is in the
    local store (or at a recorded `model_path`), else on identical key test metrics."""
    if not champion:
        return False
    from .promotion import store_model_path

    weights = Paths(root).model_dir / "model.safetensors"
    prod_path = champion.get("model_path") or store_model_path(champion.get("model"))
    if prod_path and (Path(prod_path) / "model.safetensors").is_file():
        a, b = _sha256(weights), _sha256(Path(prod_path) / "model.safetensors")
        return a is not None and a == b
    cm = champion.get("metrics")
    if not cm or not metrics:
        return False
    keys = [k for k in KEY_METRICS if k in metrics and k in cm]
    return bool(keys) and all(metrics[k] == cm[k] for k in keys)


def package_bento(root: Path, log: Log | None = None, timeout: float | None = None) -> dict[str, Any]:
    """`covid-cxr package` (builds and registers; never promotes); returns artifacts/bento.json."""
    bento_json = Paths(root).artifacts / "bento.json"
    before = bento_json.stat().st_mtime_ns if bento_json.exists() else None
    run(["covid-cxr", "package"], root, log=log, timeout=timeout)
    rec = _read_json(bento_json)
    if rec is None or not rec.get("bento") or bento_json.stat().st_mtime_ns == before:
        raise StepError(f"`covid-cxr package` did not write a Bento record to {bento_json}")
    return rec


def promote_if_better(root: Path | str, bento: str, *, remote: str | None = None, commit: bool = False,
                      log: Log | None = None) -> dict[str, Any]:
    """`covid-cxr promote`'s code (release.promote): the gate label, the champion rule
    (promotion.decide), then export + dvc push of the Bento, the record, and (with `commit`)
    its git commit. Returns {"promoted", "reasons", "production"}."""
    from . import release

    paths = Paths(root)
    champ = production(root)
    try:
        r = release.promote(paths, bento, remote=remote, commit=commit, log=log)
    except release.PromotionError as e:
        raise StepError(str(e)) from None
    now = production(root)
    if r["promoted"] and (not now or now.get("bento") != bento):
        raise StepError(f"promoting {bento} did not update {paths.production}")
    if not r["promoted"] and now != champ:
        raise StepError(f"{paths.production} changed although {bento} was not promoted")
    return {"promoted": bool(r["promoted"]), "reasons": [str(x) for x in r["reasons"]], "production": now}


# the run summary lives in runsummary.py; re-exported for the flow and its tests
from .runsummary import SUMMARY_METRICS, summary_markdown  # noqa: E402,F401
