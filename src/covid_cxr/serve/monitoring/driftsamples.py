"""The two samples `covid-cxr monitor` (monitor.py) compares, one row per prediction with the same
fields: a window of the prediction log, and the test split's predictions (the reference).
"""
from __future__ import annotations

import csv
import datetime as dt
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import typer

from covid_cxr.config import CLASSES

NOVEL_REASON = "outside_training_data"  # verdict.py: the reason a novelty flag gives
_REL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


# ------------------------------------------------------------------------------------------------
# time
# ------------------------------------------------------------------------------------------------
def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def parse_when(when: str | dt.datetime | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """`7d`, `24h`, `30m`, `2w` (before `now`), or an ISO date / date-time (UTC unless it says)."""
    if when is None or isinstance(when, dt.datetime):
        return when if when is None or when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    now = now or utcnow()
    m = _REL.match(when)
    if m:
        return now - dt.timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        t = dt.datetime.fromisoformat(when.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{when!r}: use an ISO date/time (2024-05-01, 2024-05-01T08:00) "
                                 "or a span before now (30m, 24h, 7d, 2w)") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _rec_time(rec: dict[str, Any]) -> dt.datetime | None:
    t = rec.get("time")
    if not isinstance(t, str):
        return None
    try:
        v = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        return None
    return v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)


# ------------------------------------------------------------------------------------------------
# the two samples: one row per prediction with the same fields
# ------------------------------------------------------------------------------------------------
def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _i(v: Any) -> int | None:
    x = _f(v)
    return int(x) if x is not None and x >= 1 else None


def _row(label, probs: dict[str, float | None], flagged, verdict, novelty, width, height, mode, fmt) -> dict:
    ps = [p for p in (probs or {}).values() if p is not None]
    return {"label": label if label in CLASSES else None, "confidence": max(ps) if ps else None,
            "flagged": flagged, "refer": None if verdict not in ("ok", "refer") else verdict == "refer",
            "novelty": novelty, "width": width, "height": height, "mode": mode or None,
            "format": fmt.upper() if isinstance(fmt, str) and fmt else None}


def window_rows(records: Iterable[dict[str, Any]], since: dt.datetime | None, until: dt.datetime | None
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Log records with since <= time < until, as rows; and what the window holds."""
    rows, first, last, undated = [], None, None, 0
    for rec in records:
        t = _rec_time(rec)
        if t is None:
            undated += 1
            continue
        if (since and t < since) or (until and t >= until):
            continue
        first = t if first is None or t < first else first
        last = t if last is None or t > last else last
        probs = rec.get("probabilities") if isinstance(rec.get("probabilities"), dict) else {}
        fl = rec.get("flagged")
        if not isinstance(fl, bool):
            fl = None if rec.get("verdict") is None else rec.get("reason") == NOVEL_REASON
        rows.append(_row(rec.get("label"), {k: _f(v) for k, v in probs.items()}, fl, rec.get("verdict"),
                         _f(rec.get("novelty")), _i(rec.get("width")), _i(rec.get("height")),
                         rec.get("mode") if isinstance(rec.get("mode"), str) else None,
                         rec.get("format") if isinstance(rec.get("format"), str) else None))
    iso = (lambda t: t.isoformat() if t else None)
    return rows, {"since": iso(since), "until": iso(until), "first": iso(first), "last": iso(last),
                  "n": len(rows), "undated_lines": undated}


def reference_rows(predictions: Path, manifest: Path | None) -> list[dict[str, Any]]:
    """The evaluate stage's test predictions as rows: with their own `width`, `height`, `mode`
    columns (evaluate writes them; the copy packaged with a model, `reference.csv`, has them), else
    the manifest's.

    `flagged`: a `flagged` column if there is one, else reason == outside_training_data (verdict.py's
    novelty reason), else unknown. `novelty`: the `novelty` column (older files: `ood_score`).
    """
    sizes: dict[str, tuple[int | None, int | None, str | None]] = {}
    if manifest is not None and manifest.exists():
        with open(manifest, newline="") as f:
            for r in csv.DictReader(f):
                sizes[r["path"]] = (_i(r.get("width")), _i(r.get("height")), r.get("mode") or None)
    rows = []
    with open(predictions, newline="") as f:
        for r in csv.DictReader(f):
            probs = {c: _f(r.get(f"p_{c}")) for c in CLASSES}
            label = r.get("pred") or None
            if label is None and any(p is not None for p in probs.values()):
                label = max(probs, key=lambda c: -1 if probs[c] is None else probs[c])
            if "flagged" in r:
                fl = str(r["flagged"]).strip().lower() in ("1", "true", "yes")
            elif "reason" in r:
                fl = (r.get("reason") or "") == NOVEL_REASON
            else:
                fl = None
            nov = _f(r.get("novelty")) if "novelty" in r else _f(r.get("ood_score"))
            w, h, mode = ((_i(r.get("width")), _i(r.get("height")), r.get("mode") or None) if r.get("width")
                          else sizes.get(r.get("path", ""), (None, None, None)))
            suffix = Path(r.get("path") or "").suffix.lstrip(".").upper()
            fmt = {"JPG": "JPEG", "TIF": "TIFF", "DCM": "DICOM"}.get(suffix, suffix) or None
            rows.append(_row(label, probs, fl, r.get("verdict") or None, nov, w, h, mode, fmt))
    return rows


def size_bin(w: int | None, h: int | None, edges: Sequence[int], square_tol: float) -> str | None:
    """'513-1024 portrait': the longer side's bin (edges in px, upper bound inclusive) and the shape."""
    if not w or not h:
        return None
    side, lo, name = max(w, h), 0, None
    for e in edges:
        if side <= e:
            name = f"{lo + 1}-{e}"
            break
        lo = e
    if name is None:
        name = f">{edges[-1]}" if edges else "any"
    r = w / h
    shape = "square" if abs(r - 1) <= square_tol else "landscape" if r > 1 else "portrait"
    return f"{name} {shape}"


def log_files(log_path: Path | str) -> list[Path]:
    """The log and its rotated files; a `{pid}` in the name matches every process's log."""
    from covid_cxr.serve.monitoring.predrecord import rotated_paths

    log_path = Path(log_path)
    if "{pid}" not in log_path.name:
        return rotated_paths(log_path)
    bases = sorted(log_path.parent.glob(log_path.name.replace("{pid}", "*"))) if log_path.parent.is_dir() else []
    return [p for b in bases for p in rotated_paths(b)]
