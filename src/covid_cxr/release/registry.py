"""Production, shared: promote, roll back and fetch the Bento that registry/production.json names.

    covid-cxr promote [TAG] [--force] [--remote R] [--no-push] [--no-commit]
    covid-cxr rollback [--to TAG] [--no-commit]
    covid-cxr pull-production [--remote R]          # a second clone: fetch what production names

Promotion is a decision, never a side effect of `dvc repro` / `dvc exp run` (stage `package`
only builds). `promote` takes a built Bento (default: the one in artifacts/bento.json), applies
promotion.decide (the gate label in the store, then the champion rule; `--force` skips the rule,
never the gate), and then, in this order, so that a failure changes nothing anyone can see:
  1. `bentoml export` of the Bento (its model inside) to registry/bentos/<name>-<version>.bento,
     `dvc add` of that file (registry/bentos/<...>.bento.dvc) and `dvc push` of it;
  2. the new registry/production.json (the old entry goes onto its history);
  3. `git commit` of the record, the .dvc file and registry/bentos/.gitignore, nothing else.
`git push` shares it. Another clone then runs `git pull`, `covid-cxr pull-production` (dvc pull of
the exported Bento + `bentoml import`) and `covid-cxr serve`: the same model, nothing trained.
`rollback` puts the previous entry back (its Bento is already on the remote) as a new commit.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from covid_cxr.console import fail
from covid_cxr import vcs
from covid_cxr.config import Paths
from covid_cxr.release import promotion
from covid_cxr.release.promotion import PromotionError
from covid_cxr.runner import Log

MODEL_NAME = "covid_cxr"


def _store() -> str:
    return os.environ.get("BENTOML_HOME", "~/bentoml")


# ---------------------------------------------------------------------------------------------
# the local BentoML store
# ---------------------------------------------------------------------------------------------
def describe(bento_tag: str) -> dict[str, Any]:
    """What the local store knows of a Bento: full tag, its model, the model's gate label and
    test metrics, data md5 / git sha / params hash. PromotionError if it is not there."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        b = bentoml.get(bento_tag)
    except NotFound:
        raise PromotionError(f"Bento {bento_tag} is not in the store ({_store()})") from None
    models = [m for m in b.info.all_models if m.tag.name == MODEL_NAME] or list(b.info.all_models)
    if not models:
        raise PromotionError(f"Bento {bento_tag} carries no model")
    try:
        bm = bentoml.models.get(models[0].tag)
    except NotFound:
        raise PromotionError(f"model {models[0].tag} of {bento_tag} is not in the model store ({_store()})") from None
    stored = Path(bm.path) / "metrics.json"
    metrics = json.loads(stored.read_text()) if stored.is_file() else dict(bm.info.metadata.get("metrics") or {})
    lab = bm.info.labels
    return {"bento": str(b.tag), "model": str(bm.tag), "gate": lab.get("gate"), "metrics": metrics,
            "data_md5": lab.get("data_md5"), "git_sha": lab.get("git_sha"), "params_hash": lab.get("params_hash")}


def export_bento(bento_tag: str, dest: Path) -> Path:
    """`bentoml export` (the Bento with its model) to the file `dest`."""
    import bentoml

    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(bentoml.export_bento(bento_tag, str(dest)))


def import_bento(path: Path) -> str:
    import bentoml

    return str(bentoml.import_bento(str(path)).tag)


def in_store(bento_tag: str) -> bool:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.get(bento_tag)
        return True
    except NotFound:
        return False


# ---------------------------------------------------------------------------------------------
# DVC and git
# ---------------------------------------------------------------------------------------------
def export_path(paths: Paths, bento_tag: str) -> Path:
    name, _, version = bento_tag.partition(":")
    return paths.bentos / f"{name}-{version}.bento"


def _rel(paths: Paths, p: Path) -> str:
    return p.relative_to(paths.root).as_posix()


def _dvc_file(p: Path) -> Path:
    return p.with_name(p.name + ".dvc")


def run_outputs(paths: Paths, bento_tag: str) -> list[str]:
    """The pipeline outputs to push with `bento_tag`: dvc.yaml (every stage's outputs) when the
    workspace holds the run that built it (artifacts/bento.json names it), else nothing."""
    from covid_cxr.jsonio import read_json

    built = read_json(paths.artifacts / "bento.json") or {}
    return ["dvc.yaml"] if built.get("bento") == bento_tag and (paths.root / "dvc.lock").is_file() else []


