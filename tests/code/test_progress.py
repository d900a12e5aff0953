"""progress: bars on a terminal, a few plain lines in a log (`dvc repro > log`)."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LOOP = """
import time
{setup}
for _ in {bar}(range(400), desc="decode"):
    time.sleep(0.004)
"""


def run_script(code: str, tmp_path: Path, *, tty_stderr: bool = False, env: dict | None = None) -> str:
    """Run `code` in a fresh interpreter with stdout+stderr redirected to a file (or stderr on a pty)."""
    e = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    for k in ("TQDM_MININTERVAL", "TQDM_MAXINTERVAL", "COVID_CXR_PROGRESS_INTERVAL"):
        if k not in (env or {}):
            e.pop(k, None)
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        if not tty_stderr:
            subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, env=e, check=True,
                           timeout=300)
            return log.read_bytes().decode()  # bytes: text mode would turn \r into \n
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
        p = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=slave, env=e)
        os.close(slave)
        chunks = []
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:  # EIO: the child closed the pty
                break
            if not b:
                break
            chunks.append(b)
        assert p.wait(timeout=300) == 0
        os.close(master)
        return b"".join(chunks).decode(errors="replace")


def test_plain_tqdm_floods_a_log_baseline(tmp_path):
    """What the helper fixes: a plain tqdm loop of ~2 s writes a carriage return every 0.1 s."""
    out = run_script(LOOP.format(setup="from tqdm import tqdm", bar="tqdm"), tmp_path)
    assert out.count("\r") >= 10


def test_helper_prints_a_few_lines_in_a_log(tmp_path):
    out = run_script(LOOP.format(setup="from covid_cxr.progress import tqdm", bar="tqdm"), tmp_path,
                     env={"COVID_CXR_PROGRESS_INTERVAL": "0.5"})
    assert out.count("\r") == 0, repr(out[:300])
    lines = out.splitlines()
    assert 2 <= len(lines) <= 8, lines  # ~2 s at one line per 0.5 s, plus the first and the last
    assert all(ln.startswith("decode:") for ln in lines)
    assert "400/400" in lines[-1] and "100%" in lines[-1]
    assert all(ord(c) < 128 for c in out)  # ascii bar in logs


def test_default_interval_gives_first_and_last_line_only(tmp_path):
    out = run_script(LOOP.format(setup="from covid_cxr.progress import tqdm", bar="tqdm"), tmp_path)
    lines = out.splitlines()
    assert out.count("\r") == 0 and len(lines) == 2 and "400/400" in lines[-1], lines


def test_helper_keeps_live_bars_on_a_terminal(tmp_path):
    out = run_script(LOOP.format(setup="from covid_cxr.progress import tqdm", bar="tqdm"), tmp_path,
                     tty_stderr=True)
    assert out.count("\r") >= 10


def test_cli_throttles_other_tqdm_bars_in_a_log(tmp_path):
    """Bars the package does not create itself (third-party, or not yet moved to the helper):
    the CLI's throttle_tqdm_env() leaves them a refresh per interval."""
    setup = "from covid_cxr.progress import throttle_tqdm_env\nthrottle_tqdm_env()\nfrom tqdm import tqdm"
    out = run_script(LOOP.format(setup=setup, bar="tqdm"), tmp_path, env={"COVID_CXR_PROGRESS_INTERVAL": "0.5"})
    assert out.count("\r") <= 8, out.count("\r")


def test_line_writer_turns_refreshes_into_lines():
    import io

    from covid_cxr.progress import LineWriter

    buf = io.StringIO()
    w = LineWriter(buf)
    w.write("\rdecode:  10%|#         | 1/10   ")
    w.write("\r")
    w.write("\n")
    w.write("\rdecode: 100%|##########| 10/10")
    assert buf.getvalue() == "decode:  10%|#         | 1/10\ndecode: 100%|##########| 10/10\n"


FASTAI = """
import sys, torch
from torch import nn
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
import fastai.callback.progress  # noqa: F401
from fastai.callback.progress import ProgressCallback
from covid_cxr.progress import quiet_fastai_if_not_tty

torch.manual_seed(0)
x = torch.randn(640, 4)
y = (x[:, 0] > 0).long()
ds = list(zip(x, y))
from fastai.data.load import DataLoader
dls = DataLoaders(DataLoader(ds[:512], bs=8, shuffle=True), DataLoader(ds[512:], bs=8))
learn = Learner(dls, nn.Linear(4, 2), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
quiet_fastai_if_not_tty(learn)
assert not any(isinstance(cb, ProgressCallback) for cb in learn.cbs)
learn.fit(3, 1e-2)
quiet_fastai_if_not_tty(learn)  # idempotent
learn.fit(1, 1e-2)
"""


def test_fastai_prints_one_line_per_epoch_in_a_log(tmp_path):
    """fastai's console bars write a \\r per batch even to a file; EpochLines writes one line per epoch."""
    out = run_script(textwrap.dedent(FASTAI), tmp_path, env={"PYTHONWARNINGS": "ignore"})
    assert out.count("\r") == 0, repr(out[:300])
    lines = [ln for ln in out.splitlines() if ln.strip()]
    header = "epoch  train_loss  valid_loss  accuracy  time"
    assert lines[0] == header and lines[4] == header, lines
    epochs = [ln.split()[0] for ln in lines if ln != header]
    assert epochs == ["0", "1", "2", "0"], lines
