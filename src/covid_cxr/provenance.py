"""What a model was built from: the data version, the code version and the params, one definition each.

train records them in model.json; package copies them onto the BentoML model and the Bento.
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
