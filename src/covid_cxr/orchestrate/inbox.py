"""The retraining inbox: which batches are new, and the ledger of the ones already processed.

    <inbox>/<batch>/<Class>/<file>                                  flat layout
    <inbox>/<batch>/[COVID-19_Radiography_Dataset/]<Class>/images/<file>   Kaggle layout

Each direct sub-folder of the inbox is a batch (layouts.scan_source reads either layout).
Hidden folders are skipped: copy a batch in under a hidden name (`.batch-007.part`) and rename it
when it is complete, so that a run never sees half a batch.

A batch is known by its content, not its name: the key is the sha256 of the sorted lines
`<class>\\t<sha256 of the file>`, one per file. Renaming the batch folder or its files, or
changing its layout, keeps the key (a renamed copy is not new); moving a film to another class
changes it (a different batch).

The ledger, registry/inbox-ledger.json, maps key -> {batch, source, files, processed_at,
outcome, data_version, flow_run}. A batch goes in once its run reached a decision (the gate
judged the model; then package/promote finished or the gate refused): a run that failed before
that leaves it out, so the next run tries it again (ingest is idempotent). The flow commits the
ledger with `commit=True`, like data.dvc.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from covid_cxr.config import Paths
from covid_cxr.hashing import sha256_file
from covid_cxr.jsonio import write_json_atomic


def batch_key(batch: Path | str) -> tuple[str, int]:
    """(content key, number of files) of one batch folder."""
    from covid_cxr.data.layouts import scan_source

    files = scan_source(Path(batch)).files
    lines = sorted(f"{f.label or f.folder or ''}\t{sha256_file(f.path)}" for f in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest(), len(lines)


def scan(inbox: Path | str) -> list[dict[str, Any]]:
    """Every non-empty batch folder of the inbox, sorted by name: {name, path, key, files}."""
    root = Path(inbox).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"inbox {root} is not a directory")
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        key, n = batch_key(d)
        if n:
            out.append({"name": d.name, "path": str(d), "key": key, "files": n})
    return out


def read_ledger(paths: Paths) -> dict[str, Any]:
    try:
        doc = json.loads(paths.ledger.read_text())
    except FileNotFoundError:
        return {"batches": {}}
    except ValueError as e:
        raise ValueError(f"{paths.ledger} is not valid JSON: {e}") from None
    doc.setdefault("batches", {})
    return doc


def new_batches(inbox: Path | str, paths: Paths) -> dict[str, Any]:
    """{"path", "new": [...], "seen": [...]}: batches whose key is not in the ledger (the first of
    several copies in one inbox), and the ones already processed (with `seen_as`: the name then)."""
    ledger = read_ledger(paths)["batches"]
    new, seen, keys = [], [], set()
    for b in scan(inbox):
        if b["key"] in ledger:
            seen.append({**b, "seen_as": ledger[b["key"]].get("batch")})
        elif b["key"] in keys:
            seen.append({**b, "seen_as": next(n["name"] for n in new if n["key"] == b["key"])})
        else:
            keys.add(b["key"])
            new.append(b)
    return {"path": str(Path(inbox).expanduser().resolve()), "new": new, "seen": seen}


def record(paths: Paths, batches: list[dict[str, Any]], outcome: str, *, data_version: str | None = None,
           flow_run: str | None = None) -> Path:
    """Add `batches` ({name, path, key, files}) to the ledger (atomic write)."""
    from covid_cxr.release.promotion import now

    doc = read_ledger(paths)
    t = now()
    for b in batches:
        doc["batches"][b["key"]] = {"batch": b["name"], "source": b["path"], "files": b["files"],
                                    "processed_at": t, "outcome": outcome, "data_version": data_version,
                                    "flow_run": flow_run}
    return write_json_atomic(paths.ledger, doc)
