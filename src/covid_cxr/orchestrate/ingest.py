"""One incoming batch into data/: check it, merge the accepted files, quarantine the rejected.

A step of the retraining flow (flows/retrain.py), over the in-process `imagecheck` /
`dataimport` functions. No Prefect import here.
"""
from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path
from typing import Any

from covid_cxr.config import Paths
from covid_cxr.runner import Log, StepError

QUARANTINE = "quarantine"


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
    from covid_cxr.config import load_params
    from covid_cxr.data import archive as dataimport, imagecheck
    from covid_cxr.data.rules import Limits

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
