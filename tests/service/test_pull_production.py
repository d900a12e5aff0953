"""`covid-cxr pull-production` on a fresh clone: the remote comes from the production record (no DVC
config written or needed), and every way it can fail says what to do, one test per failure.

The BentoML store and `dvc pull` are faked here (the real chain runs in tests/flows/test_team_week.py
and tests/flows/test_registry_e2e.py): these tests are about the decisions and the messages.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from covid_cxr import vcs
from covid_cxr.config import Paths
from covid_cxr.release import registry
from covid_cxr.release.promotion import PromotionError
from covid_cxr.runner import CommandFailed

BENTO, MODEL = "covid_cxr:aaaa1111bbbb2222", "covid_cxr:cccc3333dddd4444"
EXPORT = "registry/bentos/covid_cxr-aaaa1111bbbb2222.bento"


@pytest.fixture
def clone(tmp_path, monkeypatch) -> Paths:
    """A clone with a production record and nothing in its BentoML store; `dvc pull` and the store faked."""
    root = tmp_path / "clone"
    (root / "registry" / "bentos").mkdir(parents=True)
    (root / "params.yaml").write_text("{}\n")
    remote = tmp_path / "team-remote"
    remote.mkdir()
    write_record(root, {"bento": BENTO, "model": MODEL, "export": EXPORT, "remote": str(remote)})
    store: set[str] = set()
    pulls: list[tuple[list[str], str | None]] = []

    def fake_dvc(root_, verb, targets, remote_=None, log=None, timeout=None):
        assert verb == "pull"
        pulls.append((targets, remote_))
        (Path(root_) / EXPORT).write_bytes(b"exported bento")
        return []

    monkeypatch.setattr(vcs, "dvc", fake_dvc)
    monkeypatch.setattr(registry, "in_store", lambda tag: tag in store)
    monkeypatch.setattr(registry, "import_bento", lambda path: store.add(BENTO) or BENTO)
    monkeypatch.setattr(registry, "describe", lambda tag: {"bento": tag, "model": MODEL})
    p = Paths(root)
    p.pulls, p.store, p.remote = pulls, store, remote   # what the tests look at
    return p


def write_record(root: Path, rec: dict) -> None:
    (root / "registry" / "production.json").write_text(json.dumps({**rec, "history": []}))


def test_the_record_names_the_remote_nothing_else_is_needed(clone):
    rec = registry.pull_production(clone)
    assert rec["bento"] == BENTO and clone.store == {BENTO}
    (targets, remote), = clone.pulls
    assert targets == [EXPORT + ".dvc"] and remote == str(clone.remote)   # the record's remote, as a location
    assert not (clone.root / ".dvc" / "config.local").exists()


def test_an_explicit_remote_wins_over_the_record(clone, tmp_path):
    other = tmp_path / "mounted-elsewhere"
    other.mkdir()
    registry.pull_production(clone, remote=str(other))
    assert clone.pulls[0][1] == str(other)


def test_already_in_the_store_pulls_nothing(clone):
    clone.store.add(BENTO)
    registry.pull_production(clone)
    assert clone.pulls == []


def test_nothing_in_production(clone):
    (clone.root / "registry" / "production.json").unlink()
    with pytest.raises(PromotionError, match=r"nothing is in production.*`git pull`.*covid-cxr promote"):
        registry.pull_production(clone)


def test_a_record_without_an_export(clone):
    write_record(clone.root, {"bento": BENTO, "model": MODEL})
    with pytest.raises(PromotionError, match=r"names no exported Bento.*promote it again"):
        registry.pull_production(clone)


def test_a_record_that_does_not_say_where(clone):
    write_record(clone.root, {"bento": BENTO, "model": MODEL, "export": EXPORT})   # written before `remote`
    with pytest.raises(PromotionError, match=r"does not say which DVC remote.*pass --remote"):
        registry.pull_production(clone)


def test_a_remote_folder_this_machine_cannot_see(clone, tmp_path):
    write_record(clone.root, {"bento": BENTO, "model": MODEL, "export": EXPORT, "remote": str(tmp_path / "gone")})
    with pytest.raises(PromotionError, match=r"not a folder on this machine: pass --remote"):
        registry.pull_production(clone)
    assert clone.pulls == []


def test_a_remote_that_does_not_hold_the_export(clone, monkeypatch):
    def missing(*a, **k):
        raise CommandFailed(["dvc", "pull"], 1, ["ERROR: failed to pull data from the cloud - Checkout failed"])

    monkeypatch.setattr(vcs, "dvc", missing)
    with pytest.raises(PromotionError, match=r"could not fetch .* from the DVC remote .*ERROR: failed to pull.*"
                                             r"promote` pushes it"):
        registry.pull_production(clone)


def test_an_export_that_holds_another_bento(clone, monkeypatch):
    monkeypatch.setattr(registry, "import_bento", lambda path: "covid_cxr:somethingelse")
    with pytest.raises(PromotionError, match=r"holds covid_cxr:somethingelse, but production names .*git pull"):
        registry.pull_production(clone)


def test_a_bento_that_carries_another_model(clone, monkeypatch):
    monkeypatch.setattr(registry, "describe", lambda tag: {"bento": tag, "model": "covid_cxr:other"})
    with pytest.raises(PromotionError, match=r"carries covid_cxr:other, but production names model"):
        registry.pull_production(clone)


def test_the_cli_says_it_in_one_line_and_exits_1(clone, tmp_path):
    import subprocess
    import sys

    write_record(clone.root, {"bento": BENTO, "model": MODEL, "export": EXPORT, "remote": str(tmp_path / "gone")})
    env = {"PATH": str(Path(sys.executable).parent), "BENTOML_HOME": str(tmp_path / "bhome"), "HOME": str(tmp_path)}
    r = subprocess.run([str(Path(sys.executable).parent / "covid-cxr"), "pull-production"], cwd=clone.root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: the Bento's DVC remote") and "Traceback" not in r.stderr
