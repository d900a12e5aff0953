""""I don't know" as a first-class answer: `ok`, or `refer` with a reason.

One rule for every output of the project (API, page, batch scoring, the external stage,
the test-split figures and the gate):

| reason                  | when                                                              |
|-------------------------|-------------------------------------------------------------------|
| `not_an_xray`           | the upload fails the same colour / blank rules as `data check`    |
| `outside_training_data` | its novelty score (checkpoint.Novelty) is over the threshold      |
| `low_confidence`        | its calibrated top probability is under `min_confidence`          |

The first that applies is the reason. `label` stays the most probable class either way;
a refer verdict says that label must not be taken as the answer. Both thresholds are fitted
on the validation split when the model is trained (train.py) and travel in model.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

OK, REFER = "ok", "refer"
REASONS = {
    "not_an_xray": "this picture does not look like a chest X-ray",
    "outside_training_data": "this film is unlike the films the model was trained on",
    "low_confidence": "the model is not confident about this film",
}


@dataclass(frozen=True)
class Policy:
    """The model's low-confidence threshold (model.json `verdict`; the novelty threshold is the
    novelty model's own, model.json `ood.threshold`)."""

    min_confidence: float

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Policy":
        return cls(min_confidence=float(meta["verdict"]["min_confidence"]))


def decide(probs: np.ndarray, novel: np.ndarray | None, policy: Policy,
           not_xray: Sequence[str | None] | None = None) -> tuple[list[str], list[str | None]]:
    """Per row: (verdict, reason). `not_xray[i]` is a data-check rule code, or None."""
    probs = np.asarray(probs)
    conf = probs.max(axis=1)
    verdicts, reasons = [], []
    for i in range(len(probs)):
        if not_xray is not None and not_xray[i]:
            reason = "not_an_xray"
        elif novel is not None and bool(novel[i]):
            reason = "outside_training_data"
        elif conf[i] < policy.min_confidence:
            reason = "low_confidence"
        else:
            reason = None
        verdicts.append(OK if reason is None else REFER)
        reasons.append(reason)
    return verdicts, reasons


def fit_min_confidence(valid_probs: np.ndarray, quantile: float) -> float:
    """The confidence under which the least confident `quantile` share of valid films fall."""
    return float(np.quantile(np.asarray(valid_probs).max(axis=1), quantile))
