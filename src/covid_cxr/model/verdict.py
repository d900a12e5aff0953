""""I don't know" as a first-class answer: `ok`, or `refer` with a reason.

One rule for every output of the project (API, page, batch scoring, the external stage,
the test-split figures and the gate):

| reason                  | when                                                              |
|-------------------------|-------------------------------------------------------------------|
| `not_an_xray`           | the upload fails the same colour / blank rules as `data check`    |
| `not_a_chest_film`      | the input gate (model/inputgate.py) does not see a chest film     |
| `outside_training_data` | its novelty score (model/novelty.py) is over the threshold        |
| `low_confidence`        | its calibrated top probability is under `min_confidence`          |
| `covid_not_excluded`    | the answer is not COVID, but P(COVID) is over the triage level    |

The first that applies is the reason. `label` stays the most probable class either way;
a refer verdict says that label must not be taken as the answer. Every threshold is fitted
on the validation split when the model is trained (train.py) and travels in model.json.

The triage level (`fit_triage`) is the operating point of a triage aid: a COVID film answered
Normal or Viral Pneumonia with verdict ok is cleared silently, and params.yaml `verdict.triage.
miss_cost` says what that costs against one referral; the level minimises that cost on valid,
within the referral budget `verdict.triage.max_referred` (all reasons together).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

OK, REFER = "ok", "refer"
REASONS = {
    "not_an_xray": "this picture does not look like a chest X-ray",
    "not_a_chest_film": "this image does not look like a frontal chest radiograph",
    "outside_training_data": "this film is unlike the films the model was trained on",
    "low_confidence": "the model is not confident about this film",
    "covid_not_excluded": "COVID is not excluded: the model gives it a probability over the triage level",
}
COVID = 0   # config.CLASSES[0]


@dataclass(frozen=True)
class Policy:
    """The model's refer levels (model.json `verdict`; the novelty threshold is the novelty model's
    own, `ood.threshold`, and the input gate's its own, `input_gate.threshold`)."""

    min_confidence: float
    covid_triage: float | None     # refer a non-COVID answer whose P(COVID) is over this; None: no triage

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Policy":
        v = meta["verdict"]
        return cls(min_confidence=float(v["min_confidence"]),
                   covid_triage=None if v["covid_triage"] is None else float(v["covid_triage"]))


def decide(probs: np.ndarray, novel: np.ndarray | None, policy: Policy,
           not_xray: Sequence[str | None] | None = None,
           not_chest: np.ndarray | None = None) -> tuple[list[str], list[str | None]]:
    """Per row: (verdict, reason). `not_xray[i]` is a data-check rule code, or None; `not_chest[i]`
    the input gate's flag."""
    probs = np.asarray(probs)
    conf = probs.max(axis=1)
    label = probs.argmax(axis=1)
    verdicts, reasons = [], []
    for i in range(len(probs)):
        if not_xray is not None and not_xray[i]:
            reason = "not_an_xray"
        elif not_chest is not None and bool(not_chest[i]):
            reason = "not_a_chest_film"
        elif novel is not None and bool(novel[i]):
            reason = "outside_training_data"
        elif conf[i] < policy.min_confidence:
            reason = "low_confidence"
        elif policy.covid_triage is not None and label[i] != COVID and probs[i, COVID] > policy.covid_triage:
            reason = "covid_not_excluded"
        else:
            reason = None
        verdicts.append(OK if reason is None else REFER)
        reasons.append(reason)
    return verdicts, reasons


def fit_min_confidence(valid_probs: np.ndarray, quantile: float) -> float:
    """The confidence under which the least confident `quantile` share of valid films fall."""
    return float(np.quantile(np.asarray(valid_probs).max(axis=1), quantile))


def triage_curve(probs: np.ndarray, labels: np.ndarray, referred: np.ndarray) -> list[dict[str, float]]:
    """Every triage level worth trying on these films -> its referral and silent COVID misses.

    `referred`: the films another reason already refers. At level t, a film answered non-COVID and
    not referred otherwise is referred when P(COVID) > t; a COVID film answered non-COVID, not
    referred, with P(COVID) <= t is a silent miss. Rows: level, referred (share of all films, any
    reason), silent_miss (share of the COVID films), extra (films the level refers), misses (films)."""
    probs, labels, referred = np.asarray(probs), np.asarray(labels), np.asarray(referred, bool)
    p = probs[:, COVID]
    open_ = (probs.argmax(1) != COVID) & ~referred          # answered non-COVID, nothing refers it yet
    covid = labels == COVID
    levels = np.unique(np.concatenate([[1.0], p[open_]]))
    rows = []
    for t in levels[::-1]:
        extra = open_ & (p > t)
        misses = int((open_ & covid & (p <= t)).sum())
        rows.append({"level": float(t), "referred": float((referred | extra).mean()),
                     "silent_miss": misses / max(int(covid.sum()), 1), "extra": int(extra.sum()), "misses": misses})
    return rows


def fit_triage(probs: np.ndarray, labels: np.ndarray, referred: np.ndarray, miss_cost: float,
               max_referred: float) -> tuple[float, list]:
    """The triage level minimising miss_cost * silent misses + referrals on valid, among the levels
    that keep the share of valid films referred (every reason together) within `max_referred` (ties:
    the higher level, fewer referrals). With the other reasons alone over that budget: no triage
    (level 1.0). -> (level, the curve)."""
    curve = triage_curve(probs, labels, referred)
    within = [r for r in curve if r["referred"] <= max_referred] or curve[:1]
    best = min(within, key=lambda r: (miss_cost * r["misses"] + r["extra"], -r["level"]))
    return best["level"], curve
