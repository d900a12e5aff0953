"""The retraining inbox: content keys, the ledger, and the flow processing each batch once.

Unit tests of covid_cxr.orchestrate.inbox, then the flow on a fake project (real dvc, real temporary
Prefect server; fake stages, see test_retrain_faults.py).
"""
from __future__ import annotations

import json
import shutil

from flowkit import make_batch, summary_artifacts, task_runs

from covid_cxr.orchestrate import inbox
from covid_cxr.config import Paths


def run_flow(**kw):
    import retrain

    return retrain.retrain(backoff_s=0.2, return_state=True, **kw)


def _kaggle_copy(src, dst):
    """The same batch in the Kaggle layout: <root>/<Class>/images/<file>, files renamed."""
    for cls_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        out = dst / "COVID-19_Radiography_Dataset" / cls_dir.name / "images"
        out.mkdir(parents=True)
        for i, f in enumerate(sorted(cls_dir.iterdir())):
            shutil.copy2(f, out / f"renamed-{i}{f.suffix}")


def test_batch_key_is_content_and_class_not_names_or_layout(tmp_path):
    batch, _, _ = make_batch(tmp_path, good_per_class=1, bad=False, name="batch-a")
    key, n = inbox.batch_key(batch)
    assert n == 3
    shutil.copytree(batch, tmp_path / "copy-with-another-name")
    assert inbox.batch_key(tmp_path / "copy-with-another-name") == (key, 3)
    _kaggle_copy(batch, tmp_path / "kaggle")
    assert inbox.batch_key(tmp_path / "kaggle") == (key, 3)
    (tmp_path / "copy-with-another-name" / ".DS_Store").write_bytes(b"finder")  # hidden files do not count
    assert inbox.batch_key(tmp_path / "copy-with-another-name")[0] == key

    moved = tmp_path / "moved"
    shutil.copytree(batch, moved)
    f = next((moved / "COVID").iterdir())
    shutil.move(f, moved / "Normal" / f.name)  # the same film under another label: another batch
    assert inbox.batch_key(moved)[0] != key
    other, _, _ = make_batch(tmp_path, good_per_class=1, bad=False, offset=1, name="batch-b")
    assert inbox.batch_key(other)[0] != key


def test_new_batches_skips_the_ledgers_and_duplicate_copies(tmp_path):
    box = tmp_path / "inbox"
    make_batch(box, good_per_class=1, bad=False, name="batch-a")
    shutil.copytree(box / "batch-a", box / "batch-a-again")
    (box / ".batch-c.part").mkdir()  # still being copied in: not a batch
    (box / "empty").mkdir()
    paths = Paths(tmp_path / "proj")

    found = inbox.new_batches(box, paths)
    assert [b["name"] for b in found["new"]] == ["batch-a"]
    assert [(b["name"], b["seen_as"]) for b in found["seen"]] == [("batch-a-again", "batch-a")]

    inbox.record(paths, found["new"], "promoted x", data_version="abc", flow_run="run-1")
    ledger = json.loads(paths.ledger.read_text())["batches"]
    assert ledger[found["new"][0]["key"]]["batch"] == "batch-a" and ledger[found["new"][0]["key"]]["files"] == 3
    make_batch(box, good_per_class=1, bad=False, offset=1, name="batch-b")
    again = inbox.new_batches(box, paths)
    assert [b["name"] for b in again["new"]] == ["batch-b"]
    assert sorted(b["name"] for b in again["seen"]) == ["batch-a", "batch-a-again"]


def test_flow_processes_each_inbox_batch_once(prefect_api, fake_project, tmp_path):
    box = tmp_path / "inbox"
    _, good, _ = make_batch(box, good_per_class=1, bad=False, name="batch-a")

    first = run_flow(root=str(fake_project.root), inbox=str(box))

    assert first.is_completed(), first.message
    assert all(names <= fake_project.images()[c] for c, names in good.items())
    (entry,) = json.loads(fake_project.ledger.read_text())["batches"].values()
    assert entry["batch"] == "batch-a" and entry["outcome"].startswith("promoted")
    assert entry["flow_run"] == str(first.state_details.flow_run_id)
    images, prod = fake_project.images(), fake_project.production.read_bytes()

    # a renamed copy is not new: the run says so, and nothing is pulled, rebuilt or promoted
    shutil.copytree(box / "batch-a", box / "batch-a (copy)")
    shutil.rmtree(box / "batch-a")
    second = run_flow(root=str(fake_project.root), inbox=str(box))

    assert second.is_completed() and second.message.startswith("nothing new"), second.message
    ran = {t["name"].rsplit("-", 1)[0] for t in task_runs(prefect_api, str(second.state_details.flow_run_id))}
    assert ran == {"scan-inbox", "summary"}, ran
    assert fake_project.images() == images and fake_project.production.read_bytes() == prod
    md = summary_artifacts(prefect_api, str(second.state_details.flow_run_id))[0]["data"]
    assert md.startswith("# Retraining run: nothing new") and "processed before (as batch-a)" in md

    # a new batch beside it: only that one is processed
    _, good_b, _ = make_batch(box, good_per_class=1, bad=False, offset=1, name="batch-b")
    third = run_flow(root=str(fake_project.root), inbox=str(box))

    assert third.is_completed(), third.message
    md = summary_artifacts(prefect_api, str(third.state_details.flow_run_id))[0]["data"]
    assert "| batch-b | 3 | 3 |" in md and "| batch-a (copy) |" not in md.split("## Incoming data")[1]
    assert all(names <= fake_project.images()[c] for c, names in good_b.items())
    assert len(json.loads(fake_project.ledger.read_text())["batches"]) == 2
