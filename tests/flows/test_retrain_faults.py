"""Fault behaviour of the retraining flow, with REAL dvc and a REAL (temporary) Prefect server.

Only the pipeline stages are fakes (tests/flows/fake_stages.py: milliseconds instead of a
training run; metrics set in params.yaml), `covid-cxr package` (no Bento build) and release/registry.py's
two BentoML-store functions; the promotion rule, the production record, `dvc add`/`dvc push`
of the export and git stay real. The real chain runs in test_schedule_e2e.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


from covid_cxr import vcs
from flowkit import (
    GOOD_METRICS,
    failure_artifacts,
    STRICT_GATE,
    MAIN,
    VENV_BIN,
    flaky_dvc,
    make_batch,
    sh,
    summary_artifacts,
    task_runs,
    tree_files,
    wait_for,
)


def run_flow(**kw):
    import retrain

    return retrain.retrain(backoff_s=0.2, return_state=True, **kw)


def flow_run_id(state) -> str:
    return str(state.state_details.flow_run_id)


def test_transient_pull_failure_is_retried(prefect_api, fake_project):
    attempts = flaky_dvc(fake_project, fails=2)

    state = run_flow(root=str(fake_project.root))

    assert state.is_completed(), state.message
    assert attempts.read_text().strip() == "3"  # two failures, then the real pull
    sync = [t for t in task_runs(prefect_api, flow_run_id(state)) if t["name"].startswith("sync")]
    assert len(sync) == 1 and sync[0]["run_count"] == 3 and sync[0]["state_type"] == "COMPLETED"
    assert sync[0]["empirical_policy"]["retries"] == 3


def test_persistent_pull_failure_fails_the_flow_with_reason(prefect_api, fake_project, tmp_path):
    champion = fake_project.seed_champion(GOOD_METRICS)
    attempts = flaky_dvc(fake_project, fails=99)
    make_batch(tmp_path / "inbox", good_per_class=1, bad=False)

    state = run_flow(root=str(fake_project.root), inbox=str(tmp_path / "inbox"))

    assert state.is_failed()
    assert attempts.read_text().strip() == "4"  # 1 try + 3 declared retries
    assert "step 'sync'" in state.message and "connection reset" in state.message
    assert fake_project.production.read_bytes() == champion
    (art,) = summary_artifacts(prefect_api, flow_run_id(state))
    assert "FAILED" in art["data"] and "sync" in art["data"]
    # the on-failure hook: the step and the reason, as an artifact of the run and in the failure log
    (fail,) = failure_artifacts(prefect_api, flow_run_id(state))
    assert "failed at step `sync`" in fail["data"] and "connection reset" in fail["data"]
    (line,) = (fake_project.root / "logs" / "retrain-failures.jsonl").read_text().splitlines()
    rec = json.loads(line)
    assert rec["step"] == "sync" and "connection reset" in rec["reason"] and rec["flow_run"] == flow_run_id(state)
    assert not fake_project.ledger.exists()  # not processed: the next run tries the batch again


def test_bad_files_in_a_batch_lose_none_of_the_good_ones(prefect_api, fake_project, tmp_path):
    batch, good, bad = make_batch(tmp_path, good_per_class=2)
    before_src = tree_files(batch)
    before = fake_project.images()

    state = run_flow(root=str(fake_project.root), incoming=[str(batch)])

    assert state.is_completed(), state.message
    after = fake_project.images()
    for cls, names in good.items():  # every good file landed in data/, nothing else did
        assert after[cls] == before[cls] | names
    q = fake_project.root / "artifacts" / "quarantine" / batch.name
    for rel in bad:  # every bad file is quarantined, byte for byte, with its reason
        assert (q / rel).read_bytes() == (batch / rel).read_bytes()
    reasons = json.loads((q / "reasons.json").read_text())
    assert {r["quarantined_as"].split(batch.name + "/", 1)[1] for r in reasons} == bad
    assert all(r["reason"] for r in reasons)
    assert tree_files(batch) == before_src  # the source batch is untouched

    # the new data version is in data.dvc and pushed: the remote has everything the workspace has
    assert "in sync" in fake_project.dvc("status", "-c", "data.dvc")
    manifest = (fake_project.root / "artifacts" / "data" / "manifest.csv").read_text()
    assert all(n in manifest for names in good.values() for n in names)  # the rebuild saw them

    (art,) = summary_artifacts(prefect_api, flow_run_id(state))
    md = art["data"]
    assert "| batch-test | 9 | 6 |" in md  # 9 checked, 6 added
    assert "Gate: PASSED" in md and "promoted covid_cxr:" in md


def test_rerun_of_same_batch_is_idempotent(prefect_api, fake_project, tmp_path):
    batch, good, _ = make_batch(tmp_path, good_per_class=1)
    assert run_flow(root=str(fake_project.root), incoming=[str(batch)]).is_completed()
    images = fake_project.images()
    prod = fake_project.production.read_bytes()

    state = run_flow(root=str(fake_project.root), incoming=[str(batch)])

    assert state.is_completed(), state.message
    assert fake_project.images() == images
    assert fake_project.production.read_bytes() == prod  # same model: nothing new promoted
    md = summary_artifacts(prefect_api, flow_run_id(state))[0]["data"]
    assert "| batch-test | 6 | 0 | 3 |" in md and "already in production: nothing to package" in md


def test_failed_gate_keeps_the_champion(prefect_api, fake_project, tmp_path):
    champion = fake_project.seed_champion({**GOOD_METRICS, "accuracy": 0.99, "macro_f1": 0.99})
    fake_project.set_params({"gate": STRICT_GATE})
    batch, _, _ = make_batch(tmp_path, good_per_class=1, bad=False)

    state = run_flow(root=str(fake_project.root), incoming=[str(batch)])

    assert state.is_failed()
    assert "step 'gate'" in state.message and "gate failed" in state.message
    assert "accuracy 0.9500 >= 0.999: FAIL" in state.message
    assert fake_project.production.read_bytes() == champion
    gate = json.loads((fake_project.root / "artifacts" / "gate.json").read_text())
    assert gate["passed"] is False
    assert not (fake_project.root / "artifacts" / "bento.json").exists()  # nothing was packaged
    names = {t["name"].split("-")[0] for t in task_runs(prefect_api, flow_run_id(state))}
    assert "package" not in names and "promote" not in names
    md = summary_artifacts(prefect_api, flow_run_id(state))[0]["data"]
    assert "Gate: FAILED" in md and "| accuracy | 0.9500 | 0.9900 |" in md and "production.json unchanged" in md
    (fail,) = failure_artifacts(prefect_api, flow_run_id(state))
    assert "failed at step `gate`" in fail["data"] and "accuracy 0.9500 >= 0.999: FAIL" in fail["data"]


def test_gate_pass_but_not_better_keeps_the_champion(prefect_api, fake_project):
    better = {**GOOD_METRICS, "macro_f1": GOOD_METRICS["macro_f1"] + 0.002}  # within tolerance, still better
    champion = fake_project.seed_champion(better)

    state = run_flow(root=str(fake_project.root))

    assert state.is_completed(), state.message
    assert fake_project.production.read_bytes() == champion
    assert json.loads((fake_project.root / "artifacts" / "bento.json").read_text())["bento"]  # packaged
    md = summary_artifacts(prefect_api, flow_run_id(state))[0]["data"]
    assert "Gate: PASSED" in md and "kept the champion (candidate is not better)" in md


def test_flow_killed_during_training_completes_when_rerun(prefect_api, fake_project, tmp_path):
    batch, good, _ = make_batch(tmp_path, good_per_class=1, bad=False)
    hold = fake_project.root / "HOLD_TRAIN"
    hold.touch()
    started = fake_project.root / ".train_started"
    env = {**fake_project.env, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "WARNING"}
    cmd = [sys.executable, str(MAIN / "flows" / "retrain.py"), "--root", str(fake_project.root),
           "--incoming", str(batch), "--backoff-s", "0.2"]
    log = open(tmp_path / "killed_run.log", "w")
    proc = subprocess.Popen(cmd, cwd=fake_project.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for(lambda: started.exists() or proc.poll() is not None, 120, "training to start")
        assert proc.poll() is None, (tmp_path / "killed_run.log").read_text()[-3000:]
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run dies: flow, dvc repro, the training
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert (fake_project.root / "artifacts" / "model" / "model.safetensors").read_bytes() == b"partial"
    assert not fake_project.production.exists()
    hold.unlink()

    state = run_flow(root=str(fake_project.root), incoming=[str(batch)])

    assert state.is_completed(), state.message
    assert fake_project.production.exists()
    assert (fake_project.root / "artifacts" / "model" / "model.safetensors").read_bytes() != b"partial"
    assert "up to date" in fake_project.dvc("status", "--with-deps", "gate").lower()  # dvc.lock records the finished chain
    for cls, names in good.items():
        assert names <= fake_project.images()[cls]


def test_commit_true_commits_data_dvc_the_promotion_and_the_ledger_only(prefect_api, fake_project, tmp_path):
    batch, _, _ = make_batch(tmp_path, good_per_class=1, bad=False)
    (fake_project.root / "untracked-note.txt").write_text("not mine to commit")
    head = fake_project.git("rev-parse", "HEAD").strip()

    state = run_flow(root=str(fake_project.root), incoming=[str(batch)], commit=True)

    assert state.is_completed(), state.message
    commits = [line.split(" ", 1) for line in reversed(fake_project.git("log", "--format=%H %s", f"{head}..HEAD")
                                                       .splitlines())]  # oldest first
    kinds = [subject.split()[0] for _, subject in commits]
    assert kinds == ["data:", "promote", "inbox:"]
    files = {k: fake_project.git("show", "--name-only", "--format=", h).split() for (h, _), k in zip(commits, kinds)}
    assert files["data:"] == ["data.dvc"]
    prod = json.loads(fake_project.production.read_text())
    assert sorted(files["promote"]) == sorted(["registry/production.json", prod["export"] + ".dvc",
                                               "registry/bentos/.gitignore", "dvc.lock"])   # the run it promotes
    assert files["inbox:"] == ["registry/inbox-ledger.json"]
    assert "batch-test" in commits[0][1]
    assert "untracked-note.txt" in fake_project.git("status", "--porcelain")
    assert fake_project.git("status", "--porcelain", "--", "registry", "data.dvc") == ""
    # the exported Bento went to the remote with the promotion
    assert "in sync" in fake_project.dvc("status", "-c", prod["export"] + ".dvc").lower()


def test_cli_runs_the_flow_once_and_pushes_to_a_remote_path(prefect_api, fake_project, tmp_path):
    batch, good, _ = make_batch(tmp_path, good_per_class=1, bad=False)
    new_remote = tmp_path / "another-remote"
    new_remote.mkdir()
    config = (fake_project.root / ".dvc" / "config").read_text()
    # a slightly better champion: the gate passes, promotion is declined
    champion = fake_project.seed_champion({**GOOD_METRICS, "macro_f1": GOOD_METRICS["macro_f1"] + 0.002})
    env = {**fake_project.env, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "WARNING"}

    # flows/retrain.py's main(), with release/registry.py's two BentoML-store functions faked in that process
    code = (f"import sys; sys.path[:0] = [{str(MAIN / 'flows')!r}, {str(MAIN / 'tests' / 'flows')!r}]; "
            f"import fake_stages; fake_stages.install_release_fakes({str(fake_project.root)!r}); "
            "import retrain; sys.exit(retrain.main(sys.argv[1:]))")
    r = subprocess.run(
        [sys.executable, "-c", code, "--incoming", str(batch),
         "--remote", os.path.relpath(new_remote, fake_project.root), "--backoff-s", "0.2"],
        cwd=fake_project.root, env=env, capture_output=True, text=True, timeout=300,
    )

    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "retrain: COMPLETED" in r.stdout
    assert (fake_project.root / ".dvc" / "config").read_text() == config  # committed config untouched
    assert not (fake_project.root / ".dvc" / "config.local").exists()    # nor a local one written
    with vcs.remote_args(str(new_remote)) as (args, extra):                # the data reached that remote
        assert "in sync" in sh([str(VENV_BIN / "dvc"), "status", "-c", *args, "data.dvc"], fake_project.root,
                               env={**fake_project.env, **extra})
    assert any(new_remote.rglob("*")) and fake_project.production.read_bytes() == champion
    assert all(names <= fake_project.images()[cls] for cls, names in good.items())
