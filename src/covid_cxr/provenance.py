"""What a model was built from: the data version, the code version and the params, one definition each;
and the per-run facts of a stage (when, how long, at which commit).

train records the data version and the params hash in model.json (a DVC output: a pure function of
data, code and params); package puts the commit on the BentoML model and the Bento as labels. The
per-run facts go to `logs/runs/<stage>.json`, which no stage declares: they never make dvc.lock stale.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any


def data_md5(root: Path) -> str | None:
    """The md5 that `data.dvc` pins for the training data (the dataset version), or None."""
    import yaml

    f = Path(root) / "data.dvc"
    if not f.exists():
        return None
    outs = (yaml.safe_load(f.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def git_sha(root: Path) -> str | None:
    """HEAD of the checkout at `root`, or None outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def params_hash(cfg: dict[str, Any]) -> str:
    """12 hex digits over the params, key order ignored."""
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def record_run(root: Path, stage: str, timings: dict[str, float], total_s: float) -> Path:
    """logs/runs/<stage>.json: this run's wall times, its start time (UTC) and the commit it ran at."""
    import time

    from covid_cxr.jsonio import write_json_atomic

    return write_json_atomic(Path(root) / "logs" / "runs" / f"{stage}.json", {
        "stage": stage, "timings_s": timings, "total_s": round(total_s, 1), "git_sha": git_sha(root),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
