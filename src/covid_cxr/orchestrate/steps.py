"""Package-side helpers for the retraining flow (flows/retrain.py).

The flow is a thin Prefect shell; everything it does is here (and in inbox.py, release.py,
runsummary.py), over the same entry points dvc.yaml uses (`dvc`, `covid-cxr ...`) plus the
in-process `imagecheck` / `dataimport` / `release` functions. No Prefect import here:
these helpers run (and are tested) without a Prefect server.
"""
from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path
from typing import Any

from covid_cxr.config import Paths
from covid_cxr.orchestrate.shell import (  # noqa: F401 - the flow's step helpers, in one namespace
    CommandFailed, Log, StepError, data_version, dvc_add_data, dvc_pull, dvc_push, dvc_repro, git_commit_data,
    git_commit_files, normalize_remote, rebuild, remote_name, run, tool_env,
)
from covid_cxr.release.promotion import KEY_METRICS

QUARANTINE = "quarantine"


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
    from covid_cxr.data import archive as dataimport, imagecheck
    from covid_cxr.data.rules import Limits
    from covid_cxr.config import load_params

    log = log or (lambda _m: None)
    paths = Paths(root)
    batch = Path(batch_dir).expanduser().resolve()
    if not batch.is_dir():
        raise StepError(f"incoming batch {batch} is not a directory")
    limits = Limits.from_params(load_params(paths.root / "params.yaml"))
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
    from covid_cxr.release import promotion

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
    from covid_cxr.release.promotion import store_model_path

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
    from covid_cxr.release import registry as release

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
from covid_cxr.orchestrate.runsummary import SUMMARY_METRICS, summary_markdown  # noqa: E402,F401
