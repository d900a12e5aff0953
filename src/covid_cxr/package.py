"""Packaging and promotion: the last pipeline step (dvc stage `package`).

    covid-cxr package [--promote/--no-promote]   gate check -> model store -> bentoml build -> bento.json
    covid-cxr promote BENTO_TAG [--force]        make a built Bento the production one

Packaging refuses (exit 1, nothing changed) unless artifacts/gate.json says `passed: true`.
It saves artifacts/model/ (plus the evaluation metrics, the gate decision and the model card)
into the BentoML model store as `covid_cxr:<version>`, labelled with data md5, git sha,
params hash and gate result; builds a Bento from bentofile.yaml that pins exactly that model
version; and writes artifacts/bento.json. `BENTOML_HOME` chooses the store.

Promotion rule (`is_better`), on the key test metrics accuracy, macro_f1 and covid_recall:
a candidate replaces the champion in artifacts/production.json only if
  1. it passed the gate (checked again at promotion, from the model's store labels), and
  2. none of the key metrics is more than `gate.champion_tolerance` (params.yaml, 0.005)
     below the champion's, and
  3. the key metrics improve in total (sum of the differences > 0): a tie keeps the champion.
With nothing in production, a gate-passing candidate is promoted. `covid-cxr package` compares
against the champion as the gate re-scored it on the candidate's test split (gate.json
`champion`, when it names the Bento in production), else against production.json's record.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer

from .config import Paths, load_params

MODEL_NAME = "covid_cxr"
KEY_METRICS = ("accuracy", "macro_f1", "covid_recall")
DEFAULT_TOLERANCE = 0.005
MODEL_FILES = ("model.safetensors", "model.json", "ood.safetensors")


class PackagingError(RuntimeError):
    """Packaging or promotion refused; the message says why. Nothing was changed."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _read_json(p: Path) -> Any:
    try:
        return json.loads(Path(p).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise PackagingError(f"{p} is not valid JSON: {e}") from None


def _write_json_atomic(p: Path, obj: Any) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clean(obj: Any) -> Any:
    """JSON-ish -> what BentoML accepts as model metadata (no None anywhere)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj if v is not None]
    return obj


def _git_sha(root: Path) -> str:
    from .train import git_sha

    return git_sha(root) or "unknown"


def params_hash(meta: dict[str, Any], root: Path) -> str:
    """The params hash the train stage recorded in model.json (one definition: train.params_hash)."""
    if meta.get("params_hash"):
        return str(meta["params_hash"])
    from .train import params_hash as _hash

    try:
        p = load_params(root / "params.yaml")
        params = {k: p.get(k) for k in ("train", "evaluate", "gate")}
    except OSError:
        params = {}
    return _hash(params)


def _tolerance(paths: Paths) -> float:
    try:
        return float(load_params(paths.root / "params.yaml").get("gate", {}).get("champion_tolerance",
                                                                                  DEFAULT_TOLERANCE))
    except (OSError, TypeError, ValueError, AttributeError):
        return DEFAULT_TOLERANCE


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")  # offline machine: no usage pings
    return env


# ---------------------------------------------------------------------------------------------
# gate and packaging
# ---------------------------------------------------------------------------------------------
def read_gate(paths: Paths) -> dict[str, Any]:
    """The gate decision; PackagingError unless it says passed: true."""
    gate = _read_json(paths.gate)
    if gate is None:
        raise PackagingError(f"{paths.gate} is missing: run the gate first (`dvc repro gate` or `covid-cxr gate`)")
    if not isinstance(gate, dict) or gate.get("passed") is not True:
        reasons = "; ".join(map(str, (gate or {}).get("reasons") or [])) if isinstance(gate, dict) else ""
        raise PackagingError("the model did not pass the evaluation gate, so it is not packaged"
                             + (f": {reasons}" if reasons else ""))
    return gate


def _metrics(paths: Paths, gate: dict[str, Any]) -> dict[str, Any]:
    m = _read_json(paths.eval_dir / "metrics.json") or gate.get("metrics") or {}
    missing = [k for k in KEY_METRICS if not isinstance(m.get(k), (int, float))]
    if missing:
        raise PackagingError(f"evaluation metrics lack {missing} ({paths.eval_dir / 'metrics.json'})")
    return m


def _content_sha(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def save_model(paths: Paths, gate: dict[str, Any], metrics: dict[str, Any]) -> str:
    """artifacts/model (+ metrics, gate, model card) -> the BentoML model store. Returns the tag.

    An identical model (same files, metrics and gate) already in the store is reused.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    from .model_io import load_meta

    src = paths.model_dir
    for f in ("model.safetensors", "model.json"):
        if not (src / f).is_file():
            raise PackagingError(f"{src / f} is missing: run training first (`dvc repro train`)")
    meta = load_meta(src)
    files = [src / f for f in MODEL_FILES if (src / f).is_file()]
    extra = {"metrics.json": metrics, "gate.json": gate}
    card = paths.model_card if paths.model_card.is_file() else None

    h = hashlib.sha256(_content_sha(files).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    content_sha = h.hexdigest()[:16]
    try:
        existing = bentoml.models.list(MODEL_NAME)
    except NotFound:  # no covid_cxr model in this store yet
        existing = []
    for m in existing:
        if m.info.labels.get("content_sha") == content_sha:
            return str(m.tag)

    labels = {
        "data_md5": str(meta.get("data_md5") or "unknown"),
        "git_sha": str(meta.get("git_sha") or _git_sha(paths.root)),
        "params_hash": params_hash(meta, paths.root),
        "gate": "passed",
        "arch": str(meta.get("arch")),
        "image_size": str(meta.get("image_size")),
        "content_sha": content_sha,
    }
    metadata = _clean({
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, dict))},
        "gate": {"passed": True, "reasons": list(gate.get("reasons") or []),
                 "champion": gate.get("champion")},
        "data_md5": meta.get("data_md5"),
        "git_sha": meta.get("git_sha"),
        "packaged_from_git_sha": _git_sha(paths.root),
        "params": meta.get("params"),
        "classes": meta.get("classes"),
        "temperature": meta.get("temperature"),
        "image_size": meta.get("image_size"),
    })
    with bentoml.models.create(MODEL_NAME, labels=labels, metadata=metadata) as bm:
        for f in files:
            shutil.copy2(f, Path(bm.path) / f.name)
        for name, obj in extra.items():
            (Path(bm.path) / name).write_text(json.dumps(obj, indent=2, sort_keys=True))
        if card:
            shutil.copy2(card, Path(bm.path) / "model_card.md")
    return str(bm.tag)


