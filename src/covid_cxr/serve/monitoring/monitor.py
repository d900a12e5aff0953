"""`covid-cxr monitor`: is the service seeing what the model was tested on?

Compares a window of the prediction log (predlog.py; the file and its rotated siblings) with the
reference: the test split's predictions as the `evaluate` stage writes them
(`artifacts/eval/predictions.csv`), joined on `path` to `artifacts/data/manifest.csv` for the
input size and mode (reference format: the file suffix, PNG for the Kaggle films).

The tests and the drift rule are in drift.py; the two samples are read by driftsamples.py.

Exit codes: 0 no drift, 1 drift, 2 too few records to judge (fewer than `monitor.min_records`
in the window or the reference; a missing reference or log is also 2, via the CLI's error path).
"""
from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import typer

from covid_cxr.config import CLASSES, Paths, load_params
from covid_cxr.serve.monitoring.drift import TESTS, compare
from covid_cxr.serve.monitoring.driftsamples import log_files, parse_when, reference_rows, size_bin, utcnow, window_rows

OK, DRIFT, INSUFFICIENT = "ok", "drift", "insufficient"
EXIT_CODES = {OK: 0, DRIFT: 1, INSUFFICIENT: 2}
LABELS = {"class_mix": "class mix", "flagged_share": "flagged share", "refer_share": "refer share",
          "confidence": "confidence", "novelty": "novelty score", "input_size": "input sizes",
          "input_mode": "input modes", "input_format": "input formats"}


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
def settings(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml `monitor:`, checked. Every key is required: thresholds have no defaults in code."""
    m = params.get("monitor")
    if not isinstance(m, dict):
        raise KeyError("params.yaml has no `monitor:` section")
    need = ("window", "min_records", "alpha", "min_effect", "size_bins", "square_tolerance")
    missing = [k for k in need if k not in m]
    if missing:
        raise KeyError(f"params.yaml monitor: missing {', '.join(missing)}")
    eff = m["min_effect"]
    missing = [t for t in TESTS if t not in eff]
    if missing:
        raise KeyError(f"params.yaml monitor.min_effect: missing {', '.join(missing)}")
    s = {"window": str(m["window"]), "min_records": int(m["min_records"]), "alpha": float(m["alpha"]),
         "min_effect": {t: float(eff[t]) for t in TESTS}, "size_bins": sorted(int(b) for b in m["size_bins"]),
         "square_tolerance": float(m["square_tolerance"])}
    if not 0 < s["alpha"] < 1 or s["min_records"] < 1:
        raise ValueError("params.yaml monitor: alpha must be in (0, 1) and min_records >= 1")
    return s


# ------------------------------------------------------------------------------------------------
# the whole check
# ------------------------------------------------------------------------------------------------
SHORT = {"total variation distance": "TVD", "absolute difference in share": "share diff", "KS statistic D": "KS D"}


def verdict_line(report: dict[str, Any]) -> str:
    """One line: what drifted, by how much; or why nothing can be said."""
    if report["status"] == INSUFFICIENT:
        return report["reason"]
    skipped = [LABELS[n] for n, t in report["tests"].items() if "skipped" in t]
    tail = f"; skipped: {', '.join(skipped)}" if skipped else ""
    if report["status"] == OK:
        return f"no drift in {report['window']['n']} predictions ({len(report['tests_run'])} tests{tail})"
    parts = []
    for name in report["drifted"]:
        t = report["tests"][name]
        p = f"p={t['p_value']:.1e}" if t["p_value"] > 0 else "p<1e-300"
        parts.append(f"{LABELS[name]} ({SHORT[t['effect_kind']]} {t['effect']:.3f}, {p})")
    return f"drift: {'; '.join(parts)} [window of {report['window']['n']}]"


def run_monitor(
    report_path: Path | str,
    *,
    log_path: Path | str | None = None,
    since: str | dt.datetime | None = None,
    until: str | dt.datetime | None = None,
    reference: Path | str | None = None,
    manifest: Path | str | None = None,
    root: Path | str | None = None,
    params: dict[str, Any] | None = None,
    now: dt.datetime | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Run every test, write the JSON report and its page (`<report>.md` + `<report>_img/*.png`)."""
    from covid_cxr.serve.monitoring import predlog, predrecord

    paths = Paths(Path(root) if root else None)
    params = params if params is not None else load_params(paths.root / "params.yaml")
    s = settings(params)
    now = now or utcnow()
    log_path = Path(log_path) if log_path else predlog.configured_path()
    if log_path is None:
        raise FileNotFoundError(f"{predlog.ENV_PATH} switches the prediction log off: pass --log PATH")
    reference = Path(reference) if reference else default_reference(paths)
    manifest = Path(manifest) if manifest else paths.manifest  # joined on path; absent = no sizes
    if not reference.exists():
        raise FileNotFoundError(f"{reference} does not exist: `covid-cxr pull-production` brings the production "
                                "model's, `dvc repro evaluate` the workspace's (or pass --reference)")
    files = log_files(log_path)
    if not files:
        raise FileNotFoundError(f"{log_path} does not exist (no prediction log yet: is the service logging? "
                                f"see {predlog.ENV_PATH})")

    since_t = parse_when(since if since is not None else s["window"], now)
    until_t = parse_when(until, now)
    win, window = window_rows(predrecord.read_files(files), since_t, until_t)
    ref = reference_rows(reference, manifest)

    report: dict[str, Any] = {
        "created": now.isoformat(), "status": None, "verdict": None, "drifted": [], "tests_run": [],
        "window": window,
        "log": {"path": str(log_path), "files": [str(p) for p in files]},
        "reference": {"path": str(reference), "manifest": str(manifest) if manifest.exists() else None, "n": len(ref)},
        "settings": {k: s[k] for k in ("min_records", "alpha", "min_effect", "size_bins", "square_tolerance")},
        "tests": {},
    }
    if len(win) < s["min_records"] or len(ref) < s["min_records"]:
        report["status"] = INSUFFICIENT
        report["reason"] = (f"too few records to judge: {len(win)} in the window, {len(ref)} in the reference "
                            f"(need {s['min_records']} each, params.yaml monitor.min_records)")
    else:
        tests = compare(ref, win, s)
        report["tests"] = tests
        report["tests_run"] = [n for n, t in tests.items() if "skipped" not in t]
        report["drifted"] = [n for n in report["tests_run"] if tests[n]["drifted"]]
        report["status"] = DRIFT if report["drifted"] else OK
    report["verdict"] = verdict_line(report)

    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    page = report_path.with_suffix(".md")
    report["page"], report["report"] = str(page), str(report_path)
    imgs = _plots(ref, win, report, report_path.parent / f"{report_path.stem}_img", s) if plots else {}
    page.write_text(page_markdown(report, {k: Path(v).relative_to(page.parent).as_posix() for k, v in imgs.items()}))
    report_path.write_text(json.dumps(report, indent=2))
    return report


def default_reference(paths: Paths) -> Path:
    """What the served films are compared with: the production model's own test-split answers, packaged
    with it (`reference.csv` in the local BentoML store, where `covid-cxr pull-production` puts it);
    without one, the workspace's (artifacts/eval/predictions.csv)."""
    from covid_cxr.release.package import REFERENCE
    from covid_cxr.release.promotion import PromotionError, production, store_model_path

    try:
        rec = production(paths)
    except PromotionError:
        rec = None
    stored = store_model_path(rec.get("model")) if rec else None
    if stored is not None and (stored / REFERENCE).is_file():
        return stored / REFERENCE
    return paths.eval_dir / "predictions.csv"


# ------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.2e}" if 0 < abs(x) < 1e-3 else f"{x:.4f}"
    return str(x)


def _shares(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return _fmt(v)


def summary_table(report: dict[str, Any]) -> list[str]:
    lines = ["| test | drifted | statistic | p-value | effect | min effect | n ref / window | reference | window |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in TESTS:
        t = report["tests"].get(name)
        if t is None:
            continue
        if "skipped" in t:
            lines.append(f"| {LABELS[name]} | skipped | – | – | – | – | {t['n_reference']} / {t['n_window']} | "
                         f"{t['skipped']} | |")
            continue
        mark = "**DRIFT**" if t["drifted"] else "no"
        lines.append(f"| {LABELS[name]} ({t['test']}) | {mark} | {_fmt(t['statistic'])} | {_fmt(t['p_value'])} | "
                     f"{_fmt(t['effect'])} ({t['effect_kind']}) | {_fmt(t['min_effect'])} | "
                     f"{t['n_reference']} / {t['n_window']} | {_shares(t['reference'])} | {_shares(t['window'])} |")
    return lines


def page_markdown(report: dict[str, Any], images: dict[str, str] | None = None) -> str:
    w = report["window"]
    head = {DRIFT: "DRIFT", OK: "no drift", INSUFFICIENT: "too few records to judge"}[report["status"]]
    lines = [f"# Prediction drift: {head}", "", f"**{report['verdict']}**", "",
             f"- window: {w['since'] or 'start'} to {w['until'] or 'now'} "
             f"({w['n']} predictions; first {w['first'] or '–'}, last {w['last'] or '–'})",
             f"- reference: `{report['reference']['path']}` ({report['reference']['n']} test-split predictions)",
             f"- log: {', '.join(f'`{p}`' for p in report['log']['files'])}",
             f"- alpha {report['settings']['alpha']} family-wise (Bonferroni over the tests run); "
             f"min records {report['settings']['min_records']}", ""]
    if report["tests"]:
        lines += ["## Tests", "", *summary_table(report), ""]
    if images:
        lines += ["## Plots", ""]
        lines += [f"![{k}]({v})" for k, v in images.items()]
        lines.append("")
    return "\n".join(lines)


def artifact_markdown(report: dict[str, Any]) -> str:
    """The page for a Prefect markdown artifact: the same text, the plots named by path (the UI
    cannot show local files)."""
    lines = [page_markdown(report).rstrip(), "",
             f"Report: `{report.get('report', '')}`; page with plots: `{report.get('page', '')}`", ""]
    return "\n".join(lines)


def _plots(ref, win, report, out: Path, s) -> dict[str, str]:
    if report["status"] == INSUFFICIENT and not win:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    def finish(fig, ax, key: str, title: str) -> None:
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / f"{key}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        files[key] = str(p)

    def bars(key: str, cats_ref: list, cats_win: list, order: Sequence[str], title: str) -> None:
        cr, cw = Counter(cats_ref), Counter(cats_win)
        cats = [c for c in order if c in cr or c in cw] + sorted((set(cr) | set(cw)) - set(order))
        if not cats:
            return
        x = np.arange(len(cats))
        fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(cats) + 2), 3.2))
        ax.bar(x - 0.2, [cr[c] / max(1, len(cats_ref)) for c in cats], 0.4, label=f"reference (n={len(cats_ref)})")
        ax.bar(x + 0.2, [cw[c] / max(1, len(cats_win)) for c in cats], 0.4, label=f"window (n={len(cats_win)})")
        ax.set_xticks(x, cats, rotation=20 if len(cats) > 3 else 0)
        ax.set_ylabel("share")
        finish(fig, ax, key, title)

    def hist(key: str, a: list, b: list, title: str, rng: tuple[float, float] | None = None) -> None:
        if not a and not b:
            return
        allv = np.asarray(a + b, float)
        rng = rng or (float(allv.min()), float(allv.max()) if allv.max() > allv.min() else float(allv.min()) + 1)
        bins = np.linspace(*rng, 31)
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        if a:
            ax.hist(a, bins=bins, density=True, alpha=0.5, label=f"reference (n={len(a)})")
        if b:
            ax.hist(b, bins=bins, density=True, alpha=0.5, label=f"window (n={len(b)})")
        ax.set_ylabel("density")
        finish(fig, ax, key, title)

    v = lambda rows, k: [r[k] for r in rows if r[k] is not None]
    bars("class_mix", v(ref, "label"), v(win, "label"), CLASSES, "predicted class mix")
    hist("confidence", v(ref, "confidence"), v(win, "confidence"), "confidence (top probability)", (0.0, 1.0))
    hist("novelty", v(ref, "novelty"), v(win, "novelty"), "novelty score")
    sb = lambda rows: [b for b in (size_bin(r["width"], r["height"], s["size_bins"], s["square_tolerance"])
                                   for r in rows) if b]
    bars("input_size", sb(ref), sb(win), (), "input size (longer side, shape)")
    bars("input_mode", v(ref, "mode"), v(win, "mode"), (), "input mode")
    return files


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def register(app: typer.Typer, data_app: typer.Typer) -> None:
    @app.command("monitor")
    def monitor_cmd(
        report: Path = typer.Option(..., "--report", help="JSON report to write (the page goes beside it: .md + _img/)"),
        log: Path | None = typer.Option(None, "--log", help="prediction log (default: $COVID_CXR_PREDICTION_LOG "
                                        "or ~/.local/state/covid-cxr/predictions.jsonl, where the service "
                                        "writes it); its rotated files are read too"),
        since: str | None = typer.Option(None, "--since", help="window start: ISO date/time or 30m/24h/7d/2w "
                                         "before now (default: params.yaml monitor.window)"),
        until: str | None = typer.Option(None, "--until", help="window end (default: now)"),
        reference: Path | None = typer.Option(None, "--reference", help="reference predictions CSV "
                                              "(default: artifacts/eval/predictions.csv)"),
        manifest: Path | None = typer.Option(None, "--manifest", help="manifest for the reference's sizes/modes "
                                             "(default: artifacts/data/manifest.csv)"),
    ) -> None:
        """Drift check: a window of the prediction log vs the test split. Exit 0 no drift, 1 drift, 2 too few records."""
        rep = run_monitor(report, log_path=log, since=since, until=until, reference=reference, manifest=manifest)
        colour = {OK: typer.colors.GREEN, DRIFT: typer.colors.RED, INSUFFICIENT: typer.colors.YELLOW}[rep["status"]]
        typer.secho(f"{'✔' if rep['status'] == OK else '✘' if rep['status'] == DRIFT else '?'} {rep['verdict']}",
                    fg=colour)
        typer.echo(f"report: {report}  page: {rep['page']}")
        raise typer.Exit(EXIT_CODES[rep["status"]])
