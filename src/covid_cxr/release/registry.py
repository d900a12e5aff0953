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
from typing import Any, Callable

import typer

from covid_cxr.release import promotion
from covid_cxr.config import Paths
from covid_cxr.release.promotion import PromotionError

MODEL_NAME = "covid_cxr"
Log = Callable[[str], None]


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


def publish(paths: Paths, bento_tag: str, remote: str | None = None, push: bool = True,
            log: Log | None = None) -> str:
    """Export the Bento under registry/bentos/, track it with DVC and push it. Returns the export
    path (relative to the root). A Bento exported before is not exported again."""
    from covid_cxr.orchestrate.shell import remote_name, run

    dest = export_path(paths, bento_tag)
    dvc_file = _dvc_file(dest)
    if not dvc_file.exists():
        if not dest.exists():
            export_bento(bento_tag, dest)
        run(["dvc", "add", _rel(paths, dest)], paths.root, log=log)
    if push:
        name = remote_name(paths.root, remote, log)
        run(["dvc", "push", *(["-r", name] if name else []), _rel(paths, dvc_file)], paths.root, log=log)
    return _rel(paths, dest)


def _record_files(paths: Paths, export: str | None) -> list[Path]:
    files = [paths.production]
    if export:
        p = paths.root / export
        files += [_dvc_file(p), p.parent / ".gitignore"]
    return files


def _apply(paths: Paths, entry: dict[str, Any], message: str, commit: bool, log: Log | None) -> dict[str, Any]:
    """Write the record with `entry` in production and commit it; on a failed commit the old
    record is put back, so production is never changed without its commit."""
    old = paths.production.read_bytes() if paths.production.exists() else None
    rec = promotion.new_record(paths, entry)
    promotion.write_record(paths, rec)
    if commit:
        try:
            from covid_cxr.orchestrate.shell import git_commit_files

            rec["commit"] = git_commit_files(paths.root, _record_files(paths, entry.get("export")), message, log)
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
    export = publish(paths, d["bento"], remote, push, log)
    entry = {**d, "export": export, "action": action, "reasons": reasons}
    _apply(paths, entry, f"promote {d['bento']} (model {d['model']}) to production", commit, log)
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
    """Make the Bento that registry/production.json names servable here: `dvc pull` its export,
    `bentoml import` it, and check the model inside is the recorded one. Trains nothing."""
    from covid_cxr.orchestrate.shell import remote_name, run

    paths = paths or Paths()
    rec = promotion.production(paths)
    if rec is None:
        raise PromotionError(f"nothing is in production ({paths.production})")
    if not in_store(rec["bento"]):
        if not rec.get("export"):
            raise PromotionError(f"the production record names no exported Bento for {rec['bento']}")
        f = paths.root / rec["export"]
        name = remote_name(paths.root, remote, log)
        run(["dvc", "pull", *(["-r", name] if name else []), _rel(paths, _dvc_file(f))], paths.root, log=log)
        got = import_bento(f)
        if got != rec["bento"]:
            raise PromotionError(f"{rec['export']} holds {got}, but production names {rec['bento']}")
    d = describe(rec["bento"])
    if rec.get("model") and d["model"] != rec["model"]:
        raise PromotionError(f"{rec['bento']} carries {d['model']}, but production names model {rec['model']}")
    return rec


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def register(app: typer.Typer, data_app: typer.Typer) -> None:  # noqa: ARG001
    from covid_cxr.orchestrate.shell import StepError

    remote_opt = typer.Option(None, "--remote", help="DVC remote name or path (default: the configured one).")
    commit_opt = typer.Option(True, "--commit/--no-commit", help="git commit the record (default) or only write it.")

    @app.command("promote")
    def promote_cmd(
        bento_tag: str = typer.Argument(None, help="Bento tag (default: the one in artifacts/bento.json)."),
        force: bool = typer.Option(False, "--force", help="Skip the champion comparison (never the gate)."),
        remote: str = remote_opt,
        push: bool = typer.Option(True, "--push/--no-push", help="dvc push the exported Bento (default)."),
        commit: bool = commit_opt,
    ) -> None:
        """Put a built Bento into production (registry/production.json) if it beats the champion;
        exit 2 when the rule keeps the champion."""
        paths = Paths()
        try:
            r = promote(paths, bento_tag, force=force, remote=remote, push=push, commit=commit)
        except (PromotionError, StepError) as e:
            _fail(f"{e}\nProduction unchanged.")
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
            _fail(f"{e}\nProduction unchanged.")
        typer.echo(f"rolled back: {r['bento']} is in production")

    @app.command("pull-production")
    def pull_cmd(remote: str = remote_opt) -> None:
        """Fetch the production Bento (dvc pull + bentoml import) so `covid-cxr serve` can run it."""
        try:
            rec = pull_production(Paths(), remote)
        except (PromotionError, StepError) as e:
            _fail(str(e))
        typer.echo(f"{rec['bento']} (model {rec['model']}) is in the local store ({_store()}): covid-cxr serve")
