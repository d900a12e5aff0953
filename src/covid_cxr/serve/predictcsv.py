"""The results CSV of `covid-cxr predict` (predict.py).

The CSV (--out, or stdout)
    One row per file: COLUMNS below. A file that cannot be scored gets a row with `error` (the
    reason code, as the API's) and `error_detail`; the run goes on. Rows are appended a batch at a
    time (one write + fsync per batch; a torn last line from a killed run is cut off on the next
    run). A second run with the same --out skips every file whose (path, sha256, model) already has
    a row, so an interrupted run resumes and a changed file (or a new model) is scored again; the
    file's older row is then dropped (the CSV is rewritten once, atomically, at the end).
"""
from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from covid_cxr.config import CLASSES
from covid_cxr.serve.predicterror import PredictError

PROB_COLUMNS = tuple("p_" + re.sub(r"\W+", "_", c) for c in CLASSES)   # p_COVID, p_Normal, p_Viral_Pneumonia
COLUMNS = ("path", "sha256", "true_label", "label", "verdict", "reason", *PROB_COLUMNS, "novelty",
           "in_distribution", "model", "error", "error_detail", "heatmap", "scored_at")


class ResultsCsv:
    """The --out CSV: what it already holds, batch appends, and the final compaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done: dict[str, tuple[str, str]] = {}   # path -> (sha256, model) of its last row
        self.rows_per_path: Counter = Counter()
        self.superseded: set[str] = set()
        self._load()

    def _load(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):           # a run killed mid-write: drop the torn line
            cut = data.rfind(b"\n") + 1
            os.truncate(self.path, cut)
            data = data[:cut]
        if not data:
            return
        rows = csv.reader(io.StringIO(data.decode("utf-8")))
        header = next(rows, None)
        if tuple(header or ()) != COLUMNS:
            raise PredictError(f"{self.path} has other columns than `covid-cxr predict` writes; "
                               "pass another --out (or move that file away)")
        for r in rows:
            if len(r) != len(COLUMNS):
                continue
            row = dict(zip(COLUMNS, r))
            self.rows_per_path[row["path"]] += 1
            self.done[row["path"]] = (row["sha256"], row["model"])

    def is_done(self, path: str, sha256: str, model: str) -> bool:
        return bool(sha256) and self.done.get(path) == (sha256, model)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """One write and one fsync for the whole batch."""
        if not rows:
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        new = not self.path.exists() or self.path.stat().st_size == 0
        if new:
            w.writerow(COLUMNS)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r[c] for c in COLUMNS])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            if r["path"] in self.done or self.rows_per_path[r["path"]]:
                self.superseded.add(r["path"])
            self.rows_per_path[r["path"]] += 1
            self.done[r["path"]] = (r["sha256"] or "", r["model"])

    def compact(self) -> int:
        """Keep only the last row of each path (atomic rewrite). -> rows dropped."""
        if not self.path.exists() or not any(n > 1 for n in self.rows_per_path.values()):
            return 0
        with open(self.path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))[1:]
        last: dict[str, list[str]] = {}
        for r in rows:
            if len(r) == len(COLUMNS):
                last.pop(r[0], None)     # re-insert: a re-scored file moves to where it was re-scored
                last[r[0]] = r
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(COLUMNS)
            w.writerows(last.values())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.rows_per_path = Counter({p: 1 for p in last})
        return len(rows) - len(last)
