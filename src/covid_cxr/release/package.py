"""Packaging: the last pipeline step (dvc stage `package`). It builds and registers; it never
promotes (promotion is a decision: `covid-cxr promote`, release/registry.py + promotion.py).

    covid-cxr package [--if-passed]     gate check -> model store -> bentoml build -> bento.json

Packaging refuses (exit 1, nothing built) unless artifacts/gate.json says `passed: true`; with
`--if-passed` (dvc.yaml) it records the refusal in artifacts/bento.json (`packaged: false`, the
reasons) and exits 0, so `dvc repro` / `dvc exp run` complete and keep the failed gate's metrics.
It saves artifacts/model/ (plus the evaluation metrics, the gate decision and the model card)
into the BentoML model store as `covid_cxr:<version>`, labelled with data md5, git sha,
params hash and gate result; builds a Bento from bentofile.yaml that pins exactly that model
version; and writes artifacts/bento.json. `BENTOML_HOME` chooses the store.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from covid_cxr.config import Paths, load_params
from covid_cxr.jsonio import write_json_atomic
from covid_cxr.provenance import git_sha, params_hash
from covid_cxr.release.promotion import KEY_METRICS
from covid_cxr.release.promotion import now as _now

MODEL_NAME = "covid_cxr"


class PackagingError(RuntimeError):
    """Packaging refused; the message says why. Nothing was built."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _read_json(p: Path) -> Any:
    """Strict, unlike jsonio.read_json: a broken gate or metrics file stops packaging with its reason."""
    try:
        return json.loads(Path(p).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise PackagingError(f"{p} is not valid JSON: {e}") from None


def _clean(obj: Any) -> Any:
    """JSON-ish -> what BentoML accepts as model metadata (no None anywhere)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj if v is not None]
    return obj


def _git_sha(root: Path) -> str:
    return git_sha(root) or "unknown"


def _params_hash(meta: dict[str, Any], root: Path) -> str:
    """The params hash the train stage recorded in model.json; for an older model.json without
    one, the same hash over today's params."""
    if meta.get("params_hash"):
        return str(meta["params_hash"])
    try:
        p = load_params(root / "params.yaml")
        params = {k: p.get(k) for k in ("train", "evaluate", "gate")}
    except OSError:
        params = {}
    return params_hash(params)


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

    from covid_cxr.model.checkpoint import FILES, load_meta

    src = paths.model_dir
    for f in ("model.safetensors", "model.json"):
        if not (src / f).is_file():
            raise PackagingError(f"{src / f} is missing: run training first (`dvc repro train`)")
    meta = load_meta(src)
    files = [src / f for f in FILES if (src / f).is_file()]
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
        "params_hash": _params_hash(meta, paths.root),
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
        "class_bias": meta.get("class_bias"),
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
        f = Path(__file__).resolve().parents[3] / "bentofile.yaml"
    return f


def build_bento(paths: Paths, model_tag: str, labels: dict[str, str]) -> str:
    """`bentoml build` (subprocess, offline) of the service pinned to `model_tag`. Returns the tag."""
    src_dir = Path(__file__).resolve().parents[2]  # .../src: the build context holds covid_cxr/
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
        "packaged": True,
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
    write_json_atomic(paths.artifacts / "bento.json", rec)
    return rec


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def refusal(paths: Paths, err: PackagingError) -> dict[str, Any]:
    """artifacts/bento.json when the gate refused the model: no Bento, the reasons."""
    gate = _read_json(paths.gate)
    rec = {"packaged": False, "bento": None, "model": None, "reason": str(err),
           "gate": {"passed": False, "reasons": list((gate or {}).get("reasons") or [])}, "built_at": _now()}
    write_json_atomic(paths.artifacts / "bento.json", rec)
    return rec


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def register(app: typer.Typer, data_app: typer.Typer) -> None:  # noqa: ARG001 - data_app unused
    @app.command("package")
    def package_cmd(
        if_passed: bool = typer.Option(
            False, "--if-passed",
            help="On a failed gate, record the refusal in artifacts/bento.json and exit 0 (the dvc stage "
                 "uses this, so that `dvc exp run` keeps an experiment whose gate failed)."),
    ) -> None:
        """Build the gated model into a Bento and register it (artifacts/bento.json). Never promotes:
        that is `covid-cxr promote`."""
        paths = Paths()
        try:
            rec = package_model(paths)
        except PackagingError as e:
            try:
                gate_failed = (_read_json(paths.gate) or {}).get("passed") is False
            except PackagingError:
                gate_failed = False
            if if_passed and gate_failed:
                refusal(paths, e)
                typer.secho(f"not packaged: {e}. Recorded in artifacts/bento.json; production unchanged.",
                            fg=typer.colors.RED, err=True)
                return
            _fail(f"{e}. Nothing was packaged.")
        typer.echo(f"model {rec['model']}  ->  bento {rec['bento']}  (artifacts/bento.json)")
        typer.echo(f"production unchanged; to put it there: covid-cxr promote {rec['bento']}")