def publish(paths: Paths, bento_tag: str, remote: str | None = None, push: bool = True,
            log: Log | None = None) -> str:
    """Export the Bento under registry/bentos/, track it with DVC and push it, with the outputs of
    the run that built it (so another clone gets artifacts/model by `dvc pull`). Returns the export
    path (relative to the root). A Bento exported before is not exported again."""
    from covid_cxr.runner import run

    dest = export_path(paths, bento_tag)
    dvc_file = _dvc_file(dest)
    if not dvc_file.exists():
        if not dest.exists():
            export_bento(bento_tag, dest)
        run(["dvc", "add", _rel(paths, dest)], paths.root, log=log)
    if push:
        vcs.dvc(paths.root, "push", [_rel(paths, dvc_file), *run_outputs(paths, bento_tag)], remote, log)
    return _rel(paths, dest)


def _record_files(paths: Paths, export: str | None, with_run: bool = False) -> list[Path]:
    """What a promotion commits: the record, the export's .dvc file and .gitignore, and dvc.lock when the
    run that built the Bento is in the workspace (its outputs were pushed with it)."""
    files = [paths.production]
    if export:
        p = paths.root / export
        files += [_dvc_file(p), p.parent / ".gitignore"]
    if with_run:
        files.append(paths.root / "dvc.lock")
    return files


def _apply(paths: Paths, entry: dict[str, Any], message: str, commit: bool, log: Log | None,
           with_run: bool = False) -> dict[str, Any]:
    """Write the record with `entry` in production and commit it; on a failed commit the old
    record is put back, so production is never changed without its commit."""
    old = paths.production.read_bytes() if paths.production.exists() else None
    rec = promotion.new_record(paths, entry)
    promotion.write_record(paths, rec)
    if commit:
        try:
            rec["commit"] = vcs.git_commit_files(paths.root, _record_files(paths, entry.get("export"), with_run),
                                                 message, log)
        except Exception:
            if old is None:
                paths.production.unlink(missing_ok=True)
            else:
                paths.production.write_bytes(old)
            raise
    return rec


# ---------------------------------------------------------------------------------------------
# promote / rollback / pull
# ---------------------------------------------------------------------------------------------
def last_packaged(paths: Paths) -> str:
    """The Bento artifacts/bento.json names (what `covid-cxr package` built last)."""
    f = paths.artifacts / "bento.json"
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        raise PromotionError(f"no Bento tag given and {f} is missing: run `covid-cxr package` first") from None
    if not rec.get("bento"):
        raise PromotionError(f"{f} says nothing was packaged: {rec.get('reason') or 'the gate failed'}")
    return str(rec["bento"])


def promote(paths: Paths | None = None, bento: str | None = None, *, force: bool = False,
            remote: str | None = None, push: bool = True, commit: bool = True,
            log: Log | None = None) -> dict[str, Any]:
    """The promotion decision, then (when it wins) publish, record, commit.

    Returns {"promoted": bool, "action", "reasons", "bento", "production": entry now in production}.
    Raises PromotionError (nothing changed) for a model that failed the gate or is not in the store.
    """
    paths = paths or Paths()
    d = describe(bento or last_packaged(paths))
    if d["gate"] != "passed":
        raise PromotionError(f"model {d['model']} did not pass the evaluation gate; it cannot go to production")
    ok, action, reasons = promotion.decide(paths, d["bento"], d["metrics"], force=force)
    if not ok:
        return {"promoted": False, "action": action, "reasons": reasons, "bento": d["bento"],
                "production": promotion.production(paths)}
    url = vcs.remote_url(paths.root, remote) if push else None
    export = publish(paths, d["bento"], url, push, log)
    entry = {**d, "export": export, "remote": url, "action": action, "reasons": reasons}
    _apply(paths, entry, f"promote {d['bento']} (model {d['model']}) to production", commit, log,
           with_run=bool(run_outputs(paths, d["bento"])))
    return {"promoted": True, "action": action, "reasons": reasons, "bento": d["bento"],
            "production": promotion.production(paths)}


def rollback(paths: Paths | None = None, to: str | None = None, *, commit: bool = True,
             log: Log | None = None) -> dict[str, Any]:
    """Put a previous production entry back (default: the one before the current) as a new
    record, committed like a promotion. Its Bento was published when it was first promoted."""
    paths = paths or Paths()
    cur = promotion.production(paths)
    target = promotion.rollback_target(paths, to)
    export = target.get("export")
    if not export or not _dvc_file(paths.root / export).exists():
        raise PromotionError(f"{target['bento']} has no exported Bento under {paths.bentos} to roll back to")
    entry = {**target, "action": "rollback", "promoted_at": None,
             "reasons": [f"rolled back from {cur['bento']}" if cur else "rolled back"]}
    _apply(paths, entry, f"rollback production to {target['bento']} (from {cur and cur['bento']})", commit, log)
    return {"promoted": True, "action": "rollback", "bento": target["bento"], "production": promotion.production(paths)}