def bentofile(paths: Paths) -> Path:
    f = paths.root / "bentofile.yaml"
    if not f.is_file():  # a project tree without its own (tests): the package's copy
        f = Path(__file__).resolve().parents[2] / "bentofile.yaml"
    return f


def build_bento(paths: Paths, model_tag: str, labels: dict[str, str]) -> str:
    """`bentoml build` (subprocess, offline) of the service pinned to `model_tag`. Returns the tag."""
    src_dir = Path(__file__).resolve().parent.parent  # .../src: the build context holds covid_cxr/
    env = _env()
    env.pop("COVID_CXR_MODEL_DIR", None)   # the Bento must carry a store model, not a directory
    env["COVID_CXR_MODEL"] = model_tag     # read by service.py at import: the model to bundle
    cmd = [sys.executable, "-m", "bentoml", "build", "-f", str(bentofile(paths)), "--output", "tag"]
    for k, v in labels.items():
        cmd += ["--label", f"{k}={v}"]
    cmd.append(str(src_dir))
    r = subprocess.run(cmd, cwd=src_dir, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise PackagingError(f"`bentoml build` failed (exit {r.returncode}):\n{(r.stderr or r.stdout)[-4000:]}")
    for line in reversed(r.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("__tag__:"):
            return line.split(":", 1)[1]
    raise PackagingError(f"`bentoml build` printed no tag:\n{r.stdout[-2000:]}")


def package_model(paths: Paths | None = None) -> dict[str, Any]:
    """Gate check -> model store -> Bento -> artifacts/bento.json. Returns that record.

    The record has at least `bento` and `model` (tags); also `model_path`, `metrics`, `gate`,
    `data_md5`, `git_sha`, `params_hash`, `built_at`. Raises PackagingError, changing nothing,
    if the gate did not pass.
    """
    import bentoml

    paths = paths or Paths()
    gate = read_gate(paths)
    metrics = _metrics(paths, gate)
    model_tag = save_model(paths, gate, metrics)
    stored = bentoml.models.get(model_tag)
    lab = stored.info.labels
    bento_tag = build_bento(paths, model_tag, {
        "model": model_tag.replace(":", "."), "gate": "passed", "data_md5": lab.get("data_md5", "unknown"),
        "git_sha": lab.get("git_sha", "unknown"), "params_hash": lab.get("params_hash", "unknown"),
    })
    rec = {
        "bento": bento_tag,
        "model": model_tag,
        "model_path": str(stored.path),
        "metrics": metrics,
        "gate": {"passed": True, "reasons": list(gate.get("reasons") or [])},
        "data_md5": lab.get("data_md5"),
        "git_sha": lab.get("git_sha"),
        "params_hash": lab.get("params_hash"),
        "built_at": _now(),
    }
    _write_json_atomic(paths.artifacts / "bento.json", rec)
    return rec


# ---------------------------------------------------------------------------------------------
# promotion
# ---------------------------------------------------------------------------------------------
def is_better(new_metrics: dict[str, Any] | None, champion_metrics: dict[str, Any] | None,
              tolerance: float = DEFAULT_TOLERANCE) -> tuple[bool, list[str]]:
    """Should the candidate replace the champion? See the module docstring for the rule."""
    new = new_metrics or {}
    missing = [k for k in KEY_METRICS if not isinstance(new.get(k), (int, float))]
    if missing:
        return False, [f"candidate metrics lack {', '.join(missing)}"]
    if not champion_metrics:
        return True, ["nothing in production yet"]
    champ = champion_metrics
    if any(not isinstance(champ.get(k), (int, float)) for k in KEY_METRICS):
        return True, ["the champion has no comparable key metrics"]
    reasons, worse = [], False
    total = 0.0
    for k in KEY_METRICS:
        d = float(new[k]) - float(champ[k])
        total += d
        verdict = "better" if d > 0 else "equal" if d == 0 else "worse"
        if d < -tolerance:
            worse = True
            verdict = f"worse by more than the {tolerance:g} tolerance"
        reasons.append(f"{k}: {float(new[k]):.4f} vs champion {float(champ[k]):.4f} ({verdict})")
    if worse:
        return False, reasons + ["a key metric dropped too far: the champion stays"]
    if total <= 0:
        return False, reasons + [f"no net improvement (sum of differences {total:+.4f}): the champion stays"]
    return True, reasons + [f"net improvement {total:+.4f} on the key metrics"]


def production(paths: Paths | None = None) -> dict[str, Any] | None:
    """The production record (artifacts/production.json), or None when nothing is in production."""
    paths = paths or Paths()
    rec = _read_json(paths.production)
    return rec if isinstance(rec, dict) and rec.get("bento") else None


def _model_of_bento(bento_tag: str) -> str:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        b = bentoml.get(bento_tag)
    except NotFound:
        raise PackagingError(f"Bento {bento_tag} is not in the store "
                             f"({os.environ.get('BENTOML_HOME', '~/bentoml')})") from None
    models = [m for m in b.info.all_models if m.tag.name == MODEL_NAME] or list(b.info.all_models)
    if not models:
        raise PackagingError(f"Bento {bento_tag} carries no model")
    return str(models[0].tag)


def promote(paths: Paths | None, bento_tag: str, model_tag: str, metrics: dict[str, Any]) -> None:
    """Record `bento_tag` as production. Refuses a model that did not pass the gate.

    This does not compare with the champion: callers decide with `is_better` first
    (the `covid-cxr package` and `covid-cxr promote` commands do).
    """
    import bentoml
    from bentoml.exceptions import NotFound

    paths = paths or Paths()
    try:
        bm = bentoml.models.get(model_tag)
    except NotFound:
        raise PackagingError(f"model {model_tag} is not in the model store") from None
    if bm.info.labels.get("gate") != "passed":
        raise PackagingError(f"model {model_tag} did not pass the evaluation gate; it cannot go to production")
    current = production(paths)
    if current and current.get("bento") == bento_tag:
        return
    history = []
    if current:
        history = [{k: current.get(k) for k in ("bento", "model", "promoted_at")}] + list(current.get("history") or [])
    rec = {
        "bento": bento_tag,
        "model": str(bm.tag),
        "model_path": str(bm.path),
        "metrics": metrics,
        "promoted_at": _now(),
        "history": history[:20],
    }
    _write_json_atomic(paths.production, rec)


def gate_champion_metrics(paths: Paths, champion: dict[str, Any] | None) -> dict[str, Any] | None:
    """The champion's metrics as the gate re-scored them on the candidate's own test split, when
    gate.json names the Bento now in production; else None (use production.json's record)."""
    try:
        gate = _read_json(paths.gate) or {}
    except PackagingError:
        return None
    gc = gate.get("champion") if isinstance(gate, dict) else None
    if champion and isinstance(gc, dict) and gc.get("bento") == champion.get("bento") and gc.get("metrics"):
        return gc["metrics"]
    return None


def maybe_promote(paths: Paths, bento_tag: str, model_tag: str, metrics: dict[str, Any],
                  force: bool = False, champion_metrics: dict[str, Any] | None = None) -> tuple[bool, list[str]]:
    """is_better against the champion, then promote. Returns (promoted, reasons).

    `champion_metrics` (e.g. the gate's re-scoring on the same split) overrides the metrics
    recorded in production.json."""
    champ = production(paths)
    if champ and champ.get("bento") == bento_tag:
        return False, [f"{bento_tag} is already in production"]
    cm = champion_metrics if (champ and champion_metrics) else (champ or {}).get("metrics")
    better, reasons = is_better(metrics, cm, _tolerance(paths))
    if not better and force:
        reasons = reasons + ["--force: promoted anyway (the gate still applies)"]
    if better or force:
        promote(paths, bento_tag, model_tag, metrics)
        return True, reasons
    return False, reasons


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def register(app: typer.Typer, data_app: typer.Typer) -> None:  # noqa: ARG001 - data_app unused
    @app.command("package")
    def package_cmd(
        do_promote: bool = typer.Option(True, "--promote/--no-promote",
                                        help="Promote the new Bento if it beats production."),
    ) -> None:
        """Package the gated model as a Bento (artifacts/bento.json), then maybe promote it."""
        paths = Paths()
        try:
            rec = package_model(paths)
        except PackagingError as e:
            _fail(f"{e}. Nothing was packaged.")
        typer.echo(f"model {rec['model']}  ->  bento {rec['bento']}  (artifacts/bento.json)")
        if not do_promote:
            return
        try:
            champ = production(paths)
            promoted, reasons = maybe_promote(paths, rec["bento"], rec["model"], rec["metrics"],
                                              champion_metrics=gate_champion_metrics(paths, champ))
        except PackagingError as e:
            _fail(str(e))
        for r in reasons:
            typer.echo(f"  {r}")
        typer.echo(f"promoted {rec['bento']} to production" if promoted
                   else f"production unchanged: {(production(paths) or {}).get('bento')}")

    @app.command("promote")
    def promote_cmd(
        bento_tag: str = typer.Argument(..., help="Bento tag, e.g. covid_cxr:abc123"),
        force: bool = typer.Option(False, "--force", help="Skip the champion comparison (never the gate)."),
    ) -> None:
        """Put a built Bento into production (artifacts/production.json), if it beats the champion."""
        import bentoml

        paths = Paths()
        try:
            model_tag = _model_of_bento(bento_tag)
            bm = bentoml.models.get(model_tag)
            metrics = dict(bm.info.metadata.get("metrics") or {})
            stored = Path(bm.path) / "metrics.json"
            if stored.is_file():
                metrics = json.loads(stored.read_text())
            bento_tag = str(bentoml.get(bento_tag).tag)
            promoted, reasons = maybe_promote(paths, bento_tag, model_tag, metrics, force=force)
        except PackagingError as e:
            _fail(str(e))
        for r in reasons:
            typer.echo(f"  {r}")
        if promoted:
            typer.echo(f"promoted {bento_tag} to production")
        elif (production(paths) or {}).get("bento") == bento_tag:
            typer.echo(f"{bento_tag} is already in production")
        else:
            typer.echo(f"not promoted: production stays {(production(paths) or {}).get('bento')}")
            raise typer.Exit(2)
