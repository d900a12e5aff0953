"""covid-cxr monitor: synthetic reference (evaluate's predictions.csv + manifest) vs synthetic logs."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import monitorkit as mk
from covid_cxr.serve.monitoring import drift, driftsamples, monitor
from covid_cxr.cli import app

N_REF, N_WIN = 1500, 600


@pytest.fixture
def proj(tmp_path):
    """A project root with a reference of N_REF test-split predictions and the repo's params.yaml."""
    (tmp_path / "params.yaml").write_text((mk.REPO / "params.yaml").read_text())
    mk.write_reference(tmp_path, mk.sample(N_REF, seed=1))
    return tmp_path


def run(proj: Path, log: Path, **kw):
    return monitor.run_monitor(proj / "out" / "drift.json", log_path=log, root=proj, now=mk.NOW,
                               plots=kw.pop("plots", False), **kw)


def test_no_drift(proj):
    log = mk.write_log(proj / "logs" / "predictions.jsonl", mk.sample(N_WIN, seed=2))
    rep = run(proj, log, plots=True)
    assert rep["status"] == "ok", rep["verdict"]
    assert rep["drifted"] == []
    assert set(rep["tests_run"]) == set(drift.TESTS)
    assert rep["window"]["n"] == N_WIN and rep["reference"]["n"] == N_REF
    on_disk = json.loads((proj / "out" / "drift.json").read_text())
    assert on_disk["status"] == "ok"
    for t in on_disk["tests"].values():
        assert {"statistic", "p_value", "effect", "drifted", "n_reference", "n_window"} <= set(t)
    page = (proj / "out" / "drift.md").read_text()
    assert "no drift" in page
    for img in ("class_mix", "confidence", "novelty", "input_size", "input_mode"):
        assert (proj / "out" / "drift_img" / f"{img}.png").stat().st_size > 1000
        assert f"drift_img/{img}.png" in page


def test_shifted_class_mix_is_drift_naming_class_mix(proj):
    log = mk.write_log(proj / "logs" / "predictions.jsonl", mk.sample(N_WIN, seed=3, mix=(0.70, 0.20, 0.10)))
    rep = run(proj, log)
    assert rep["status"] == "drift"
    assert "class_mix" in rep["drifted"]
    assert "class mix" in rep["verdict"]
    assert rep["tests"]["class_mix"]["effect"] > 0.2


def test_shifted_novelty_is_drift(proj):
    # a new hospital: novelty up by one sd, so more films flagged too; class mix unchanged
    log = mk.write_log(proj / "logs" / "predictions.jsonl", mk.sample(N_WIN, seed=4, novelty=(1.0, 1.0)))
    rep = run(proj, log)
    assert rep["status"] == "drift"
    assert "novelty" in rep["drifted"] and "novelty score" in rep["verdict"]
    assert "class_mix" not in rep["drifted"]


def test_new_scanner_sizes_and_modes_drift(proj):
    log = mk.write_log(proj / "logs" / "predictions.jsonl",
                       mk.sample(N_WIN, seed=5, size=(2048, 2500), mode="I;16", fmt="JPEG"))
    rep = run(proj, log)
    assert {"input_size", "input_mode", "input_format"} <= set(rep["drifted"])
    assert rep["tests"]["input_size"]["window"] == {"1-512 square": 0.0, "2049-3072 portrait": 1.0}


def test_lower_confidence_is_drift(proj):
    log = mk.write_log(proj / "logs" / "predictions.jsonl", mk.sample(N_WIN, seed=6, conf=(4.0, 2.0)))
    rep = run(proj, log)
    assert "confidence" in rep["drifted"] and "refer_share" in rep["drifted"]


def test_tiny_effect_on_a_huge_window_is_not_drift(proj):
    # 5 points more COVID: significant on 20k records, but under min_effect.class_mix
    log = mk.write_log(proj / "logs" / "predictions.jsonl", mk.sample(20000, seed=7, mix=(0.41, 0.41, 0.18)),
                       step=dt.timedelta(seconds=10))
    rep = run(proj, log)
    t = rep["tests"]["class_mix"]
    assert t["p_value"] < t["alpha"] and t["effect"] < t["min_effect"]
    assert not t["drifted"] and rep["status"] == "ok"


def test_too_few_records(proj):
    log = mk.write_log(proj / "logs" / "predictions.jsonl", mk.sample(50, seed=8))
    rep = run(proj, log)
    assert rep["status"] == "insufficient" and "too few" in rep["verdict"]
    assert (proj / "out" / "drift.json").exists()


def test_rotated_files_are_read(proj):
    rows = mk.sample(N_WIN, seed=9, mix=(0.70, 0.20, 0.10))
    lines = mk.log_lines(rows, start=mk.NOW - dt.timedelta(days=5), step=dt.timedelta(minutes=10))
    base = proj / "logs" / "predictions.jsonl"
    base.parent.mkdir()
    thirds = [lines[:200], lines[200:400], lines[400:]]
    for p, chunk in zip((base.with_name(base.name + ".2"), base.with_name(base.name + ".1"), base), thirds):
        p.write_text("\n".join(chunk) + "\n")
    (proj / "logs" / "predictions.jsonl.bak").write_text(lines[0] + "\n")  # not ours: never read
    rep = run(proj, base)
    assert rep["window"]["n"] == N_WIN
    assert [Path(p).name for p in rep["log"]["files"]] == ["predictions.jsonl.2", "predictions.jsonl.1",
                                                           "predictions.jsonl"]
    assert rep["status"] == "drift"


