"""Project-wide constants, paths and params.yaml access."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

# Fixed class order: model outputs, metrics, JSON keys and reports all use it.
CLASSES: tuple[str, ...] = ("COVID", "Normal", "Viral Pneumonia")
KAGGLE_ROOT = "COVID-19_Radiography_Dataset"


def project_root() -> Path:
    """The repo root: $COVID_CXR_ROOT, else the nearest parent of cwd holding params.yaml, else the
    checkout this package runs from (`covid-cxr predict` in any folder), else cwd."""
    env = os.environ.get("COVID_CXR_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "params.yaml").exists():
            return p
    checkout = Path(__file__).resolve().parents[2]        # src/covid_cxr/config.py -> the checkout
    return checkout if (checkout / "params.yaml").exists() and (checkout / "dvc.yaml").exists() else here


class Paths:
    """Every artifact location, relative to a project root (tests point it at a tmp dir)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else project_root()
        self.data = self.root / "data"
        self.dataset = self.data / KAGGLE_ROOT
        self.artifacts = self.root / "artifacts"
        self.manifest = self.artifacts / "data" / "manifest.csv"
        self.validation = self.artifacts / "validation"
        self.model_dir = self.artifacts / "model"
        self.train_curves = self.artifacts / "train"     # DVCLive: per-epoch loss and accuracy
        self.eval_dir = self.artifacts / "eval"
        self.gate = self.artifacts / "gate.json"
        self.headline = self.artifacts / "metrics.json"      # the one DVC metrics file (release/gate.py)
        self.model_card = self.artifacts / "model_card.md"
        self.registry = self.root / "registry"          # git-tracked records (promotion.py, inbox.py)
        self.production = self.registry / "production.json"
        self.bentos = self.registry / "bentos"          # exported Bentos, tracked by DVC (release/registry.py)
        self.ledger = self.registry / "inbox-ledger.json"
        self.cache = self.root / ".cache" / "covid_cxr"


def state_dir() -> Path:
    """Where covid-cxr keeps what it writes while it serves, per user and machine, whichever checkout
    or Bento runs: `$XDG_STATE_HOME/covid-cxr` (default `~/.local/state/covid-cxr`)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser() / "covid-cxr"


def load_params(path: Path | str | None = None) -> dict[str, Any]:
    path = Path(path) if path else project_root() / "params.yaml"
    with open(path) as f:
        return yaml.safe_load(f) or {}


def train_config(params: dict[str, Any]) -> dict[str, Any]:
    """The active training profile merged with the shared train keys."""
    t = params["train"]
    prof = t["profile"]
    if prof not in t["profiles"]:
        raise ValueError(f"train.profile={prof!r} is not one of {sorted(t['profiles'])}")
    cfg = dict(t["profiles"][prof])
    cfg["profile"] = prof
    cfg["seed"] = t["seed"]
    cfg["augment"] = dict(t["augment"])
    cfg["label_smoothing"] = t["label_smoothing"]
    cfg["mixup"] = t["mixup"]
    cfg["ema"] = t["ema"]
    cfg["calibration"] = t["calibration"]
    cfg["clean_head"] = t["clean_head"]
    cfg["input_gate"] = t["input_gate"]
    cfg["inference"] = t["inference"]
    return cfg
