"""Unit tests of the flow's package-side helpers (no Prefect server, no pipeline)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from covid_cxr.orchestrate import steps as orch

from covid_cxr import runner, vcs


def test_tool_env_adds_the_interpreter_bin_only_when_missing():
    bindir = str(Path(sys.executable).parent)
    env = runner.tool_env({"PATH": "/usr/bin:/bin"})
    assert env["PATH"].split(os.pathsep) == [bindir, "/usr/bin", "/bin"]
    fake_first = f"/tmp/fakes{os.pathsep}{bindir}{os.pathsep}/usr/bin"
    assert runner.tool_env({"PATH": fake_first})["PATH"] == fake_first  # a fake placed before it still wins


def test_run_streams_lines_and_reports_the_failing_command(tmp_path):
    seen = []
    rc, tail = runner.run(["sh", "-c", "echo one; echo two"], tmp_path, log=seen.append)
    assert rc == 0 and tail == ["one", "two"] and seen == ["one", "two"]
    with pytest.raises(runner.CommandFailed) as e:
        runner.run(["sh", "-c", "echo 'ERROR: remote unreachable' >&2; exit 3"], tmp_path)
    assert e.value.returncode == 3 and "remote unreachable" in str(e.value) and "exited 3" in str(e.value)
    with pytest.raises(runner.StepError, match="not found on PATH"):
        runner.run(["no-such-tool-xyz"], tmp_path)


def test_run_sets_the_project_root_for_covid_cxr(tmp_path, monkeypatch):
    monkeypatch.setenv("COVID_CXR_ROOT", "/somewhere/else")
    _, tail = runner.run(["sh", "-c", 'echo "$COVID_CXR_ROOT"'], tmp_path)
    assert tail == [str(tmp_path.resolve())]


def test_run_timeout_kills_the_whole_process_tree(tmp_path):
    marker = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    with pytest.raises(runner.StepError, match="ran past its 2s limit"):
        runner.run(["sh", "-c", f"sleep 60 & echo $! > {marker}; wait"], tmp_path, timeout=2)
    assert time.monotonic() - t0 < 20
    pid = int(marker.read_text())
    gone = not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert gone, "the stage's child process outlived the timeout"


def test_normalize_remote_keeps_names_and_urls_and_absolutises_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "remote-dir").mkdir()
    assert vcs.absolute(None) is None
    assert vcs.absolute("team") == "team"
    assert vcs.absolute("s3://bucket/cxr") == "s3://bucket/cxr"
    assert vcs.absolute("remote-dir") == str(tmp_path / "remote-dir")
    assert vcs.absolute("../elsewhere") == str((tmp_path / "../elsewhere").resolve())


def test_same_as_champion_compares_weights_when_available(tmp_path):
    root = tmp_path / "proj"
    (root / "artifacts" / "model").mkdir(parents=True)
    (root / "artifacts" / "model" / "model.safetensors").write_bytes(b"weights-A")
    store = tmp_path / "store"
    store.mkdir()
    (store / "model.safetensors").write_bytes(b"weights-A")
    m = {"accuracy": 0.9, "macro_f1": 0.9}
    champ = {"bento": "b:1", "model_path": str(store), "metrics": {"accuracy": 0.1, "macro_f1": 0.1}}
    assert orch.same_as_champion(root, m, champ)  # same weights, whatever the metrics say
    (store / "model.safetensors").write_bytes(b"weights-B")
    assert not orch.same_as_champion(root, m, champ)
    # no weights at hand: identical key metrics
    assert orch.same_as_champion(root, m, {"bento": "b:1", "model_path": "", "metrics": dict(m)})
    assert not orch.same_as_champion(root, m, {"bento": "b:1", "model_path": "", "metrics": {**m, "accuracy": 0.8}})
    assert not orch.same_as_champion(root, m, None)


def test_summary_of_a_failed_run_names_the_step_reason_and_unchanged_production():
    md = orch.summary_markdown({
        "root": "/p", "step": "rebuild", "error": "CommandFailed: `dvc repro gate` exited 1:\nboom",
        "champion": {"bento": "covid_cxr:old", "metrics": {"accuracy": 0.97}},
        "ingest": [{"batch": "b1", "checked": 5, "added": 3, "skipped_identical": 0, "rejected": 2,
                    "rejected_by_reason": {"corrupt": 1, "empty": 1}, "quarantine": "artifacts/quarantine/b1"}],
    })
    assert md.startswith("# Retraining run: FAILED")
    assert "Failed at step `rebuild`" in md and "boom" in md
    assert "| b1 | 5 | 3 | 0 | 2 | `artifacts/quarantine/b1` |" in md
    assert "| corrupt |" in md and "| empty |" in md
    assert "production before this run: `covid_cxr:old`" in md and "production.json unchanged" in md


def test_git_commit_files_commits_only_those_files_and_only_when_changed(tmp_path):
    git = lambda *a: runner.run(["git", *a], tmp_path)[1]  # noqa: E731
    git("-c", "init.defaultBranch=main", "init", "-q")
    git("config", "user.email", "t@example.invalid")
    git("config", "user.name", "t")
    (tmp_path / "record.json").write_text("{}")
    (tmp_path / "other.txt").write_text("staged by somebody else")
    git("add", "other.txt")

    sha = vcs.git_commit_files(tmp_path, [tmp_path / "record.json", "absent.json"], "first")

    assert sha and git("show", "--name-only", "--format=", "HEAD") == ["record.json"]
    assert git("diff", "--cached", "--name-only") == ["other.txt"]  # still staged, not committed
    assert vcs.git_commit_files(tmp_path, ["record.json"], "again") is None  # unchanged: no commit
    assert vcs.git_commit_files(tmp_path, ["absent.json"], "nothing") is None
    (tmp_path / "record.json").write_text('{"bento": "b:1"}')
    assert vcs.git_commit_files(tmp_path, ["record.json"], "second") != sha
    assert git("log", "--format=%s") == ["second", "first"]