def test_since_and_until_filter(proj):
    old = mk.sample(N_WIN, seed=10, mix=(0.70, 0.20, 0.10))  # last month's drifted batch
    new = mk.sample(N_WIN, seed=11)
    base = proj / "logs" / "predictions.jsonl"
    base.parent.mkdir()
    lines = (mk.log_lines(old, start=mk.NOW - dt.timedelta(days=30), step=dt.timedelta(minutes=1))
             + mk.log_lines(new, start=mk.NOW - dt.timedelta(days=2), step=dt.timedelta(minutes=1)))
    base.write_text("\n".join(lines) + "\nnot json at all\n{\"torn\": \n")
    assert run(proj, base, since="7d")["status"] == "ok"
    rep = run(proj, base, since="7d")
    assert rep["window"]["n"] == N_WIN
    rep = run(proj, base, since="2025-01-01")
    assert rep["window"]["n"] == 2 * N_WIN
    rep = run(proj, base, since="2025-02-01T00:00:00Z", until="2025-02-15")
    assert rep["window"]["n"] == N_WIN and rep["status"] == "drift"
    # the default window is params.yaml monitor.window (7d)
    assert run(proj, base)["window"]["n"] == N_WIN


def test_parse_when():
    now = mk.NOW
    assert driftsamples.parse_when("24h", now) == now - dt.timedelta(hours=24)
    assert driftsamples.parse_when("7d", now) == now - dt.timedelta(days=7)
    assert driftsamples.parse_when("90m", now) == now - dt.timedelta(minutes=90)
    assert driftsamples.parse_when("2025-03-01", now) == dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)
    assert driftsamples.parse_when("2025-03-01T05:00+02:00", now) == dt.datetime(2025, 3, 1, 3, tzinfo=dt.timezone.utc)
    import typer

    with pytest.raises(typer.BadParameter):
        driftsamples.parse_when("last tuesday", now)


def test_novelty_skipped_without_scores(proj):
    rows = mk.sample(N_WIN, seed=12)
    for r in rows:
        r["novelty"] = None
    log = mk.write_log(proj / "logs" / "predictions.jsonl", rows)
    rep = run(proj, log)
    assert "skipped" in rep["tests"]["novelty"] and "novelty" not in rep["tests_run"]
    assert rep["status"] == "ok"


def test_thresholds_come_from_params(proj):
    prm = mk.monitor_params()
    del prm["monitor"]["min_effect"]["novelty"]
    with pytest.raises(KeyError, match="novelty"):
        monitor.settings(prm)
    with pytest.raises(KeyError, match="monitor"):
        monitor.settings({})


def test_legacy_reference_with_ood_score(tmp_path):
    """Older predictions.csv (ood_score, no verdict/reason): novelty from ood_score, flagged/refer skipped."""
    p = tmp_path / "predictions.csv"
    p.write_text("path,label,pred,p_COVID,p_Normal,p_Viral Pneumonia,ood_score\n"
                 "a.png,COVID,COVID,0.9,0.05,0.05,1.5\n")
    (row,) = driftsamples.reference_rows(p, None)
    assert row["novelty"] == 1.5 and row["flagged"] is None and row["refer"] is None
    assert row["confidence"] == 0.9 and row["format"] == "PNG"


# ---------------------------------------------------------------- the CLI: exit codes 0 / 1 / 2
def _cli(proj: Path, log: Path, *extra: str):
    env = {"COVID_CXR_ROOT": str(proj)}
    return CliRunner().invoke(app, ["monitor", "--log", str(log), "--since", "2000-01-01",
                                    "--report", str(proj / "r.json"), *extra], env=env)


def test_cli_exit_codes(proj):
    base = proj / "logs" / "predictions.jsonl"
    mk.write_log(base, mk.sample(N_WIN, seed=13))
    r = _cli(proj, base)
    assert r.exit_code == 0, r.output
    assert "no drift" in r.output

    mk.write_log(base, mk.sample(N_WIN, seed=14, mix=(0.70, 0.20, 0.10)))
    r = _cli(proj, base)
    assert r.exit_code == 1, r.output
    assert "drift: class mix" in r.output
    assert json.loads((proj / "r.json").read_text())["status"] == "drift"
    assert (proj / "r.md").exists()

    mk.write_log(base, mk.sample(10, seed=15))
    r = _cli(proj, base)
    assert r.exit_code == 2, r.output
    assert "too few records" in r.output


def test_cli_missing_log_exits_2(proj):
    """A missing log is the console script's one-line error (exit 2), not a traceback."""
    env = {**os.environ, "COVID_CXR_ROOT": str(proj), "PYTHONPATH": str(mk.REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "covid_cxr.cli", "monitor", "--log", str(proj / "nope.jsonl"),
                        "--report", str(proj / "r.json")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.jsonl does not exist" in r.stderr
