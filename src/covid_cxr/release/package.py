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

from covid_cxr.console import fail
from covid_cxr.config import Paths, load_params
from covid_cxr.jsonio import write_json_atomic
from covid_cxr.provenance import git_sha, params_hash
from covid_cxr.release.promotion import KEY_METRICS, RECORDED_METRICS

MODEL_NAME = "covid_cxr"
REFERENCE = "reference.csv"    # in a stored model: its test-split answers (evaluate's predictions.csv), for `monitor`


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


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def save_model(paths: Paths, gate: dict[str, Any], metrics: dict[str, Any]) -> str:
    """artifacts/model (+ metrics, gate, model card) -> the BentoML model store. Returns the tag.

    The tag's version is a digest of everything stored (the model's files, metrics, gate, card), so
    the same model packaged twice is the same tag, and it is reused when the store has it.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    from covid_cxr.model.checkpoint import load_meta
    from covid_cxr.model.modelmeta import FILES, model_id

    src = paths.model_dir
    for f in ("model.safetensors", "model.json"):
        if not (src / f).is_file():
            raise PackagingError(f"{src / f} is missing: run training first (`dvc repro train`)")
    meta = load_meta(src)
    files = [src / f for f in FILES if (src / f).is_file()]
    extra = {"metrics.json": metrics, "gate.json": gate}
    card = paths.model_card.read_bytes() if paths.model_card.is_file() else b""
    ref_file = paths.eval_dir / "predictions.csv"     # the test split's answers: what monitoring compares with
    reference = ref_file.read_bytes() if ref_file.is_file() else b""
    tag = f"{MODEL_NAME}:{_digest(model_id(src).encode(), *(_json(v) for v in extra.values()), card, reference)}"
    try:
        return str(bentoml.models.get(tag).tag)
    except NotFound:
        pass

    labels = {
        "data_md5": str(meta.get("data_md5") or "unknown"),
        "git_sha": _git_sha(paths.root),          # provenance for people; not part of the tag
        "params_hash": _params_hash(meta, paths.root),
        "gate": "passed",
        "arch": str(meta.get("arch")),
        "image_size": str(meta.get("image_size")),
    }
    metadata = _clean({
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, dict))},
        "gate": {"passed": True, "reasons": list(gate.get("reasons") or []),
                 "champion": gate.get("champion")},
        "data_md5": meta.get("data_md5"),
        "params": meta.get("params"),
        "classes": meta.get("classes"),
        "temperature": meta.get("temperature"),
        "class_bias": meta.get("class_bias"),
        "image_size": meta.get("image_size"),
    })
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as bm:
        for f in files:
            shutil.copy2(f, Path(bm.path) / f.name)
        for name, obj in extra.items():
            (Path(bm.path) / name).write_bytes(_json(obj))
        if card:
            (Path(bm.path) / "model_card.md").write_bytes(card)
        if reference:
            (Path(bm.path) / REFERENCE).write_bytes(reference)
    return str(bm.tag)


def bentofile(paths: Paths) -> Path:
    f = paths.root / "bentofile.yaml"
    if not f.is_file():  # a project tree without its own (tests): the package's copy
        f = Path(__file__).resolve().parents[3] / "bentofile.yaml"
    return f


def service_sources(src_dir: Path) -> list[Path]:
    """What a Bento's code is: every file bentofile.yaml includes from the build context."""
    pkg = src_dir / "covid_cxr"
    return sorted(p for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and (p.suffix == ".py" or p.parent.name == "web"))


def bento_version(paths: Paths, model_tag: str, args: list[str]) -> str:
    """A digest of what a Bento is built from: the model, its settings, bentofile.yaml and the service's code."""
    src_dir = Path(__file__).resolve().parents[2]
    code = [p.relative_to(src_dir).as_posix().encode() + b"\0" + p.read_bytes() for p in service_sources(src_dir)]
    return _digest(model_tag.encode(), " ".join(args).encode(), bentofile(paths).read_bytes(), *code)


def build_bento(paths: Paths, model_tag: str, labels: dict[str, str]) -> str:
    """`bentoml build` (subprocess, offline) of the service pinned to `model_tag`, with params.yaml
    `serve:` (the Bento's arguments: bentoargs.py), at a content-derived version. Returns the tag; a
    Bento of that tag already in the store is reused."""
    import bentoml
    from bentoml.exceptions import NotFound

    from covid_cxr.release.bentoargs import bento_args

    args = ["--arg", f"model={model_tag}", *bento_args(load_params(paths.root / "params.yaml"))]
    version = bento_version(paths, model_tag, args)
    try:
        return str(bentoml.get(f"{MODEL_NAME}:{version}").tag)
    except NotFound:
        pass
    src_dir = Path(__file__).resolve().parents[2]  # .../src: the build context holds covid_cxr/
    cmd = [sys.executable, "-m", "bentoml", "build", "-f", str(bentofile(paths)), "--version", version,
           *args, "--output", "tag"]
    for k, v in labels.items():
        cmd += ["--label", f"{k}={v}"]
    cmd.append(str(src_dir))
    r = subprocess.run(cmd, cwd=src_dir, env=_env(), capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise PackagingError(f"`bentoml build` failed (exit {r.returncode}):\n{(r.stderr or r.stdout)[-4000:]}")
    for line in reversed(r.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("__tag__:"):
            return line.split(":", 1)[1]
    raise PackagingError(f"`bentoml build` printed no tag:\n{r.stdout[-2000:]}")


def package_model(paths: Paths | None = None) -> dict[str, Any]:
    """Gate check -> model store -> Bento -> artifacts/bento.json. Returns that record.

    The record (a DVC output: a pure function of its inputs) has `packaged`, `bento` and `model`
    (tags), `metrics`, `gate`, `data_md5` and `params_hash`. Raises PackagingError, changing
    nothing, if the gate did not pass.
    """
    import bentoml

    paths = paths or Paths()
    gate = read_gate(paths)
    metrics = _metrics(paths, gate)
    model_tag = save_model(paths, gate, metrics)
    lab = bentoml.models.get(model_tag).info.labels
    bento_tag = build_bento(paths, model_tag, {
        "model": model_tag.replace(":", "."), "gate": "passed", "data_md5": lab.get("data_md5", "unknown"),
        "git_sha": _git_sha(paths.root), "params_hash": lab.get("params_hash", "unknown"),
    })
    rec = {
        "packaged": True,
        "bento": bento_tag,
        "model": model_tag,
        "metrics": {k: metrics[k] for k in RECORDED_METRICS if k in metrics},
        "gate": {"passed": True, "reasons": list(gate.get("reasons") or [])},
        "data_md5": lab.get("data_md5"),
        "params_hash": lab.get("params_hash"),
    }
    write_json_atomic(paths.artifacts / "bento.json", rec)
    return rec


def refusal(paths: Paths, err: PackagingError) -> dict[str, Any]:
    """artifacts/bento.json when the gate refused the model: no Bento, the reasons."""
    gate = _read_json(paths.gate)
    rec = {"packaged": False, "bento": None, "model": None, "reason": str(err),
           "gate": {"passed": False, "reasons": list((gate or {}).get("reasons") or [])}}
    write_json_atomic(paths.artifacts / "bento.json", rec)
    return rec


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
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
            fail(f"{e}. Nothing was packaged.")
        typer.echo(f"model {rec['model']}  ->  bento {rec['bento']}  (artifacts/bento.json)")
        typer.echo(f"production unchanged; to put it there: covid-cxr promote {rec['bento']}")
