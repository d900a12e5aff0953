"""Package-side helpers for the retraining flow (flows/retrain.py).

The flow is a thin Prefect shell; everything it does is here, over the same
entry points dvc.yaml uses (`dvc`, `covid-cxr ...`) plus the in-process
`imagecheck` / `dataimport` / `package` functions. No Prefect import here:
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
from typing import Any, Callable, Iterable

from .config import Paths

# Metrics shown side by side with the champion's, in this order.
KEY_METRICS = (
    "accuracy",
    "macro_f1",
    "covid_recall",
    "covid_specificity",
    "ece_after",
    "ood_false_flag_rate",
    "n_test",
)
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


def git_commit_data(root: Path, message: str, log: Log | None = None) -> str | None:
    """Commit data.dvc (only that file) when it changed; returns the new commit sha or None."""
    rc, _ = run(["git", "diff", "--quiet", "HEAD", "--", "data.dvc"], root, check=False)
    rc_tracked, _ = run(["git", "ls-files", "--error-unmatch", "data.dvc"], root, check=False)
    if rc == 0 and rc_tracked == 0:
        if log:
            log("data.dvc unchanged: nothing to commit")
        return None
    run(["git", "add", "data.dvc"], root, log=log)
    run(["git", "commit", "-m", message, "--", "data.dvc"], root, log=log)
    _, lines = run(["git", "rev-parse", "HEAD"], root)
    return lines[-1].strip()


def dvc_repro(root: Path, target: str, log: Log | None = None, timeout: float | None = None) -> list[str]:
    """`dvc repro <target>` (dvc.lock records what ran). Returns the output's last lines."""
    _, lines = run(["dvc", "repro", target], root, log=log, timeout=timeout)
    return lines


def rebuild(root: Path, log: Log | None = None, timeout: float | None = None) -> bool:
    """`dvc repro gate`: prepare, validate, train, evaluate, gate; only what changed (dvc.lock
    records what ran). Returns True when the chain ran to the end, False when the only failure is
    the gate's own verdict: `covid-cxr gate` exits non-zero on a failed gate, which is a decision
    for the gate step, not a build error. Anything else raises.
    """
    paths = Paths(root)
    before = paths.gate.stat().st_mtime_ns if paths.gate.exists() else None
    try:
        dvc_repro(root, "gate", log=log, timeout=timeout)
    except CommandFailed:
        fresh = paths.gate.exists() and paths.gate.stat().st_mtime_ns != before
        gate = _read_json(paths.gate) if fresh else None
        if gate is None or gate.get("passed") is not False:
            raise
        return False
    return True


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
    """The production record (artifacts/production.json), or None."""
    from . import package

    return package.production(Paths(root))


def champion_metrics(champion: dict[str, Any] | None) -> dict[str, Any] | None:
    if not champion:
        return None
    m = champion.get("metrics", champion)
    return m if isinstance(m, dict) else None


