"""Prediction log: one JSON line per prediction the service makes, for `covid-cxr monitor`.

The service calls three things::

    log = PredictionLog.from_env()          # once, at start-up
    log.write({"request_id": ..., "model": ..., "label": ..., "probabilities": {...},
               "verdict": "ok" | "refer", "reason": None | "low_confidence" | ...,
               "novelty": 1.23 | None, "flagged": False,
               "width": 2048, "height": 2500, "mode": "L", "format": "PNG", "sha256": "…"})
    log.close()                             # at shutdown (also registered with atexit)

Fields: `time` UTC ISO 8601 (set here when absent); `request_id` a hex/UUID id (set here when
absent); `model` the model/Bento tag; `label` the most probable class; `probabilities`
{class: p}; `verdict` `ok`|`refer` and `reason` the refer reason code (verdict.py) or null;
`novelty` the novelty score or null; `flagged` true when the novelty score is over the model's
threshold (the answer's `in_distribution` is false); `width`, `height`, `mode`, `format` of the
upload as opened (format `DICOM` for DICOM); `sha256` of the uploaded bytes.

`describe_upload(path)` gives width, height, mode, format and sha256 of an upload (header only,
no pixel decode) for callers that do not have them at hand.

What a line can hold is a fixed whitelist (`FIELDS`), each field checked for type and shape:
unknown keys are dropped, so the log can never carry pixels, file names or DICOM patient fields
even if a caller passes them. `request_id` must be an opaque hex/UUID id (anything else, e.g. a
client-chosen name, is replaced by a fresh UUID); `time` is set here (UTC, ISO 8601) unless the
caller gives a valid one.

Settings (environment, read by `from_env`):

| variable                              | default                          | meaning                      |
|---------------------------------------|----------------------------------|------------------------------|
| `COVID_CXR_PREDICTION_LOG`            | `<project>/logs/predictions.jsonl` | file path; `off` (or `0`, `false`, `no`, `none`, empty) switches logging off; `{pid}` in it becomes the process id. `<project>` is `config.project_root()`: set the path explicitly where there is no params.yaml (a Bento) |
| `COVID_CXR_PREDICTION_LOG_MAX_MB`     | `50`                             | rotate when the file would pass this size |
| `COVID_CXR_PREDICTION_LOG_BACKUPS`    | `5`                              | rotated files kept: `predictions.jsonl.1` (newest) … `.N` |
| `COVID_CXR_PREDICTION_LOG_QUEUE`      | `10000`                          | records buffered before new ones are dropped (counted) |

Writing never slows or fails a prediction: `write()` only copies the dict and puts it on a
bounded queue (no I/O, no locks held for long, never raises); a daemon thread validates,
serialises and appends in batches. A full queue drops the record and counts it
(`stats()["dropped"]`); an OSError (disk full, read-only, path gone) is logged once, counted
(`stats()["failed"]`), and the writer retries with a reopened file on the next batch.
"""
from __future__ import annotations

import atexit
import datetime as dt
import errno
import hashlib
import json
import logging
import math
import numbers
import os
import queue
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from covid_cxr.config import CLASSES, project_root

log = logging.getLogger(__name__)

ENV_PATH = "COVID_CXR_PREDICTION_LOG"
ENV_MAX_MB = "COVID_CXR_PREDICTION_LOG_MAX_MB"
ENV_BACKUPS = "COVID_CXR_PREDICTION_LOG_BACKUPS"
ENV_QUEUE = "COVID_CXR_PREDICTION_LOG_QUEUE"
OFF_VALUES = {"", "off", "0", "false", "no", "none", "disabled"}
DEFAULT_RELPATH = Path("logs") / "predictions.jsonl"
DEFAULT_MAX_MB = 50.0
DEFAULT_BACKUPS = 5
DEFAULT_QUEUE = 10_000

