"""Prediction log: one JSON line per prediction the service makes, for `covid-cxr monitor`.

The service calls three things::

    log = PredictionLog.configured(settings.log)   # once, at start-up
    log.write({"request_id": ..., "model": ..., "label": ..., "probabilities": {...},
               "verdict": "ok" | "refer", "reason": None | "low_confidence" | ...,
               "novelty": 1.23 | None, "flagged": False,
               "width": 2048, "height": 2500, "mode": "L", "format": "PNG", "sha256": "…"})
    log.close()                             # at shutdown (also registered with atexit)

Each record is cut down to the whitelist of predrecord.py (`sanitize`) before it is written;
predrecord.py also reads the log back.

Where: `COVID_CXR_PREDICTION_LOG` (a file path; `off`, `0`, `false`, `no`, `none` or empty switch
logging off; `{pid}` in it becomes the process id), else `~/.local/state/covid-cxr/predictions.jsonl`
(`config.state_dir()`): the same for `covid-cxr serve` (a Bento or a model directory), `bentoml
serve`, `covid-cxr predict` and `covid-cxr monitor`, whatever folder they run in. Rotation:
params.yaml `serve.log_max_mb` (rotate when the file would pass it), `serve.log_backups` (rotated
files kept: `predictions.jsonl.1` newest … `.N`), `serve.log_queue` (records buffered before new
ones are dropped, counted).

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
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from covid_cxr.config import state_dir
from covid_cxr.serve.monitoring.predrecord import sanitize

log = logging.getLogger(__name__)

ENV_PATH = "COVID_CXR_PREDICTION_LOG"
OFF_VALUES = {"", "off", "0", "false", "no", "none", "disabled"}
LOG_NAME = "predictions.jsonl"


def default_path() -> Path:
    """The prediction log's one default location (config.state_dir)."""
    return state_dir() / LOG_NAME


def configured_path(environ: dict[str, str] | None = None) -> Path | None:
    """Where the prediction log is written and read: $COVID_CXR_PREDICTION_LOG, else `default_path()`;
    None when that variable switches it off."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_PATH)
    if raw is not None and raw.strip().lower() in OFF_VALUES:
        return None
    return Path(raw).expanduser() if raw else default_path()


# ------------------------------------------------------------------------------------------------
# the writer
# ------------------------------------------------------------------------------------------------
_STOP = object()


class PredictionLog:
    """Append-only JSON-lines log with size rotation, written by a background thread.

    `write()` never blocks on I/O and never raises. Use `configured()` in the service, in the
    serving process (the service's `__init__`, not at import: a forked child has no writer thread).
    One writer per file: with several processes, put `{pid}` in the path (the monitor reads them all).
    """

    enabled = True

    def __init__(self, path: Path | str, *, max_bytes: int, backups: int, queue_size: int, batch: int = 512) -> None:
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
    def configured(cls, log: dict[str, Any], environ: dict[str, str] | None = None
                   ) -> "PredictionLog | NullPredictionLog":
        """The log where `configured_path` says, rotated as `log` says ({max_mb, backups, queue}:
        params.yaml `serve.log_*`); the switched-off log when the environment says off."""
        path = configured_path(environ)
        if path is None:
            return NullPredictionLog()
        return cls(path, max_bytes=int(float(log["max_mb"]) * 2**20), backups=int(log["backups"]),
                   queue_size=int(log["queue"]))

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
