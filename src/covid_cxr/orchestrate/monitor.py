"""`covid-cxr monitor`: is the service seeing what the model was tested on?

Compares a window of the prediction log (predlog.py; the file and its rotated siblings) with the
reference: the test split's predictions as the `evaluate` stage writes them
(`artifacts/eval/predictions.csv`), joined on `path` to `artifacts/data/manifest.csv` for the
input size and mode (reference format: the file suffix, PNG for the Kaggle films).

| test            | what                                              | test              | effect size                |
|-----------------|---------------------------------------------------|-------------------|----------------------------|
| `class_mix`     | share of each predicted label                     | chi-square (2xK)  | total variation distance   |
| `flagged_share` | share flagged as unlike the training films        | two-proportion z  | absolute share difference  |
| `refer_share`   | share answered `refer` (any reason)               | two-proportion z  | absolute share difference  |
| `confidence`    | top probability                                   | two-sample KS     | KS statistic D             |
| `novelty`       | novelty score                                     | two-sample KS     | KS statistic D             |
| `input_size`    | longer side binned x shape (square / portrait / landscape) | chi-square | total variation distance |
| `input_mode`    | PIL mode (L, I;16, RGB, ...)                      | chi-square        | total variation distance   |
| `input_format`  | upload format (PNG, JPEG, DICOM, ...)             | chi-square        | total variation distance   |

A test reports drift when its p-value is under alpha / (number of tests run) (Bonferroni:
`monitor.alpha` is the family-wise false-alarm rate) AND its effect is at least
`monitor.min_effect.<test>`, so a huge window does not flag trivia. A test with fewer than
`monitor.min_records` usable values on either side is skipped (novelty, when the model has no
novelty scorer). Every threshold lives in params.yaml `monitor:`; none has a default here.

Exit codes: 0 no drift, 1 drift, 2 too few records to judge (fewer than `monitor.min_records`
in the window or the reference; a missing reference or log is also 2, via the CLI's error path).
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import typer

from covid_cxr.config import CLASSES, Paths, load_params

OK, DRIFT, INSUFFICIENT = "ok", "drift", "insufficient"
EXIT_CODES = {OK: 0, DRIFT: 1, INSUFFICIENT: 2}
TESTS = ("class_mix", "flagged_share", "refer_share", "confidence", "novelty", "input_size", "input_mode",
         "input_format")
LABELS = {"class_mix": "class mix", "flagged_share": "flagged share", "refer_share": "refer share",
          "confidence": "confidence", "novelty": "novelty score", "input_size": "input sizes",
          "input_mode": "input modes", "input_format": "input formats"}
NOVEL_REASON = "outside_training_data"  # verdict.py: the reason a novelty flag gives
_REL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
def settings(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml `monitor:`, checked. Every key is required: thresholds have no defaults in code."""
    m = params.get("monitor")
    if not isinstance(m, dict):
        raise KeyError("params.yaml has no `monitor:` section")
    need = ("window", "min_records", "alpha", "min_effect", "size_bins", "square_tolerance", "cron")
    missing = [k for k in need if k not in m]
    if missing:
        raise KeyError(f"params.yaml monitor: missing {', '.join(missing)}")
    eff = m["min_effect"]
    missing = [t for t in TESTS if t not in eff]
    if missing:
        raise KeyError(f"params.yaml monitor.min_effect: missing {', '.join(missing)}")
    s = {"window": str(m["window"]), "min_records": int(m["min_records"]), "alpha": float(m["alpha"]),
         "min_effect": {t: float(eff[t]) for t in TESTS}, "size_bins": sorted(int(b) for b in m["size_bins"]),
         "square_tolerance": float(m["square_tolerance"]), "cron": str(m["cron"])}
    if not 0 < s["alpha"] < 1 or s["min_records"] < 1:
        raise ValueError("params.yaml monitor: alpha must be in (0, 1) and min_records >= 1")
    return s


