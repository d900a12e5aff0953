"""The gate on crafted metrics: a pass, each failure reason, and the champion comparison."""
import json

import pytest
from typer.testing import CliRunner

from covid_cxr.release.gate import decide

GATE = {"min_accuracy": 0.97, "min_macro_f1": 0.97, "min_covid_recall": 0.97, "max_ece": 0.03,
        "champion_tolerance": 0.005}
GOOD = {"accuracy": 0.99, "macro_f1": 0.985, "covid_recall": 0.99, "ece_after": 0.01}


def test_pass():
    r = decide(GOOD, GATE)
    assert r["passed"] and r["reasons"] == []
    assert all(c["ok"] for c in r["checks"]) and len(r["checks"]) == 4


@pytest.mark.parametrize("metric,value,word", [
    ("accuracy", 0.96, "accuracy"), ("macro_f1", 0.9, "macro_f1"),
    ("covid_recall", 0.95, "covid_recall"), ("ece_after", 0.05, "ece_after")])
def test_each_failure_reason(metric, value, word):
    r = decide({**GOOD, metric: value}, GATE)
    assert not r["passed"]
    assert len(r["reasons"]) == 1 and word in r["reasons"][0]


def test_missing_metric_fails():
    r = decide({k: v for k, v in GOOD.items() if k != "covid_recall"}, GATE)
    assert not r["passed"] and "covid_recall" in r["reasons"][0]


def test_champion_regression_fails_within_tolerance_passes():
    champ = {"bento": "covid_cxr_service:old", "metrics": {"accuracy": 0.995, "macro_f1": 0.99, "covid_recall": 0.99}}
    worse = decide({**GOOD, "accuracy": 0.985}, GATE, champ)  # 0.01 below champion
    assert not worse["passed"]
    assert any("champion" in r and "accuracy" in r for r in worse["reasons"])
    close = decide({**GOOD, "accuracy": 0.991}, GATE, champ)  # 0.004 below: within tolerance
    assert close["passed"], close["reasons"]


def test_gate_cli_writes_json_exits_zero_unless_strict(tmp_path, monkeypatch):
    import yaml

    from covid_cxr.cli import app

    root = tmp_path
    params = {"gate": GATE, "evaluate": {"ece_bins": 15}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "artifacts" / "eval").mkdir(parents=True)
    (root / "artifacts" / "eval" / "metrics.json").write_text(json.dumps({**GOOD, "covid_recall": 0.9}))
    monkeypatch.setenv("COVID_CXR_ROOT", str(root))
    res = CliRunner().invoke(app, ["gate"])
    assert res.exit_code == 0, res.output  # the verdict is the metric file, not the exit status
    assert "covid_recall" in res.output and "gate FAILED" in res.output
    g = json.loads((root / "artifacts" / "gate.json").read_text())
    assert g["passed"] is False and g["champion"] is None
    res = CliRunner().invoke(app, ["gate", "--strict"])
    assert res.exit_code == 1

    (root / "artifacts" / "eval" / "metrics.json").write_text(json.dumps(GOOD))
    res = CliRunner().invoke(app, ["gate"])
    assert res.exit_code == 0, res.output
    assert json.loads((root / "artifacts" / "gate.json").read_text())["passed"] is True
