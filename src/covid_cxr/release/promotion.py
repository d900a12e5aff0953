"""Promotion: the one champion rule, and the production record it changes.

This module owns, for the whole project (gate, package, promote, the retraining flow):
- KEY_METRICS, the test metrics two models are compared on;
- the tolerance (`champion_tolerance`: params.yaml `gate.champion_tolerance`, default 0.005);
- the champion rule (`regressions`, `is_better`);
- the production record `registry/production.json`, tracked by git (`read_record`,
  `production`, `new_record`, `write_record`, `rollback_target`).

The rule. A candidate replaces the champion only if
  1. it passed the gate (the caller checks the model's `gate` label in the BentoML store),
  2. none of the key metrics is more than the tolerance below the champion's (`regressions`:
     the gate applies this same check, so a regressing model is not even packaged), and
  3. the key metrics improve in total (sum of the differences > 0): a tie keeps the champion.
With nothing in production, a gate-passing candidate wins. The champion's metrics are the gate's
re-scoring of the champion on the candidate's own test split when gate.json names the Bento now
in production (`champion_metrics`), else the metrics recorded when it was promoted.

The record (one JSON object; `git log -p registry/production.json` is its full history):
    bento, model       the Bento in production and the model it carries
    metrics            its key test metrics (+ ece_after, flagged), as packaged
    export             registry/bentos/<name>-<version>.bento: the exported Bento, tracked by
                       DVC (`<export>.dvc` in git, the file itself on the DVC remote)
    remote             the DVC remote it was pushed to (an absolute path or a URL): where
                       `covid-cxr pull-production` fetches it, with no DVC config
    action, reasons    promote | force | rollback, and why
    promoted_at        UTC time
    data_md5, git_sha, params_hash   what the model was built from
    history            the previous entries, newest first (no nested history)
Nothing here talks to BentoML, DVC or git except `store_model_path` (a store lookup); sharing
the record and the Bento is release/registry.py's job.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from covid_cxr.config import Paths, load_params
from covid_cxr.jsonio import read_json, write_json_atomic

KEY_METRICS = ("accuracy", "macro_f1", "covid_recall")
DEFAULT_TOLERANCE = 0.005
RECORDED_METRICS = (*KEY_METRICS, "covid_specificity", "ece_after", "flagged", "n_test")
HISTORY_LIMIT = 50
ENTRY_KEYS = ("bento", "model", "metrics", "export", "remote", "action", "reasons", "promoted_at",
              "data_md5", "git_sha", "params_hash")


class PromotionError(RuntimeError):
    """A promotion or rollback was refused; the message says why. Nothing was changed."""


# ---------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------
def champion_tolerance(root: Path | str | None = None, params: dict[str, Any] | None = None) -> float:
    """params.yaml `gate.champion_tolerance` (DEFAULT_TOLERANCE when absent or unreadable)."""
    try:
        if params is None:
            params = load_params(Path(root or Paths().root) / "params.yaml")
        return float((params.get("gate") or {}).get("champion_tolerance", DEFAULT_TOLERANCE))
    except (OSError, TypeError, ValueError, AttributeError):
        return DEFAULT_TOLERANCE


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def regressions(new: dict[str, Any], champion: dict[str, Any] | None, tol: float) -> list[dict[str, Any]]:
    """Condition 2, per key metric both sides have: {name, value, champion, ok} with
    ok = value >= champion - tol. The gate turns these into checks; `is_better` into reasons."""
    out = []
    for k in KEY_METRICS:
        if champion and _num(champion.get(k)) and _num(new.get(k)):
            v, c = float(new[k]), float(champion[k])
            out.append({"name": k, "value": v, "champion": c, "ok": v >= c - tol})
    return out


def is_better(new_metrics: dict[str, Any] | None, champion_metrics: dict[str, Any] | None,
              tolerance: float = DEFAULT_TOLERANCE) -> tuple[bool, list[str]]:
    """Conditions 2 and 3 of the rule: (candidate wins?, human-readable reasons)."""
    new = new_metrics or {}
    missing = [k for k in KEY_METRICS if not _num(new.get(k))]
    if missing:
        return False, [f"candidate metrics lack {', '.join(missing)}"]
    if not champion_metrics:
        return True, ["nothing in production yet"]
    if any(not _num(champion_metrics.get(k)) for k in KEY_METRICS):
        return True, ["the champion has no comparable key metrics"]
    reasons, total, worse = [], 0.0, False
    for r in regressions(new, champion_metrics, tolerance):
        d = r["value"] - r["champion"]
        total += d
        verdict = "better" if d > 0 else "equal" if d == 0 else "worse"
        if not r["ok"]:
            worse, verdict = True, f"worse by more than the {tolerance:g} tolerance"
        reasons.append(f"{r['name']}: {r['value']:.4f} vs champion {r['champion']:.4f} ({verdict})")
    if worse:
        return False, reasons + ["a key metric dropped too far: the champion stays"]
    if total <= 0:
        return False, reasons + [f"no net improvement (sum of differences {total:+.4f}): the champion stays"]
    return True, reasons + [f"net improvement {total:+.4f} on the key metrics"]


def champion_metrics(paths: Paths, champion: dict[str, Any] | None) -> dict[str, Any] | None:
    """The champion's metrics to compare with: the gate's re-scoring on the candidate's test
    split when artifacts/gate.json names the Bento now in production, else the recorded ones."""
    if not champion:
        return None
    gate = read_json(paths.gate)
    gc = gate.get("champion") if isinstance(gate, dict) else None
    if isinstance(gc, dict) and gc.get("bento") == champion.get("bento") and gc.get("metrics"):
        return gc["metrics"]
    return champion.get("metrics")


def decide(paths: Paths, bento: str, metrics: dict[str, Any], force: bool = False) -> tuple[bool, str, list[str]]:
    """Should `bento` (with these test metrics) go to production now? (yes?, action, reasons).
    `force` skips conditions 2-3, never the gate (checked by the caller on the store label)."""
    champ = production(paths)
    if champ and champ.get("bento") == bento:
        return False, "none", [f"{bento} is already in production"]
    better, reasons = is_better(metrics, champion_metrics(paths, champ), champion_tolerance(paths.root))
    if better:
        return True, "promote", reasons
    if force:
        return True, "force", reasons + ["--force: promoted although the rule keeps the champion (the gate still applies)"]
    return False, "none", reasons


# ---------------------------------------------------------------------------------------------
# the record
# ---------------------------------------------------------------------------------------------
def read_record(paths: Paths | None = None) -> dict[str, Any]:
    """The whole record ({"bento": None, "history": []} when nothing was ever promoted)."""
    paths = paths or Paths()
    try:
        rec = json.loads(paths.production.read_text())
    except FileNotFoundError:
        return {"bento": None, "history": []}
    except ValueError as e:
        raise PromotionError(f"{paths.production} is not valid JSON: {e}") from None
    if not isinstance(rec, dict):
        raise PromotionError(f"{paths.production} is not a production record")
    rec.setdefault("history", [])
    return rec


def production(paths: Paths | None = None) -> dict[str, Any] | None:
    """The entry in production, or None."""
    rec = read_record(paths)
    return rec if rec.get("bento") else None


def _entry(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in ENTRY_KEYS if rec.get(k) is not None}


def new_record(paths: Paths, entry: dict[str, Any]) -> dict[str, Any]:
    """The record with `entry` in production and the current one pushed onto the history."""
    cur = read_record(paths)
    history = list(cur.get("history") or [])
    if cur.get("bento"):
        history.insert(0, _entry(cur))
    rec = {**_entry(entry), "promoted_at": entry.get("promoted_at") or now()}
    rec["metrics"] = {k: v for k, v in (entry.get("metrics") or {}).items() if k in RECORDED_METRICS}
    rec["history"] = history[:HISTORY_LIMIT]
    return rec


def write_record(paths: Paths, rec: dict[str, Any]) -> Path:
    """Atomic write (a reader never sees half a record); sorted keys, so diffs stay small."""
    return write_json_atomic(paths.production, rec)


def rollback_target(paths: Paths, to: str | None = None) -> dict[str, Any]:
    """The history entry a rollback returns to: the one before the current (default), or the
    newest entry whose bento is `to`."""
    rec = read_record(paths)
    if not rec.get("bento"):
        raise PromotionError(f"nothing is in production ({paths.production}): nothing to roll back")
    history = [h for h in rec.get("history") or [] if h.get("bento")]
    if to is None:
        older = [h for h in history if h["bento"] != rec["bento"]]
        if not older:
            raise PromotionError(f"{rec['bento']} is the only Bento ever promoted: nothing to roll back to")
        return older[0]
    for h in history:
        if h["bento"] == to:
            return h
    raise PromotionError(f"{to} is not in the production history ({', '.join(h['bento'] for h in history) or 'empty'})")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def store_model_path(model_tag: str | None) -> Path | None:
    """Where the local BentoML store keeps `model_tag` (None if it is not there)."""
    if not model_tag:
        return None
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        return Path(bentoml.models.get(model_tag).path)
    except (BentoMLException, ValueError):
        return None
