"""Stage `gate`: may this model ship? Absolute thresholds + no regression against the champion.

`covid-cxr gate` always writes artifacts/gate.json (a DVC metric: `dvc exp show` lists
`passed` per experiment) and exits 0 whatever the verdict, so that `dvc repro` / `dvc exp run`
record a failed gate instead of dying on it; `package` then refuses to build. `--strict` exits 1
on a failed gate (CI, or a person who wants the non-zero status). The champion comparison is
promotion.regressions: the same check the promotion rule applies.
"""
from __future__ import annotations

import json
from typing import Any

import typer

from covid_cxr.config import Paths, load_params
from covid_cxr.jsonio import write_json_atomic
from covid_cxr.release.promotion import KEY_METRICS, champion_tolerance, production, regressions, store_model_path

# (metric, direction, params key): "min" means higher is better.
THRESHOLDS = (
    ("accuracy", "min", "min_accuracy"),
    ("macro_f1", "min", "min_macro_f1"),
    ("covid_recall", "min", "min_covid_recall"),
    ("ece_after", "max", "max_ece"),
    ("flagged", "max", "max_flagged"),   # share of test films referred, for any reason
    ("silent_covid_miss", "max", "max_silent_covid_miss"),   # COVID films answered non-COVID with verdict ok
)


def _external_checks(external: dict[str, Any] | None, limits: dict[str, dict[str, float]]
                     ) -> tuple[list[dict[str, Any]], list[str]]:
    """`gate.external`: {group: {min_<figure> | max_<figure>: threshold}} against external.json's groups."""
    checks, reasons = [], []
    groups = (external or {}).get("groups") or {}
    for group, rules in limits.items():
        for key, t in rules.items():
            direction, _, figure = key.partition("_")
            if direction not in ("min", "max"):
                raise ValueError(f"gate.external.{group}.{key}: keys are min_<figure> or max_<figure>")
            v = groups.get(group, {}).get(figure)
            ok = v is not None and (v >= t if direction == "min" else v <= t)
            op = ">=" if direction == "min" else "<="
            checks.append({"check": f"external {group} {figure} {op} {t}", "value": v, "ok": ok})
            if not ok:
                why = "is missing (run the `external` stage)" if v is None else (
                    f"= {v:.4f} is {'below' if direction == 'min' else 'above'} the threshold {t}")
                reasons.append(f"external {group} {figure} {why}")
    return checks, reasons