# The whole vocabulary of a log line. Nothing else is ever written.
FIELDS = ("time", "request_id", "model", "label", "probabilities", "verdict", "reason", "novelty", "flagged",
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


def default_path() -> Path:
    return project_root() / DEFAULT_RELPATH


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


_CHECKS = {"time": _c_time, "request_id": _c_request_id, "model": _c_model, "label": _c_label,
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


def describe_upload(path: Path | str) -> dict[str, Any]:
    """width, height, mode, format (PIL reads the header only) and sha256 of an uploaded file."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    info: dict[str, Any] = {"sha256": h.hexdigest(), "width": None, "height": None, "mode": None, "format": None}
    try:
        from PIL import Image

        with Image.open(path) as im:
            info.update(width=im.width, height=im.height, mode=im.mode, format=im.format)
    except Exception:  # not an image PIL knows: DICOM and friends are described by the caller
        pass
    return info


# ------------------------------------------------------------------------------------------------
# the writer
# ------------------------------------------------------------------------------------------------
_STOP = object()


class PredictionLog:
    """Append-only JSON-lines log with size rotation, written by a background thread.

    `write()` never blocks on I/O and never raises. Use `from_env()` in the service, in the
    serving process (the service's `__init__`, not at import: a forked child has no writer thread).
    One writer per file: with several processes, put `{pid}` in the path (the monitor reads them all).
    """

    enabled = True

    def __init__(self, path: Path | str, *, max_bytes: int = int(DEFAULT_MAX_MB * 2**20),
                 backups: int = DEFAULT_BACKUPS, queue_size: int = DEFAULT_QUEUE, batch: int = 512) -> None:
        self.path = Path(str(path).replace("{pid}", str(os.getpid())))
        self.max_bytes = max(1024, int(max_bytes))
        self.backups = max(0, int(backups))
        self._q: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self._batch = max(1, int(batch))
        self._counts = {"written": 0, "dropped": 0, "failed": 0, "sanitized": 0, "rotations": 0}
        self._fh = None
        self._size = 0
        self._warned: set[str] = set()
        self._closed = False
        self._lock = threading.Lock()  # counts only
        self._queued = 0  # no lock on the caller's path: exact from one thread, approximate from many
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ---- construction from the environment ----
    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "PredictionLog | NullPredictionLog":
        env = os.environ if environ is None else environ
        raw = env.get(ENV_PATH)
        if raw is not None and raw.strip().lower() in OFF_VALUES:
            return NullPredictionLog()
        path = Path(raw).expanduser() if raw else default_path()

        def num(name: str, default: float) -> float:
            try:
                v = float(env.get(name, default))
                return v if math.isfinite(v) and v >= 0 else default
            except ValueError:
                log.warning("prediction log: %s=%r is not a number; using %s", name, env.get(name), default)
                return default

        return cls(path, max_bytes=int(num(ENV_MAX_MB, DEFAULT_MAX_MB) * 2**20),
                   backups=int(num(ENV_BACKUPS, DEFAULT_BACKUPS)), queue_size=int(num(ENV_QUEUE, DEFAULT_QUEUE)))

    # ---- caller side: cheap, never raises ----
    def write(self, record: dict[str, Any]) -> bool:
        """Queue one prediction record; False if it was dropped (log closed, queue full, not a dict)."""
        try:
            if self._closed or not isinstance(record, dict):
                self._count("dropped")
                return False
            rec = dict(record)
            if "time" not in rec:
                rec["time"] = dt.datetime.now(dt.timezone.utc)
            probs = rec.get("probabilities")
            if isinstance(probs, dict):  # the caller may reuse its own dict; ours must not change
                rec["probabilities"] = dict(probs)
            self._q.put_nowait(rec)
            self._queued += 1
            return True
        except queue.Full:
            self._count("dropped")
            self._warn_once("full", "prediction log: queue full (%d records); dropping records until it drains",
                            self._q.maxsize)
            return False
        except Exception as e:  # never let logging break a prediction
            self._count("dropped")
            self._warn_once("write", "prediction log: could not queue a record: %s", e)
            return False

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = dict(self._counts)
        s["queued"] = self._queued
        s["pending"] = self._q.qsize()
        s["path"] = str(self.path)
        return s

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is written (or failed); True if the queue drained in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._q.unfinished_tasks == 0:
                return True
            time.sleep(0.005)
        return self._q.unfinished_tasks == 0

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout` s), then stop the thread and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._q.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    def __enter__(self) -> "PredictionLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- writer thread ----
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _drain(self, first: Any) -> tuple[list[Any], bool]:
        items, stop = [first], first is _STOP
        while not stop and len(items) < self._batch:
            try:
                it = self._q.get_nowait()
            except queue.Empty:
                break
            items.append(it)
            stop = it is _STOP
        return items, stop

    def _lines(self, items: list[Any]) -> list[bytes]:
        lines = []
        for rec in items:
            if rec is _STOP:
                continue
            try:
                clean, bad = sanitize(rec)
                if bad:
                    self._count("sanitized")
                lines.append((json.dumps(clean, separators=(",", ":"), allow_nan=False) + "\n").encode())
            except Exception as e:
                self._count("failed")
                self._warn_once("serialise", "prediction log: could not serialise a record: %s", e)
        return lines

    def _run(self) -> None:
        while True:
            items, stop = self._drain(self._q.get())
            try:
                lines = self._lines(items)
                if lines:
                    self._append(lines)
            except Exception as e:  # a bug here must not stop the thread (the queue would only fill)
                self._count("failed", sum(1 for it in items if it is not _STOP))
                self._warn_once("writer", "prediction log: writer error: %s", e)
                self._close_file()
            finally:
                for _ in items:
                    self._q.task_done()
            if stop:
                self._close_file()
                return

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab", buffering=0)
        self._size = self._fh.seek(0, os.SEEK_END)
        if self._size and not self._ends_with_newline():  # a write torn by a full disk: end that line
            self._write(b"\n")

    def _ends_with_newline(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                return f.read(1) == b"\n"
        except OSError:
            return True

    def _close_file(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None

    def _rotate(self) -> None:
        """name -> name.1 -> name.2 ... (the oldest beyond `backups` is overwritten); a fresh name."""
        self._close_file()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._count("rotations")
        self._open()

    def _append(self, lines: list[bytes]) -> None:
        """Append lines, rotating at line boundaries so a file never passes max_bytes (unless one line does)."""
        done = 0
        try:
            if self._fh is None:
                self._open()
            chunk: list[bytes] = []
            size = 0
            for line in lines:
                if chunk and self._size + size + len(line) > self.max_bytes:
                    self._write(b"".join(chunk))
                    done += len(chunk)
                    chunk, size = [], 0
                if not chunk and self._size > 0 and self._size + len(line) > self.max_bytes:
                    self._rotate()
                chunk.append(line)
                size += len(line)
            if chunk:
                self._write(b"".join(chunk))
                done += len(chunk)
        except OSError as e:
            self._count("failed", len(lines) - done)
            what = errno.errorcode.get(e.errno or 0, type(e).__name__)
            self._warn_once("oserror", "prediction log: cannot write %s (%s: %s); predictions go on, "
                            "records are dropped and counted until writing works again", self.path, what, e)
            self._close_file()  # reopen on the next batch: the disk may have room again
        finally:
            self._count("written", done)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            k = self._fh.write(view)
            if not k:
                raise OSError(errno.EIO, "short write")
            view = view[k:]
        self._size += len(data)


class NullPredictionLog:
    """The switched-off log: the same API, nothing written."""

    enabled = False
    path = None

    def write(self, record: dict[str, Any]) -> bool:
        return False

    def stats(self) -> dict[str, Any]:
        return {"queued": 0, "written": 0, "dropped": 0, "failed": 0, "sanitized": 0, "rotations": 0,
                "pending": 0, "path": None}

    def flush(self, timeout: float = 0.0) -> bool:
        return True

    def close(self, timeout: float = 0.0) -> None:
        pass


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
