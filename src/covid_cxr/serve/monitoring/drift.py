"""The drift tests of `covid-cxr monitor` (monitor.py): the reference sample against the window.

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
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

from covid_cxr.config import CLASSES
from covid_cxr.serve.monitoring.driftsamples import size_bin

TESTS = ("class_mix", "flagged_share", "refer_share", "confidence", "novelty", "input_size", "input_mode",
         "input_format")


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
