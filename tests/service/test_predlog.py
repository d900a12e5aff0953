"""predlog: the prediction log writer. Whitelisted fields only; never slows or fails a prediction."""
from __future__ import annotations

import errno
import json
import logging
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_cxr.serve.monitoring import predlog, predrecord
from covid_cxr.serve.monitoring.predlog import NullPredictionLog, PredictionLog

SERVE_LOG = {"max_mb": 50, "backups": 5, "queue": 10_000}           # params.yaml serve.log_*


def PL(path, **kw) -> PredictionLog:  # noqa: N802
    """A log with params.yaml's rotation unless the test sets its own."""
    return PredictionLog(path, **{"max_bytes": 50 * 2**20, "backups": 5, "queue_size": 10_000, **kw})
from covid_cxr.serve.monitoring.predrecord import FIELDS

GOOD = {
    "request_id": uuid.uuid4().hex,
    "model": "covid_cxr_model:abc123",
    "label": "COVID",
    "probabilities": {"COVID": 0.91, "Normal": 0.06, "Viral Pneumonia": 0.03},
    "verdict": "ok",
    "reason": None,
    "novelty": 0.42,
    "flagged": False,
    "width": 2048,
    "height": 2500,
    "mode": "I;16",
    "format": "PNG",
    "sha256": "ab" * 32,
}


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def written(tmp_path: Path, *records: dict, **kw) -> list[dict]:
    with PL(tmp_path / "p.jsonl", **kw) as log:
        for r in records:
            assert log.write(r)
    return lines(tmp_path / "p.jsonl")


def test_one_json_line_per_prediction_with_every_field(tmp_path):
    (rec,) = written(tmp_path, GOOD)
    assert list(rec) == list(FIELDS)
    assert {k: rec[k] for k in GOOD} == GOOD
    t = predrecord._time(rec["time"])  # UTC ISO 8601, set by the writer
    assert t is not None and rec["time"].endswith("+00:00")


def test_unknown_keys_pixels_file_names_and_patient_fields_are_never_written(tmp_path):
    secret = "DOE^JOHN"
    rec = {
        **GOOD,
        "pixels": np.full((8, 8), 7, np.uint8),
        "image": b"\x89PNG...",
        "filename": "john_doe_chest.png",
        "path": "/uploads/john_doe_chest.png",
        "PatientName": secret, "PatientID": "123-45-678", "PatientBirthDate": "19500101",
        "dicom": {"PatientName": secret},
        "probabilities": {**GOOD["probabilities"], "PatientName": secret},  # nested too
        "request_id": "john_doe_chest.png",  # a client-chosen id is not trusted
        "mode": "john_doe",
        "format": "john_doe.dcm",
        "model": "../../john doe.png",
        "reason": "Patient John Doe",
    }
    with PL(tmp_path / "p.jsonl") as log:
        log.write(rec)
        log.flush()
        assert log.stats()["sanitized"] == 1
    raw = (tmp_path / "p.jsonl").read_text()
    for s in ("john", "doe", secret.lower(), "123-45-678", "19500101", "pixels", "png...", "patient", "uploads"):
        assert s not in raw.lower()
    (out,) = lines(tmp_path / "p.jsonl")
    assert list(out) == list(FIELDS)
    assert out["probabilities"] == GOOD["probabilities"]
    assert uuid.UUID(out["request_id"])  # replaced by a fresh id
    assert out["mode"] == "other" and out["format"] == "OTHER" and out["model"] is None and out["reason"] is None


@pytest.mark.parametrize("key,value,expect", [
    ("label", "Pneumothorax", None),
    ("verdict", "maybe", None),
    ("novelty", float("nan"), None),
    ("novelty", np.float32(1.5), 1.5),
    ("flagged", np.bool_(True), True),
    ("flagged", "yes", None),
    ("width", 0, None),
    ("width", np.int64(512), 512),
    ("height", 3.5, None),
    ("format", "jpeg", "JPEG"),
    ("sha256", "AB" * 32, "ab" * 32),
    ("sha256", "abc", None),
    ("reason", "outside_training_data", "outside_training_data"),
    ("request_id", "3F2504E0-4F89-11D3-9A0C-0305E82C3301", "3f2504e0-4f89-11d3-9a0c-0305e82c3301"),
    ("time", "2025-01-02T03:04:05Z", "2025-01-02T03:04:05.000+00:00"),
])
def test_each_field_is_checked(key, value, expect):
    out, _ = predrecord.sanitize({**GOOD, key: value})
    assert out[key] == expect


