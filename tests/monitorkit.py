"""Synthetic reference predictions and prediction logs for the monitor tests (no model, no images)."""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

CLASSES = ("COVID", "Normal", "Viral Pneumonia")
REPO = Path(__file__).resolve().parents[1]
BASE_MIX = (0.36, 0.45, 0.19)
NOW = dt.datetime(2025, 3, 10, 12, 0, tzinfo=dt.timezone.utc)


def monitor_params(**over: Any) -> dict[str, Any]:
    """The repo's params.yaml, with `monitor:` keys overridden."""
    prm = yaml.safe_load((REPO / "params.yaml").read_text())
    prm["monitor"].update(over)
    return prm


def _probs(rng: np.random.Generator, label: int, conf_a: float, conf_b: float) -> list[float]:
    top = float(rng.beta(conf_a, conf_b))
    top = max(top, 1 / 3 + 1e-3)
    rest = rng.dirichlet([1, 1]) * (1 - top)
    p = [0.0, 0.0, 0.0]
    p[label] = top
    others = [i for i in range(3) if i != label]
    p[others[0]], p[others[1]] = float(rest[0]), float(rest[1])
    return p


def sample(n: int, seed: int, *, mix=BASE_MIX, conf=(30.0, 1.5), novelty=(0.0, 1.0), novel_over: float = 2.33,
           low_conf: float = 0.6, size=(256, 256), mode="L", fmt="PNG") -> list[dict[str, Any]]:
    """n synthetic predictions: label, probabilities, novelty, verdict/reason/flagged, input size/mode/format."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y = int(rng.choice(3, p=np.asarray(mix) / sum(mix)))
        p = _probs(rng, y, *conf)
        nov = float(rng.normal(*novelty))
        flagged = nov > novel_over
        reason = "outside_training_data" if flagged else "low_confidence" if max(p) < low_conf else None
        out.append({"label": CLASSES[y], "probabilities": dict(zip(CLASSES, p)), "novelty": round(nov, 4),
                    "flagged": flagged, "verdict": "refer" if reason else "ok", "reason": reason,
                    "width": size[0], "height": size[1], "mode": mode, "format": fmt})
    return out


def write_reference(root: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """artifacts/eval/predictions.csv + artifacts/data/manifest.csv as evaluate / prepare write them."""
    pred = root / "artifacts" / "eval" / "predictions.csv"
    man = root / "artifacts" / "data" / "manifest.csv"
    pred.parent.mkdir(parents=True, exist_ok=True)
    man.parent.mkdir(parents=True, exist_ok=True)
    with open(pred, "w", newline="") as f, open(man, "w", newline="") as g:
        w = csv.DictWriter(f, ["path", "label", "pred", *[f"p_{c}" for c in CLASSES], "novelty", "verdict", "reason"],
                           lineterminator="\n")
        m = csv.DictWriter(g, ["path", "label", "sha256", "width", "height", "mode", "bytes", "group", "split"],
                           lineterminator="\n")
        w.writeheader()
        m.writeheader()
        for i, r in enumerate(rows):
            path = f"data/COVID-19_Radiography_Dataset/{r['label']}/images/{r['label']}-{i}.png"
            w.writerow({"path": path, "label": r["label"], "pred": r["label"],
                        **{f"p_{c}": round(r["probabilities"][c], 5) for c in CLASSES},
                        "novelty": r["novelty"], "verdict": r["verdict"], "reason": r["reason"] or ""})
            m.writerow({"path": path, "label": r["label"], "sha256": hashlib.sha256(path.encode()).hexdigest(),
                        "width": r["width"], "height": r["height"], "mode": r["mode"], "bytes": 1000,
                        "group": f"g{i}", "split": "test"})
    return pred, man


def log_lines(rows: list[dict[str, Any]], *, start: dt.datetime, step: dt.timedelta) -> list[str]:
    lines = []
    for i, r in enumerate(rows):
        rec = {"time": (start + i * step).isoformat(timespec="milliseconds"),
               "request_id": hashlib.md5(str(i).encode()).hexdigest(), "model": "covid_cxr_model:test", **r,
               "sha256": hashlib.sha256(str(i).encode()).hexdigest()}
        lines.append(json.dumps(rec))
    return lines


def write_log(path: Path, rows: list[dict[str, Any]], *, start: dt.datetime | None = None,
              step: dt.timedelta = dt.timedelta(minutes=1)) -> Path:
    """A log whose records end just before NOW (one a minute by default)."""
    start = start or NOW - step * (len(rows) + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(log_lines(rows, start=start, step=step)) + "\n")
    return path