def decide(metrics: dict[str, Any], gate_params: dict[str, Any],
           champion: dict[str, Any] | None = None, external: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pure decision: every failed check becomes a human-readable reason."""
    checks, reasons = _external_checks(external, gate_params.get("external") or {})
    for name, direction, key in THRESHOLDS:
        if key not in gate_params:
            continue
        v, t = metrics.get(name), float(gate_params[key])
        ok = v is not None and (v >= t if direction == "min" else v <= t)
        checks.append({"check": f"{name} {'>=' if direction == 'min' else '<='} {t}", "value": v, "ok": ok})
        if not ok:
            reasons.append(f"{name} = {v if v is None else round(v, 4)} is {'below' if direction == 'min' else 'above'} "
                           f"the threshold {t}")
    if champion and champion.get("metrics"):
        tol = champion_tolerance(params={"gate": gate_params})
        for r in regressions(metrics, champion["metrics"], tol):
            name, v, c = r["name"], r["value"], r["champion"]
            checks.append({"check": f"{name} >= champion {c:.4f} - {tol}", "value": v, "ok": r["ok"]})
            if not r["ok"]:
                reasons.append(f"{name} = {v:.4f} regresses more than {tol} below the champion "
                               f"({champion.get('bento', 'production')}: {c:.4f})")
    return {"passed": not reasons, "reasons": reasons, "checks": checks}


def champion_on_split(paths: Paths, n_bins: int) -> dict[str, Any] | None:
    """Re-score the production model on *this* test split (so both models see the same images)."""
    prod = production(paths)
    if prod is None:
        return None
    model_path = store_model_path(prod.get("model"))
    if model_path is None or not (model_path / "model.json").exists():
        typer.secho(f"! champion {prod.get('bento')}: model {prod.get('model')} is not in the local BentoML "
                    "store (`covid-cxr pull-production` brings it); using its recorded metrics",
                    fg=typer.colors.YELLOW)
        return {"bento": prod.get("bento"), "metrics": prod.get("metrics", {}), "rescored": False}
    from covid_cxr.evaluation.evaluate import predict_split, score

    m = score(predict_split(model_path, paths, "test"), n_bins)
    return {"bento": prod.get("bento"), "metrics": {k: m[k] for k in (*KEY_METRICS, "ece_after")}, "rescored": True}


def gate(paths: Paths | None = None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    paths = paths or Paths()
    params = params if params is not None else load_params(paths.root / "params.yaml")
    metrics_file = paths.eval_dir / "metrics.json"
    if not metrics_file.exists():
        raise FileNotFoundError(f"{metrics_file} is missing: run `covid-cxr evaluate` first")
    metrics = json.loads(metrics_file.read_text())
    ext_file = paths.eval_dir / "external.json"
    external = json.loads(ext_file.read_text()) if ext_file.exists() else None
    champion = champion_on_split(paths, int(params["evaluate"]["ece_bins"]))
    result = decide(metrics, params["gate"], champion, external)
    result.update({
        "metrics": {k: metrics.get(k) for k in (*KEY_METRICS, "covid_specificity", "ece_after", "ece_before",
                                                "flagged")},
        "external": (external or {}).get("groups"),
        "champion": champion,
    })
    paths.gate.parent.mkdir(parents=True, exist_ok=True)
    paths.gate.write_text(json.dumps(result, indent=2))
    write_json_atomic(paths.headline, headline(metrics, external, result))
    return result


# The one DVC metrics file (`dvc metrics show`, `dvc exp show`): the figures a run is judged by, one
# row that fits a terminal. Detail stays in eval/metrics.json, eval/external.json and gate.json.
HEADLINE = (  # column -> where it comes from: (file, key path)
    ("accuracy", ("metrics", "accuracy")),
    ("macro_f1", ("metrics", "macro_f1")),
    ("covid_recall", ("metrics", "covid_recall")),
    ("ece", ("metrics", "ece_after")),
    ("referred", ("metrics", "flagged")),
    ("covid_miss", ("metrics", "silent_covid_miss")),
    ("unseen_cw", ("external", "unseen_hospital_normal", "confident_wrong")),
    ("tb_cw", ("external", "tuberculosis", "confident_wrong")),
    ("other_right", ("external", "other_normal", "right")),
)


def headline(metrics: dict[str, Any], external: dict[str, Any] | None, result: dict[str, Any]) -> dict[str, Any]:
    """artifacts/metrics.json: HEADLINE's figures (4 decimals; null when not measured) and `passed`."""
    src = {"metrics": metrics, "external": (external or {}).get("groups") or {}}
    out: dict[str, Any] = {}
    for name, (where, *keys) in HEADLINE:
        v: Any = src[where]
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        out[name] = None if v is None else round(float(v), 4)
    negs = [v["refused_or_referred"] for k, v in src["external"].items() if k.startswith("negatives/")]
    out["negatives"] = round(min(negs), 4) if negs else None      # the worst kind's refused-or-referred share
    out["passed"] = bool(result["passed"])
    return out


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    @app.command("gate")
    def gate_cmd(
        strict: bool = typer.Option(False, "--strict", help="Exit 1 when the gate fails (default: exit 0, "
                                    "the verdict is in artifacts/gate.json)."),
    ) -> None:
        """Decide whether artifacts/model may ship; writes artifacts/gate.json (a DVC metric)."""
        r = gate()
        for c in r["checks"]:
            typer.echo(f"  {'✔' if c['ok'] else '✘'} {c['check']}  (value {c['value']})")
        if r["passed"]:
            typer.secho("✔ gate PASSED", fg=typer.colors.GREEN)
            return
        typer.secho("✘ gate FAILED — `covid-cxr package` will refuse this model:\n  - " + "\n  - ".join(r["reasons"]),
                    fg=typer.colors.RED, err=True)
        if strict:
            raise typer.Exit(1)