def _sha256(path: Path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def same_as_champion(root: Path | str, metrics: dict[str, Any], champion: dict[str, Any] | None) -> bool:
    """Is the candidate the model already in production (an unchanged pipeline)? Then there is
    nothing to package or promote. Decided on the weights when production's model files are at
    hand (`model_path`), else on identical key test metrics."""
    if not champion:
        return False
    weights = Paths(root).model_dir / "model.safetensors"
    prod_path = champion.get("model_path")
    if prod_path and (Path(prod_path) / "model.safetensors").is_file():
        a, b = _sha256(weights), _sha256(Path(prod_path) / "model.safetensors")
        return a is not None and a == b
    cm = champion_metrics(champion)
    if not cm or not metrics:
        return False
    keys = [k for k in KEY_METRICS if k in metrics and k in cm]
    return bool(keys) and all(metrics[k] == cm[k] for k in keys)


def package_bento(root: Path, log: Log | None = None, timeout: float | None = None) -> dict[str, Any]:
    """`covid-cxr package --no-promote`; returns the record it wrote (artifacts/bento.json)."""
    bento_json = Paths(root).artifacts / "bento.json"
    before = bento_json.stat().st_mtime_ns if bento_json.exists() else None
    run(["covid-cxr", "package", "--no-promote"], root, log=log, timeout=timeout)
    rec = _read_json(bento_json)
    if rec is None or not rec.get("bento") or bento_json.stat().st_mtime_ns == before:
        raise StepError(f"`covid-cxr package --no-promote` did not write a Bento record to {bento_json}")
    return rec


def promote_if_better(root: Path | str, bento: str, model: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The package module's promotion rule, as `covid-cxr package` applies it: `is_better`
    against the champion as the gate re-scored it on this test split (else production.json's
    record), with params.yaml's `gate.champion_tolerance`; `package.promote` (re-checks the
    model passed the gate, writes production.json atomically) only when it wins.

    Returns {"promoted": bool, "reasons": [...], "production": record now in production}.
    """
    from . import package

    paths = Paths(root)
    champ = package.production(paths)
    promoted, reasons = package.maybe_promote(
        paths, bento, model, metrics, champion_metrics=package.gate_champion_metrics(paths, champ)
    )
    now = package.production(paths)
    if promoted and (not now or now.get("bento") != bento):
        raise StepError(f"promoting {bento} did not update {paths.production}")
    if not promoted and now != champ:
        raise StepError(f"{paths.production} changed although {bento} was not promoted")
    return {"promoted": bool(promoted), "reasons": [str(r) for r in reasons], "production": now}


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def summary_markdown(s: dict[str, Any]) -> str:
    """The run summary (a Prefect markdown artifact): data in, metrics vs champion, decisions."""
    ok = s.get("error") is None
    out = [f"# Retraining run: {'succeeded' if ok else 'FAILED'}", ""]
    if not ok:
        out += [f"**Failed at step `{s.get('step')}`:**", "", "```", str(s["error"])[-3000:], "```", ""]
    out += [f"- project: `{s.get('root')}`"]
    if s.get("data_version"):
        out.append(f"- data version (data.dvc md5): `{s['data_version']}`")
    if s.get("commit"):
        out.append(f"- git commit of data.dvc: `{s['commit']}`")
    out.append("")

    out += ["## Incoming data", ""]
    batches: Iterable[dict[str, Any]] = s.get("ingest") or []
    if not batches:
        out += ["No incoming batch in this run.", ""]
    else:
        out += ["| batch | checked | added | already present | rejected | quarantine |", "|---|---:|---:|---:|---:|---|"]
        reasons: collections.Counter[str] = collections.Counter()
        for b in batches:
            reasons.update(b.get("rejected_by_reason") or {})
            out.append(
                f"| {b['batch']} | {b['checked']} | {b['added']} | {b['skipped_identical']} | {b['rejected']} "
                f"| {('`' + b['quarantine'] + '`') if b.get('quarantine') else '–'} |"
            )
        out.append("")
        renamed = sum(b.get("renamed_on_clash", 0) for b in batches)
        if renamed:
            out += [f"{renamed} added file(s) clashed with a different file of the same name and were kept "
                    "under a new name.", ""]
        if reasons:
            try:
                from .imagecheck import REASONS
            except Exception:  # pragma: no cover - the summary must not fail on an import
                REASONS = {}
            out += ["Rejected (quarantined), by reason:", "", "| reason | meaning | files |", "|---|---|---:|"]
            out += [f"| {k} | {REASONS.get(k, '')} | {v} |" for k, v in sorted(reasons.items())]
            out.append("")

    gate = s.get("gate")
    out += ["## Test metrics vs champion", ""]
    if gate:
        m = {**(s.get("metrics") or {}), **(gate.get("metrics") or {})}
        cm = champion_metrics(gate.get("champion") if gate.get("champion") is not None else s.get("champion")) or {}
        keys = [k for k in KEY_METRICS if k in m or k in cm] or sorted(m)
        out += ["| metric | candidate | champion |", "|---|---:|---:|"]
        out += [f"| {k} | {_fmt(m.get(k))} | {_fmt(cm.get(k))} |" for k in keys]
        gc = gate.get("champion")
        if cm:
            how = ("re-scored on this run's test split" if isinstance(gc, dict) and gc.get("rescored")
                   else "as recorded when it was promoted")
            out += ["", f"Champion `{(gc or s.get('champion') or {}).get('bento')}`: {how}."]
        out += ["", f"## Gate: {'PASSED' if gate.get('passed') else 'FAILED'}", ""]
        out += [f"- {r}" for r in gate.get("reasons") or []] or ["- (no reasons given)"]
        out.append("")
    else:
        out += ["Not reached.", ""]

    out += ["## Bento and promotion", ""]
    if s.get("bento"):
        out.append(f"- Bento: `{s['bento']}`" + (f" (model `{s['model']}`)" if s.get("model") else ""))
    promo = s.get("promotion")
    if promo:
        out.append(f"- decision: **{promo['decision']}**")
        out += [f"  - {r}" for r in promo.get("reasons") or []]
    else:
        out.append("- not reached")
    champ = s.get("champion")
    out.append(f"- production before this run: `{champ.get('bento')}`" if champ else "- production before this run: none")
    if s.get("production_after") and s["production_after"] != champ:
        out.append(f"- production now: `{s['production_after'].get('bento')}`")
    elif champ:
        out.append("- production.json unchanged")
    out.append("")
    return "\n".join(out)
