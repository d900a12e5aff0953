"""A failed gate is a recorded verdict, not a crashed run: with dvc.yaml's own gate and package
commands, `dvc exp run` completes, saves the experiment, and `dvc exp show` lists `passed: false`;
nothing is packaged and the refusal says why. Real DVC and the real CLI; no model needed (the
gate reads crafted metrics, and package refuses before it would touch one)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GATE = {"min_accuracy": 0.97, "min_macro_f1": 0.97, "min_covid_recall": 0.97, "max_ece": 0.03,
        "champion_tolerance": 0.005}
FAILING = {"accuracy": 0.99, "macro_f1": 0.985, "covid_recall": 0.90, "ece_after": 0.01}


def test_real_stage_definitions():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    # the headline is the one metrics file of the whole pipeline; gate.json stays the gate's record
    metrics = {next(iter(m)) for st in stages.values() for m in st.get("metrics", [])}
    assert metrics == {"artifacts/metrics.json"}
    assert [next(iter(m)) for m in stages["gate"]["metrics"]] == ["artifacts/metrics.json"]
    assert "artifacts/gate.json" in [next(iter(o)) if isinstance(o, dict) else o for o in stages["gate"]["outs"]]
    assert "--if-passed" in stages["package"]["cmd"]


def test_failed_gate_is_an_experiment_with_its_verdict(tmp_path, monkeypatch):
    real = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    root = tmp_path / "proj"
    (root / "artifacts" / "eval").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"gate": GATE, "evaluate": {"ece_bins": 15}}))
    (root / "artifacts" / "eval" / "metrics.json").write_text(json.dumps(FAILING))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "gate": {"cmd": real["gate"]["cmd"], "deps": ["artifacts/eval/metrics.json"], "params": ["gate"],
                 "outs": [{"artifacts/gate.json": {"cache": False}}],
                 "metrics": [{"artifacts/metrics.json": {"cache": False}}]},
        "package": {"cmd": real["package"]["cmd"], "deps": ["artifacts/gate.json"],
                    "outs": ["artifacts/bento.json"]},
    }}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVID_CXR_")}
    env.update(COVID_CXR_ROOT=str(root), BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="true",
               PATH=f"{BIN}:{env.get('PATH', '')}")

    def sh(*cmd: str) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    sh("git", "-c", "init.defaultBranch=main", "init", "-q")
    sh("git", "config", "user.email", "t@example.invalid")
    sh("git", "config", "user.name", "t")
    sh(str(BIN / "dvc"), "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "project")

    r = sh(str(BIN / "dvc"), "exp", "run", "-n", "failed-gate")  # exit 0: the run is kept

    assert "not packaged" in r.stdout + r.stderr and "covid_recall" in r.stdout + r.stderr
    bento = json.loads((root / "artifacts" / "bento.json").read_text())
    assert bento["packaged"] is False and bento["bento"] is None
    assert any("covid_recall" in x for x in bento["gate"]["reasons"])
    rows = json.loads(sh(str(BIN / "dvc"), "exp", "show", "--json").stdout)
    exps = [e for row in rows for e in (row.get("experiments") or [])]
    (exp,) = [e for e in exps if e.get("name") == "failed-gate"]
    (rev,) = exp["revs"]
    head = rev["data"]["metrics"]["artifacts/metrics.json"]["data"]
    assert head["passed"] is False and head["covid_recall"] == 0.90
    gate = json.loads((root / "artifacts" / "gate.json").read_text())
    assert gate["passed"] is False and gate["metrics"]["covid_recall"] == 0.90
