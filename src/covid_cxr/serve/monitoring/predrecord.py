"""What a prediction log line holds (predlog.py writes them), and reading the lines back.

Fields: `time` UTC ISO 8601 (set here when absent); `request_id` a hex/UUID id (set here when
absent); `model` the model's id (its store tag, or `dir:<sha>` for a model directory); `bento` the
Bento tag it was served from (null: served from source, or `covid-cxr predict`); `label` the most probable class; `probabilities`
{class: p}; `verdict` `ok`|`refer` and `reason` the refer reason code (verdict.py) or null;
`novelty` the novelty score or null; `flagged` true when the novelty score is over the model's
threshold (the answer's `in_distribution` is false); `width`, `height`, `mode`, `format` of the
upload as opened (format `DICOM` for DICOM); `sha256` of the uploaded bytes.

What a line can hold is a fixed whitelist (`FIELDS`), each field checked for type and shape:
unknown keys are dropped, so the log can never carry pixels, file names or DICOM patient fields
even if a caller passes them. `request_id` must be an opaque hex/UUID id (anything else, e.g. a
client-chosen name, is replaced by a fresh UUID); `time` is set here (UTC, ISO 8601) unless the
caller gives a valid one.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import numbers
import re
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from covid_cxr.config import CLASSES

# The whole vocabulary of a log line. Nothing else is ever written.
FIELDS = ("time", "request_id", "model", "bento", "label", "probabilities", "verdict", "reason", "novelty", "flagged",
          "width", "height", "mode", "format", "sha256")
VERDICTS = ("ok", "refer")
# PIL image modes; anything else is written as "other".
MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                   "I", "F", "I;16", "I;16L", "I;16B", "I;16N", "BGR;15", "BGR;16", "BGR;24"})
# Upload formats (PIL's format names, plus DICOM); anything else is written as "OTHER".
FORMATS = frozenset({"PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "DICOM", "MPO", "PPM", "JPEG2000", "ICO", "TGA"})
_HEX_ID = re.compile(r"^[0-9a-fA-F]{8}(?:-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}$|^[0-9a-fA-F]{16,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODEL = re.compile(r"^[A-Za-z0-9_.:+\-]{1,128}$")  # a model / Bento tag, e.g. covid_cxr_model:abc123
_REASON = re.compile(r"^[a-z][a-z0-9_]{0,47}$")  # a reason code, e.g. outside_training_data
MAX_SIDE = 1_000_000


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
_BAD = object()  # a value that failed its check


def _num(v: Any) -> float | None:
    """A finite real number (Python or numpy), else None. Booleans are not numbers here."""
    t = type(v)
    if t is not float and t is not int:
        if t is bool or not isinstance(v, numbers.Real):
            return None
    f = float(v)
    return f if math.isfinite(f) else None


def _time(v: Any) -> str | None:
    if isinstance(v, dt.datetime):
        t = v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)
        return t.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds")
    if isinstance(v, str) and len(v) <= 40:
        try:
            t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return None
        return _time(t)
    return None


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _c_time(v: Any) -> Any:
    t = _time(v)
    return _BAD if t is None else t


def _c_request_id(v: Any) -> Any:
    return v.lower() if type(v) is str and _HEX_ID.match(v) else _BAD


def _c_model(v: Any) -> Any:
    return v if type(v) is str and _MODEL.match(v) else _BAD


def _c_label(v: Any) -> Any:
    return v if type(v) is str and v in CLASSES else _BAD


def _c_verdict(v: Any) -> Any:
    return v if type(v) is str and v in VERDICTS else _BAD


def _c_reason(v: Any) -> Any:
    return v if type(v) is str and _REASON.match(v) else _BAD


def _c_novelty(v: Any) -> Any:
    f = _num(v)
    return _BAD if f is None else round(f, 6)


def _c_flagged(v: Any) -> Any:
    if v is True or v is False:
        return v
    if getattr(getattr(v, "dtype", None), "kind", "") == "b" or _num(v) in (0.0, 1.0):
        return bool(v)
    return _BAD


def _c_side(v: Any) -> Any:
    f = _num(v)
    if f is None or f != int(f) or not 1 <= f <= MAX_SIDE:
        return _BAD
    return int(f)


def _c_mode(v: Any) -> Any:
    return v if type(v) is str and v in MODES else _BAD


def _c_format(v: Any) -> Any:
    if type(v) is str:
        u = v.upper()
        if u in FORMATS:
            return u
    return _BAD


def _c_sha256(v: Any) -> Any:
    if type(v) is str:
        low = v.lower()
        if _SHA256.match(low):
            return low
    return _BAD


_CHECKS = {"time": _c_time, "request_id": _c_request_id, "model": _c_model, "bento": _c_model, "label": _c_label,
           "verdict": _c_verdict, "reason": _c_reason, "novelty": _c_novelty, "flagged": _c_flagged,
           "width": _c_side, "height": _c_side, "mode": _c_mode, "format": _c_format, "sha256": _c_sha256}
_FIELDSET = frozenset(FIELDS)
_INVALID = {"mode": "other", "format": "OTHER"}  # what an unknown mode / format is written as


def _probabilities(v: Any) -> tuple[dict[str, float] | None, int]:
    if not isinstance(v, dict):
        return None, 1
    clean = {}
    for c in CLASSES:
        p = _num(v.get(c))
        if p is not None and -1e-6 <= p <= 1 + 1e-6:
            clean[c] = round(min(1.0, max(0.0, p)), 6)
    return clean or None, len(v) - len(clean)


def sanitize(record: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(the record cut down to `FIELDS` with each value checked, how many keys were dropped or voided).

    Every field is present in the output, in `FIELDS` order: null when missing or invalid, except
    `time` (now) and `request_id` (a fresh UUID), which are always set, and `mode` / `format`,
    which are "other" / "OTHER" when not a known name.
    """
    bad = 0
    for k in record:
        if k not in _FIELDSET:
            bad += 1
    out: dict[str, Any] = {}
    get = record.get
    for k in FIELDS:
        v = get(k)
        if k == "probabilities":
            out[k], b = (None, 0) if v is None else _probabilities(v)
            bad += b
            continue
        c = None if v is None else _CHECKS[k](v)
        if c is _BAD:
            bad += 1
            c = _INVALID.get(k)
        out[k] = c
    if out["time"] is None:
        out["time"] = now_iso()
    if out["request_id"] is None:
        out["request_id"] = uuid.uuid4().hex
    return out, bad


# ------------------------------------------------------------------------------------------------
# reading back
# ------------------------------------------------------------------------------------------------
def rotated_paths(path: Path | str) -> list[Path]:
    """The log file and its rotated siblings (`name.1` … `name.N`), oldest first; only those that exist."""
    path = Path(path)
    olds = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            suffix = p.name[len(path.name) + 1:]
            if p.name.startswith(path.name + ".") and suffix.isdigit():
                olds.append((int(suffix), p))
    out = [p for _, p in sorted(olds, reverse=True)]
    if path.exists():
        out.append(path)
    return out


def read_files(files: Iterable[Path | str]) -> Iterator[dict[str, Any]]:
    """Every JSON object line of the given files, in order; torn or garbage lines skipped."""
    for p in files:
        try:
            with open(p, "rb") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:  # a torn last line, or garbage
                        continue
                    if isinstance(rec, dict):
                        yield rec
        except FileNotFoundError:  # rotated away while reading
            continue


def read_records(path: Path | str) -> Iterator[dict[str, Any]]:
    """Every record of the log and its rotated files, oldest first."""
    return read_files(rotated_paths(path))