def test_bad_probabilities_are_cut_to_known_classes():
    out, bad = predrecord.sanitize({**GOOD, "probabilities": {"COVID": 1.2, "Normal": "x", "Viral Pneumonia": 0.1,
                                                           "other": 0.5}})
    assert out["probabilities"] == {"Viral Pneumonia": 0.1} and bad == 3


def test_configured_default_path_and_off(tmp_path, monkeypatch):
    """One default, whatever folder or project a process runs in: the per-user state directory."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("COVID_CXR_ROOT", str(tmp_path / "some-project"))   # the project plays no part
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(predlog.ENV_PATH, raising=False)
    log = PredictionLog.configured(SERVE_LOG)
    try:
        assert log.enabled and log.path == tmp_path / "state" / "covid-cxr" / "predictions.jsonl"
        assert predlog.configured_path() == log.path
        assert log.max_bytes == 50 * 2**20 and log.backups == 5
    finally:
        log.close()
    for off in ("off", "OFF", "0", "false", "none", ""):
        monkeypatch.setenv(predlog.ENV_PATH, off)
        null = PredictionLog.configured(SERVE_LOG)
        assert isinstance(null, NullPredictionLog) and not null.enabled
        assert null.write(GOOD) is False
        null.close()
    assert not (tmp_path / "logs").exists()

    monkeypatch.setenv(predlog.ENV_PATH, str(tmp_path / "x" / "p-{pid}.jsonl"))
    log = PredictionLog.configured({"max_mb": 0.5, "backups": 2, "queue": 100})
    log.write(GOOD)
    log.close()
    import os

    assert log.path.name == f"p-{os.getpid()}.jsonl" and log.max_bytes == 2**19 and log.backups == 2
    assert len(lines(log.path)) == 1


def test_rotation_by_size_keeps_n_files_and_the_reader_reads_them_in_order(tmp_path):
    p = tmp_path / "p.jsonl"
    n = 400
    with PL(p, max_bytes=8 * 1024, backups=3, batch=7) as log:
        for i in range(n):
            log.write({**GOOD, "time": f"2025-01-01T00:{i // 60:02d}:{i % 60:02d}+00:00"})
        log.flush()
        assert log.stats()["rotations"] >= 4
    files = predrecord.rotated_paths(p)
    assert [f.name for f in files] == ["p.jsonl.3", "p.jsonl.2", "p.jsonl.1", "p.jsonl"]  # oldest first
    assert all(f.stat().st_size <= 8 * 1024 for f in files)
    recs = list(predrecord.read_records(p))
    times = [r["time"] for r in recs]
    assert times == sorted(times) and len(set(times)) == len(recs)  # no line lost inside what is kept, none torn
    assert times[-1].startswith("2025-01-01T00:06:39")  # the newest record is in the live file
    assert sum(len(f.read_text().splitlines()) for f in files) == len(recs)


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path, caplog, monkeypatch):
    gate = threading.Event()
    real = PredictionLog._append

    def stuck(self, lines_):  # the disk hangs
        gate.wait(10)
        real(self, lines_)

    monkeypatch.setattr(PredictionLog, "_append", stuck)
    log = PL(tmp_path / "p.jsonl", queue_size=5, batch=1)
    with caplog.at_level(logging.WARNING, logger="covid_cxr.serve.monitoring.predlog"):
        t0 = time.perf_counter()
        ok = [log.write(GOOD) for _ in range(100)]
        dt = time.perf_counter() - t0
    assert dt < 0.5  # 100 writes against a hung disk: no waiting
    assert sum(ok) <= 6 and log.stats()["dropped"] == 100 - sum(ok)
    assert sum("queue full" in r.message for r in caplog.records) == 1  # said once
    gate.set()
    assert log.flush(10)
    log.close()
    assert len(lines(tmp_path / "p.jsonl")) == sum(ok)


def test_disk_full_is_logged_once_and_predictions_go_on(tmp_path, caplog, monkeypatch):
    p = tmp_path / "p.jsonl"
    log = PL(p, batch=1)
    real = PredictionLog._write
    full = {"on": True}

    def enospc(self, data):
        if full["on"]:
            # half a line reaches the disk, then it is full
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    monkeypatch.setattr(PredictionLog, "_write", enospc)
    with caplog.at_level(logging.WARNING, logger="covid_cxr.serve.monitoring.predlog"):
        for _ in range(20):
            assert log.write(GOOD) is True  # never raises, never refuses
        assert log.flush(10)
        warns = [r for r in caplog.records if "cannot write" in r.message]
        assert len(warns) == 1 and "ENOSPC" in warns[0].getMessage()
        assert log.stats()["failed"] == 20 and log.stats()["written"] == 0

        full["on"] = False  # space again: writing resumes by itself
        log.write(GOOD)
        log.flush(10)
        log.close()
        assert len([r for r in caplog.records if "cannot write" in r.message]) == 1
    assert log.stats()["written"] == 1
    recs = list(predrecord.read_records(p))  # the torn halves are skipped; the good line parses
    assert len(recs) == 1 and recs[0]["label"] == "COVID"


def test_an_unwritable_location_is_logged_once_never_raised(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log folder should be")
    with caplog.at_level(logging.WARNING, logger="covid_cxr.serve.monitoring.predlog"):
        log = PL(blocker / "logs" / "p.jsonl", batch=1)
        for _ in range(5):
            assert log.write(GOOD)
        log.flush(10)
        log.close()
    assert log.stats()["failed"] == 5
    assert len([r for r in caplog.records if "cannot write" in r.message]) == 1


def test_close_writes_what_is_queued_and_later_writes_are_dropped(tmp_path):
    log = PL(tmp_path / "p.jsonl")
    for _ in range(1000):
        log.write(GOOD)
    log.close()
    assert len(lines(tmp_path / "p.jsonl")) == 1000
    assert log.write(GOOD) is False and log.stats()["dropped"] == 1
    log.close()  # idempotent


def test_the_callers_dict_may_change_after_write(tmp_path):
    rec = {**GOOD, "probabilities": dict(GOOD["probabilities"])}
    with PL(tmp_path / "p.jsonl") as log:
        log.write(rec)
        rec["label"] = "Normal"
        rec["probabilities"]["COVID"] = 0.0
    (out,) = lines(tmp_path / "p.jsonl")
    assert out["label"] == "COVID" and out["probabilities"]["COVID"] == 0.91


def test_many_threads_write_whole_lines(tmp_path):
    with PL(tmp_path / "p.jsonl", max_bytes=64 * 1024, backups=50) as log:
        def worker(k):
            for i in range(250):
                log.write({**GOOD, "width": k * 1000 + i + 1})

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    recs = list(predrecord.read_records(tmp_path / "p.jsonl"))
    assert sorted(r["width"] for r in recs) == sorted(k * 1000 + i + 1 for k in range(8) for i in range(250))


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({**GOOD, "time": "2025-01-01T00:00:00+00:00"}) + "\n" + '{"time": "2025-01-0')
    with PL(p) as log:
        log.write(GOOD)
    recs = list(predrecord.read_records(p))
    assert len(recs) == 2


def test_an_unexpected_writer_error_does_not_stop_the_writer(tmp_path, monkeypatch):
    real = PredictionLog._append
    calls = {"n": 0}

    def buggy(self, lines_):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        real(self, lines_)

    monkeypatch.setattr(PredictionLog, "_append", buggy)
    log = PL(tmp_path / "p.jsonl", batch=1)
    log.write(GOOD)
    log.flush(10)
    log.write(GOOD)
    log.close()
    assert log.stats()["failed"] == 1 and log.stats()["written"] == 1
    assert len(lines(tmp_path / "p.jsonl")) == 1