def pull_production(paths: Paths | None = None, remote: str | None = None, log: Log | None = None) -> dict[str, Any]:
    """Make the Bento that registry/production.json names servable here: `dvc pull` its export
    from the remote the record names (or `remote`: a name, path or URL), `bentoml import` it, and
    check the model inside is the recorded one. Trains nothing; writes no DVC config.
    PromotionError, saying what to do, when any of that fails."""
    from covid_cxr.runner import StepError

    paths = paths or Paths()
    rec = promotion.production(paths)
    if rec is None:
        raise PromotionError(f"nothing is in production: {paths.production.relative_to(paths.root)} names no Bento. "
                             "`git pull` the team's record, or promote a Bento with `covid-cxr promote`")
    if not in_store(rec["bento"]):
        if not rec.get("export"):
            raise PromotionError(f"the production record names no exported Bento for {rec['bento']}: "
                                 "promote it again (`covid-cxr promote --force " + rec["bento"] + "`) where it was built")
        where = remote or rec.get("remote")
        if where is None:
            raise PromotionError("the production record does not say which DVC remote holds its Bento (a record "
                                 "written before remotes were recorded): pass --remote NAME|PATH|URL")
        if vcs.is_location(where) and "://" not in where and not Path(where).expanduser().is_dir():
            raise PromotionError(f"the Bento's DVC remote {where} is not a folder on this machine: pass --remote "
                                 "with where that remote is reachable from here (a path or URL)")
        f = paths.root / rec["export"]
        try:
            vcs.dvc(paths.root, "pull", [_rel(paths, _dvc_file(f))], where, log)
        except StepError as e:
            raise PromotionError(f"could not fetch {rec['export']} from the DVC remote {where}: {_last_error(e)}. "
                                 "Check that the promotion was pushed there (`covid-cxr promote` pushes it) "
                                 "or pass --remote with the right one") from None
        got = import_bento(f)
        if got != rec["bento"]:
            raise PromotionError(f"{rec['export']} holds {got}, but production names {rec['bento']}: "
                                 "the record and the export disagree; `git pull` and try again")
    d = describe(rec["bento"])
    if rec.get("model") and d["model"] != rec["model"]:
        raise PromotionError(f"{rec['bento']} carries {d['model']}, but production names model {rec['model']}")
    return rec


def _last_error(e: Exception) -> str:
    """The most telling line of a failed `dvc` command (its ERROR line), else the message's last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("ERROR")]
    return (errs or lines or ["unknown error"])[-1]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def register(app: typer.Typer, data_app: typer.Typer) -> None:  # noqa: ARG001
    from covid_cxr.runner import StepError

    remote_opt = typer.Option(None, "--remote", help="DVC remote: a name, a path or a URL (default: the default "
                              "remote; for pull-production, the one the production record names).")
    commit_opt = typer.Option(True, "--commit/--no-commit", help="git commit the record (default) or only write it.")

    @app.command("promote")
    def promote_cmd(
        bento_tag: str = typer.Argument(None, help="Bento tag (default: the one in artifacts/bento.json)."),
        force: bool = typer.Option(False, "--force", help="Skip the champion comparison (never the gate)."),
        remote: str = remote_opt,
        push: bool = typer.Option(True, "--push/--no-push", help="dvc push the exported Bento and the outputs of "
                                  "the run that built it (default)."),
        commit: bool = commit_opt,
    ) -> None:
        """Put a built Bento into production (registry/production.json) if it beats the champion;
        exit 2 when the rule keeps the champion."""
        paths = Paths()
        try:
            r = promote(paths, bento_tag, force=force, remote=remote, push=push, commit=commit)
        except (PromotionError, StepError) as e:
            fail(f"{e}\nProduction unchanged.")
        for why in r["reasons"]:
            typer.echo(f"  {why}")
        if not r["promoted"]:
            typer.echo(f"not promoted: production stays {(r['production'] or {}).get('bento')}")
            raise typer.Exit(0 if r["production"] and r["production"]["bento"] == r["bento"] else 2)
        typer.echo(f"promoted {r['bento']} to production ({paths.production.relative_to(paths.root)}"
                   f"{', committed: git push to share it' if commit else ', not committed'})")

    @app.command("rollback")
    def rollback_cmd(
        to: str = typer.Option(None, "--to", help="Bento tag from the history (default: the previous one)."),
        commit: bool = commit_opt,
    ) -> None:
        """Put the previous production Bento back, recorded (and committed) like a promotion."""
        try:
            r = rollback(Paths(), to, commit=commit)
        except (PromotionError, StepError) as e:
            fail(f"{e}\nProduction unchanged.")
        typer.echo(f"rolled back: {r['bento']} is in production")

    @app.command("pull-production")
    def pull_cmd(remote: str = remote_opt) -> None:
        """Fetch the production Bento (dvc pull + bentoml import) so `covid-cxr serve` can run it."""
        try:
            rec = pull_production(Paths(), remote)
        except (PromotionError, StepError) as e:
            fail(str(e))
        typer.echo(f"{rec['bento']} (model {rec['model']}) is in the local store ({_store()}): covid-cxr serve")
