"""Package-side helpers for the retraining flow (flows/retrain.py).

The flow is a thin Prefect shell; everything it does is here (and in inbox.py, ingest.py,
release/registry.py, runsummary.py), over the same entry points dvc.yaml uses (`dvc`, `covid-cxr ...`)
plus the in-process data checks, `data import` and release functions. No Prefect import here:
these helpers run (and are tested) without a Prefect server.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from covid_cxr.config import Paths
from covid_cxr.jsonio import read_json
from covid_cxr.runner import Log, StepError, run
from covid_cxr.release.promotion import KEY_METRICS


def read_gate(root: Path) -> dict[str, Any]:
    """The gate decision `dvc repro gate` left in artifacts/gate.json."""
    path = Paths(root).gate
    gate = read_json(path)
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        raise StepError(f"{path} is missing or is not a gate decision")
    return gate


def eval_metrics(root: Path | str) -> dict[str, Any]:
    """artifacts/eval/metrics.json (every test metric), or {}."""
    return read_json(Paths(root).eval_dir / "metrics.json") or {}


# ---------------------------------------------------------------------------------------------
# package / promote
# ---------------------------------------------------------------------------------------------
def production(root: Path | str) -> dict[str, Any] | None:
    """The entry in production (registry/production.json), or None."""
    from covid_cxr.release import promotion

    return promotion.production(Paths(root))


def _sha256(path: Path) -> str | None:
    from covid_cxr.hashing import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


def same_as_champion(root: Path | str, metrics: dict[str, Any], champion: dict[str, Any] | None) -> bool:
    """Is the candidate the model already in production (an unchanged pipeline)? Then there is
    nothing to package or promote. Decided on the weights when production's model is in the
    local store (or at a recorded `model_path`), else on identical key test metrics."""
    if not champion:
        return False
    from covid_cxr.release.promotion import store_model_path

    weights = Paths(root).model_dir / "model.safetensors"
    prod_path = champion.get("model_path") or store_model_path(champion.get("model"))
    if prod_path and (Path(prod_path) / "model.safetensors").is_file():
        a, b = _sha256(weights), _sha256(Path(prod_path) / "model.safetensors")
        return a is not None and a == b
    cm = champion.get("metrics")
    if not cm or not metrics:
        return False
    keys = [k for k in KEY_METRICS if k in metrics and k in cm]
    return bool(keys) and all(metrics[k] == cm[k] for k in keys)


def package_bento(root: Path, log: Log | None = None, timeout: float | None = None) -> dict[str, Any]:
    """`covid-cxr package` (builds and registers; never promotes); returns artifacts/bento.json."""
    bento_json = Paths(root).artifacts / "bento.json"
    before = bento_json.stat().st_mtime_ns if bento_json.exists() else None
    run(["covid-cxr", "package"], root, log=log, timeout=timeout)
    rec = read_json(bento_json)
    if rec is None or not rec.get("bento") or bento_json.stat().st_mtime_ns == before:
        raise StepError(f"`covid-cxr package` did not write a Bento record to {bento_json}")
    return rec


def promote_if_better(root: Path | str, bento: str, *, remote: str | None = None, commit: bool = False,
                      log: Log | None = None) -> dict[str, Any]:
    """`covid-cxr promote`'s code (release.promote): the gate label, the champion rule
    (promotion.decide), then export + dvc push of the Bento, the record, and (with `commit`)
    its git commit. Returns {"promoted", "reasons", "production"}."""
    from covid_cxr.release import registry as release

    paths = Paths(root)
    champ = production(root)
    try:
        r = release.promote(paths, bento, remote=remote, commit=commit, log=log)
    except release.PromotionError as e:
        raise StepError(str(e)) from None
    now = production(root)
    if r["promoted"] and (not now or now.get("bento") != bento):
        raise StepError(f"promoting {bento} did not update {paths.production}")
    if not r["promoted"] and now != champ:
        raise StepError(f"{paths.production} changed although {bento} was not promoted")
    return {"promoted": bool(r["promoted"]), "reasons": [str(x) for x in r["reasons"]], "production": now}


# the run summary lives in runsummary.py; re-exported for the flow and its tests
from covid_cxr.orchestrate.runsummary import SUMMARY_METRICS, summary_markdown  # noqa: E402,F401
