"""Progress output that suits where it goes: live bars on a terminal, a line now and then in a log.

`dvc repro > log` (or a Prefect worker) is not a terminal: a tqdm bar there is thousands of
carriage returns on one endless line, and fastai's bars are worse. Here:

- `tqdm(...)`: the package's tqdm. On a terminal, plain `tqdm.auto.tqdm`. Otherwise ASCII,
  refreshed every `LOG_INTERVAL_S` seconds (env `COVID_CXR_PROGRESS_INTERVAL`), each refresh one
  newline-terminated line with no carriage return, and the final state always printed.
- `throttle_tqdm_env()`: for tqdm bars this package does not create (called by the CLI before
  anything imports tqdm): sets `TQDM_MININTERVAL` / `TQDM_MAXINTERVAL` when stderr is not a terminal.
- `quiet_fastai_if_not_tty(learn)`: when stdout is not a terminal, removes fastai's
  `ProgressCallback` from a Learner and adds `EpochLines`, which prints the metric names once and
  one line per epoch (what fastai's table shows, without the per-batch bars).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, TextIO

LOG_INTERVAL_S = 30.0


def interactive(stream: Any = None) -> bool:
    """Whether `stream` (default: stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty / closed
        return False


def log_interval() -> float:
    try:
        return float(os.environ.get("COVID_CXR_PROGRESS_INTERVAL", LOG_INTERVAL_S))
    except ValueError:
        return LOG_INTERVAL_S


class LineWriter:
    """A file for tqdm in a log: each refresh (`\\r` + bar) becomes one plain line."""

    def __init__(self, f: TextIO):
        self.f = f

    @property
    def encoding(self) -> str:
        return getattr(self.f, "encoding", None) or "utf-8"

    def write(self, s: str) -> int:
        line = s.replace("\r", "").replace("\x1b[A", "").rstrip()
        if line:
            self.f.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        self.f.flush()

    def isatty(self) -> bool:
        return False


def tqdm(iterable: Iterable | None = None, **kwargs: Any):
    """`tqdm.auto.tqdm` on a terminal; in a log, a line every `log_interval()` seconds."""
    from tqdm.auto import tqdm as _tqdm

    out = kwargs.get("file") or sys.stderr
    if interactive(out) or kwargs.get("disable"):
        return _tqdm(iterable, **kwargs)
    every = log_interval()
    kwargs.pop("dynamic_ncols", None)
    kwargs.setdefault("ncols", 100)
    kwargs.setdefault("ascii", True)
    kwargs.setdefault("mininterval", every)
    kwargs.setdefault("maxinterval", max(every, kwargs["mininterval"]))
    kwargs["file"] = LineWriter(out)
    return _tqdm(iterable, **kwargs)


def throttle_tqdm_env() -> None:
    """Slow every tqdm bar down to a refresh per `log_interval()` s when stderr is a log.

    tqdm reads TQDM_* once, when it is first imported: call this before that (the CLI does).
    Explicit arguments and variables already set win.
    """
    if interactive(sys.stderr):
        return
    every = str(log_interval())
    os.environ.setdefault("TQDM_MININTERVAL", every)
    os.environ.setdefault("TQDM_MAXINTERVAL", every)


# --------------------------------------------------------------------------- fastai

_EPOCH_LINES = None


def _epoch_lines_class():
    global _EPOCH_LINES
    if _EPOCH_LINES is None:
        from fastai.callback.core import Callback

        class EpochLines(Callback):
            """One line per epoch (and the metric names once) instead of fastai's progress bars."""

            order = 61  # after Recorder (50), where ProgressCallback sits (60)

            def __init__(self, file: TextIO | None = None):
                self.file = file

            def before_fit(self):
                self.old_logger, self.learn.logger = self.learn.logger, self._line
                self._line(self.recorder.metric_names)

            def after_fit(self):
                self.learn.logger = self.old_logger

            def _line(self, row) -> None:
                f = self.file or sys.stdout
                f.write("  ".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in row) + "\n")
                f.flush()

        _EPOCH_LINES = EpochLines
    return _EPOCH_LINES


def epoch_lines(file: TextIO | None = None):
    """A fresh EpochLines callback (fastai is imported only when this is called)."""
    return _epoch_lines_class()(file)


def quiet_fastai_if_not_tty(learn, stream: Any = None):
    """In a log (stdout not a terminal): fastai's ProgressCallback out, `EpochLines` in. Returns `learn`."""
    stream = sys.stdout if stream is None else stream
    if interactive(stream):
        return learn
    from fastai.callback.progress import ProgressCallback

    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
    if not any(isinstance(cb, _epoch_lines_class()) for cb in learn.cbs):
        learn.add_cb(epoch_lines(None if stream is sys.stdout else stream))
    return learn