# ------------------------------------------------------------------------------------------------
# time
# ------------------------------------------------------------------------------------------------
def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def parse_when(when: str | dt.datetime | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """`7d`, `24h`, `30m`, `2w` (before `now`), or an ISO date / date-time (UTC unless it says)."""
    if when is None or isinstance(when, dt.datetime):
        return when if when is None or when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    now = now or utcnow()
    m = _REL.match(when)
    if m:
        return now - dt.timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        t = dt.datetime.fromisoformat(when.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{when!r}: use an ISO date/time (2024-05-01, 2024-05-01T08:00) "
                                 "or a span before now (30m, 24h, 7d, 2w)") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _rec_time(rec: dict[str, Any]) -> dt.datetime | None:
    t = rec.get("time")
    if not isinstance(t, str):
        return None
    try:
        v = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        return None
    return v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)


# ------------------------------------------------------------------------------------------------
# the two samples: one row per prediction with the same fields
# ------------------------------------------------------------------------------------------------
def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _i(v: Any) -> int | None:
    x = _f(v)
    return int(x) if x is not None and x >= 1 else None


def _row(label, probs: dict[str, float | None], flagged, verdict, novelty, width, height, mode, fmt) -> dict:
    ps = [p for p in (probs or {}).values() if p is not None]
    return {"label": label if label in CLASSES else None, "confidence": max(ps) if ps else None,
            "flagged": flagged, "refer": None if verdict not in ("ok", "refer") else verdict == "refer",
            "novelty": novelty, "width": width, "height": height, "mode": mode or None,
            "format": fmt.upper() if isinstance(fmt, str) and fmt else None}


def window_rows(records: Iterable[dict[str, Any]], since: dt.datetime | None, until: dt.datetime | None
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Log records with since <= time < until, as rows; and what the window holds."""
    rows, first, last, undated = [], None, None, 0
    for rec in records:
        t = _rec_time(rec)
        if t is None:
            undated += 1
            continue
        if (since and t < since) or (until and t >= until):
            continue
        first = t if first is None or t < first else first
        last = t if last is None or t > last else last
        probs = rec.get("probabilities") if isinstance(rec.get("probabilities"), dict) else {}
        fl = rec.get("flagged")
        if not isinstance(fl, bool):
            fl = None if rec.get("verdict") is None else rec.get("reason") == NOVEL_REASON
        rows.append(_row(rec.get("label"), {k: _f(v) for k, v in probs.items()}, fl, rec.get("verdict"),
                         _f(rec.get("novelty")), _i(rec.get("width")), _i(rec.get("height")),
                         rec.get("mode") if isinstance(rec.get("mode"), str) else None,
                         rec.get("format") if isinstance(rec.get("format"), str) else None))
    iso = (lambda t: t.isoformat() if t else None)
    return rows, {"since": iso(since), "until": iso(until), "first": iso(first), "last": iso(last),
                  "n": len(rows), "undated_lines": undated}


def reference_rows(predictions: Path, manifest: Path | None) -> list[dict[str, Any]]:
    """The evaluate stage's test predictions (+ manifest sizes/modes) as rows.

    `flagged`: a `flagged` column if there is one, else reason == outside_training_data (verdict.py's
    novelty reason), else unknown. `novelty`: the `novelty` column (older files: `ood_score`).
    """
    sizes: dict[str, tuple[int | None, int | None, str | None]] = {}
    if manifest is not None and manifest.exists():
        with open(manifest, newline="") as f:
            for r in csv.DictReader(f):
                sizes[r["path"]] = (_i(r.get("width")), _i(r.get("height")), r.get("mode") or None)
    rows = []
    with open(predictions, newline="") as f:
        for r in csv.DictReader(f):
            probs = {c: _f(r.get(f"p_{c}")) for c in CLASSES}
            label = r.get("pred") or None
            if label is None and any(p is not None for p in probs.values()):
                label = max(probs, key=lambda c: -1 if probs[c] is None else probs[c])
            if "flagged" in r:
                fl = str(r["flagged"]).strip().lower() in ("1", "true", "yes")
            elif "reason" in r:
                fl = (r.get("reason") or "") == NOVEL_REASON
            else:
                fl = None
            nov = _f(r.get("novelty")) if "novelty" in r else _f(r.get("ood_score"))
            w, h, mode = sizes.get(r.get("path", ""), (None, None, None))
            suffix = Path(r.get("path") or "").suffix.lstrip(".").upper()
            fmt = {"JPG": "JPEG", "TIF": "TIFF", "DCM": "DICOM"}.get(suffix, suffix) or None
            rows.append(_row(label, probs, fl, r.get("verdict") or None, nov, w, h, mode, fmt))
    return rows


def size_bin(w: int | None, h: int | None, edges: Sequence[int], square_tol: float) -> str | None:
    """'513-1024 portrait': the longer side's bin (edges in px, upper bound inclusive) and the shape."""
    if not w or not h:
        return None
    side, lo, name = max(w, h), 0, None
    for e in edges:
        if side <= e:
            name = f"{lo + 1}-{e}"
            break
        lo = e
    if name is None:
        name = f">{edges[-1]}" if edges else "any"
    r = w / h
    shape = "square" if abs(r - 1) <= square_tol else "landscape" if r > 1 else "portrait"
    return f"{name} {shape}"


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def chi2_mix(ref: Sequence[str], win: Sequence[str], order: Sequence[str] = ()) -> dict[str, Any]:
    """Chi-square on the 2xK table of category counts; effect = total variation distance of the shares."""
    from scipy.stats import chi2_contingency

    cr, cw = Counter(ref), Counter(win)
    cats = [c for c in order if c in cr or c in cw] + sorted((set(cr) | set(cw)) - set(order))
    nr, nw = sum(cr.values()), sum(cw.values())
    share_r = {c: cr[c] / nr for c in cats}
    share_w = {c: cw[c] / nw for c in cats}
    tvd = 0.5 * sum(abs(share_r[c] - share_w[c]) for c in cats)
    if len(cats) < 2:
        stat, p = 0.0, 1.0
    else:
        res = chi2_contingency([[cr[c] for c in cats], [cw[c] for c in cats]], correction=False)
        stat, p = float(res[0]), float(res[1])
    return {"test": "chi-square", "statistic": stat, "p_value": p, "effect": tvd,
            "effect_kind": "total variation distance",
            "counts": {"reference": {c: cr[c] for c in cats}, "window": {c: cw[c] for c in cats}},
            "reference": {c: round(v, 4) for c, v in share_r.items()},
            "window": {c: round(v, 4) for c, v in share_w.items()}}


def two_proportions(ref: Sequence[bool], win: Sequence[bool]) -> dict[str, Any]:
    """Pooled two-proportion z-test (two-sided); effect = |p_window - p_reference|."""
    from scipy.stats import norm

    n1, n2 = len(ref), len(win)
    k1, k2 = sum(ref), sum(win)
    p1, p2 = k1 / n1, k2 / n2
    pool = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    z = 0.0 if se == 0 else (p2 - p1) / se
    p = 1.0 if se == 0 else float(2 * norm.sf(abs(z)))
    return {"test": "two-proportion z", "statistic": z, "p_value": p, "effect": abs(p2 - p1),
            "effect_kind": "absolute difference in share",
            "counts": {"reference": {"flagged": k1, "n": n1}, "window": {"flagged": k2, "n": n2}},
            "reference": round(p1, 4), "window": round(p2, 4)}


def ks(ref: Sequence[float], win: Sequence[float]) -> dict[str, Any]:
    """Two-sample Kolmogorov-Smirnov; effect = the KS statistic D (largest CDF gap, 0..1)."""
    import numpy as np
    from scipy.stats import ks_2samp

    a, b = np.asarray(ref, float), np.asarray(win, float)
    res = ks_2samp(a, b)
    q = lambda x: {k: round(float(v), 4) for k, v in zip(("p10", "median", "p90"), np.quantile(x, [.1, .5, .9]))}
    return {"test": "two-sample KS", "statistic": float(res.statistic), "p_value": float(res.pvalue),
            "effect": float(res.statistic), "effect_kind": "KS statistic D",
            "reference": {"mean": round(float(a.mean()), 4), **q(a)},
            "window": {"mean": round(float(b.mean()), 4), **q(b)}}


def compare(ref: list[dict[str, Any]], win: list[dict[str, Any]], s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every test on the two row lists (see the module docstring); skipped tests say why."""
    edges, tol = s["size_bins"], s["square_tolerance"]

    def vals(rows, key):
        return [r[key] for r in rows if r[key] is not None]

    def sizes(rows):
        return [b for b in (size_bin(r["width"], r["height"], edges, tol) for r in rows) if b is not None]

    samples = {
        "class_mix": (chi2_mix, vals(ref, "label"), vals(win, "label"), {"order": CLASSES}),
        "flagged_share": (two_proportions, vals(ref, "flagged"), vals(win, "flagged"), {}),
        "refer_share": (two_proportions, vals(ref, "refer"), vals(win, "refer"), {}),
        "confidence": (ks, vals(ref, "confidence"), vals(win, "confidence"), {}),
        "novelty": (ks, vals(ref, "novelty"), vals(win, "novelty"), {}),
        "input_size": (chi2_mix, sizes(ref), sizes(win), {}),
        "input_mode": (chi2_mix, vals(ref, "mode"), vals(win, "mode"), {}),
        "input_format": (chi2_mix, vals(ref, "format"), vals(win, "format"), {}),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, (fn, a, b, kw) in samples.items():
        if len(a) < s["min_records"] or len(b) < s["min_records"]:
            out[name] = {"skipped": f"too few values (reference {len(a)}, window {len(b)}; need "
                                    f"{s['min_records']} each)", "n_reference": len(a), "n_window": len(b),
                         "drifted": False}
            continue
        out[name] = {**fn(a, b, **kw), "n_reference": len(a), "n_window": len(b)}
    run = [n for n, t in out.items() if "skipped" not in t]
    alpha_each = s["alpha"] / max(1, len(run))
    for name in run:
        t = out[name]
        t["statistic"], t["p_value"], t["effect"] = _clean(t["statistic"]), _clean(t["p_value"]), _clean(t["effect"])
        t["alpha"], t["min_effect"] = alpha_each, s["min_effect"][name]
        t["drifted"] = bool(t["p_value"] is not None and t["p_value"] < alpha_each
                            and t["effect"] is not None and t["effect"] >= t["min_effect"])
    return out


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


def log_files(log_path: Path | str) -> list[Path]:
    """The log and its rotated files; a `{pid}` in the name matches every process's log."""
    from covid_cxr.serve.predrecord import rotated_paths

    log_path = Path(log_path)
    if "{pid}" not in log_path.name:
        return rotated_paths(log_path)
    bases = sorted(log_path.parent.glob(log_path.name.replace("{pid}", "*"))) if log_path.parent.is_dir() else []
    return [p for b in bases for p in rotated_paths(b)]


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
    from covid_cxr.serve import predlog, predrecord

    paths = Paths(Path(root) if root else None)
    params = params if params is not None else load_params(paths.root / "params.yaml")
    s = settings(params)
    now = now or utcnow()
    log_path = Path(log_path) if log_path else _log_path_from_env(paths.root)
    reference = Path(reference) if reference else paths.eval_dir / "predictions.csv"
    manifest = Path(manifest) if manifest else paths.manifest  # joined on path; absent = no sizes
    if not reference.exists():
        raise FileNotFoundError(f"{reference} does not exist: run `dvc repro evaluate` (or pass --reference)")
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


def _log_path_from_env(root: Path) -> Path:
    import os

    from covid_cxr.serve import predlog

    raw = os.environ.get(predlog.ENV_PATH)
    if raw and raw.strip().lower() not in predlog.OFF_VALUES:
        return Path(raw).expanduser()
    return root / predlog.DEFAULT_RELPATH


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
                                        "or logs/predictions.jsonl); its rotated files are read too"),
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
