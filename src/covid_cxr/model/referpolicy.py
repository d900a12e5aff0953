"""The refer policy: everything fitted after the body is trained, on train and valid features only.

`fit_refer_policy` is the one place that fits, in this order:
1. calibration of the trained head on valid (model/calibration.py);
2. the novelty model (model/novelty.py): its parts on train, their scales and threshold on valid;
3. the clean second head (model/cleanhead.py), when `train.clean_head` is set: on train, L2 and T
   by valid NLL; the model's probabilities become the mean of both heads;
4. the low-confidence threshold on those probabilities (model/verdict.py);
5. then (`ReferPolicy.fit_triage`, once the input gate's valid flags are known) the triage level.
`train` calls it, and so does every experiment that refits a policy on a trained body. Nothing
here reads `external/`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from covid_cxr.config import CLASSES
from covid_cxr.model.calibration import Calibration, fit_calibration
from covid_cxr.model.cleanhead import CleanHead, fit_clean_head, mix
from covid_cxr.model.novelty import Novelty
from covid_cxr.model.verdict import fit_min_confidence, fit_triage


@dataclass
class Features:
    """One split through the body: pooled features, style vectors, labels (and, for valid, the
    trained head's raw logits)."""

    content: torch.Tensor
    style: torch.Tensor
    labels: np.ndarray
    logits: torch.Tensor | None = None


@dataclass
class ReferPolicy:
    calibration: Calibration
    novelty: Novelty
    clean: CleanHead | None
    min_confidence: float
    valid_probs: np.ndarray                 # the answer the service would give on valid
    valid_labels: np.ndarray
    valid_novel: np.ndarray                 # the valid films the novelty score refers
    clean_rows: list[dict[str, float]] = field(default_factory=list)   # one per L2 of the grid
    covid_triage: float | None = None       # fit_triage's level
    triage_point: dict[str, float] = field(default_factory=dict)
    triage_curve: list[dict[str, float]] = field(default_factory=list)

    def fit_triage(self, miss_cost: float, max_referred: float, gate_flags: np.ndarray | None) -> None:
        """The triage level on valid (verdict.fit_triage), after every other refer reason: the novelty
        score, low confidence and the input gate's flags (`gate_flags`, None without a gate)."""
        referred = self.valid_novel | (self.valid_probs.max(1) < self.min_confidence)
        if gate_flags is not None:
            referred = referred | np.asarray(gate_flags, bool)
        self.covid_triage, self.triage_curve = fit_triage(self.valid_probs, self.valid_labels, referred, miss_cost,
                                                          max_referred)
        self.triage_point = next(r for r in self.triage_curve if r["level"] == self.covid_triage)

    @property
    def valid_accuracy(self) -> float:
        """Of the label the service gives (with a clean head, the mean of both heads)."""
        return float((self.valid_probs.argmax(1) == self.valid_labels).mean())

    def meta(self) -> dict[str, Any]:
        """What model.json records of the policy (besides `ood` and `clean_head`, which
        checkpoint.save_model writes from the parts themselves)."""
        return {**self.calibration.to_meta(),
                "verdict": {"min_confidence": self.min_confidence, "covid_triage": self.covid_triage},
                "valid_accuracy": self.valid_accuracy, "clean_head_fit": self.clean_rows,
                "triage_fit": {"valid": self.triage_point, "valid_curve": compact(self.triage_curve)}}


def compact(curve: list[dict[str, float]], n: int = 60) -> list[dict[str, float]]:
    """At most about `n` points of a triage curve, evenly over its levels, its ends kept (model.json)."""
    if len(curve) <= n:
        return curve
    idx = sorted(set(np.linspace(0, len(curve) - 1, n).round().astype(int).tolist()))
    return [curve[i] for i in idx]


def fit_refer_policy(train: Features, valid: Features, *, calibration: str, verdict: dict[str, Any],
                     clean_head: dict[str, Any] | None) -> ReferPolicy:
    """Calibration, novelty model, clean head and low-confidence threshold (see the module docstring).

    `valid.logits` must be the trained head's raw logits on the valid films; `verdict` is
    params.yaml's `verdict` section, `calibration` `train.calibration`, `clean_head`
    `train.clean_head` (None: one head)."""
    if valid.logits is None:
        raise ValueError("fit_refer_policy needs the trained head's logits on valid")
    calib = fit_calibration(valid.logits, valid.labels, calibration)
    novelty = Novelty.fit({"content": train.content.numpy(), "style": train.style.numpy()}, train.labels,
                          {"content": valid.content, "style": valid.style, "logits": valid.logits},
                          float(verdict["novelty_quantile"]), dict(verdict["components"]),
                          tuple(verdict["novelty_parts"]), calib.temperature, verdict["knn_k"],
                          dict(verdict["part_quantiles"]), combine=verdict["combine"])
    p_va = calib.probs(valid.logits)
    clean, rows = None, []
    if clean_head:
        clean, rows = fit_clean_head({"content": train.content, "style": train.style}, train.labels,
                                     {"content": valid.content, "style": valid.style}, valid.labels,
                                     clean_head["l2"], len(CLASSES), inputs=clean_head["inputs"])
        p_va = mix(p_va, clean.probs(valid.content, valid.style))
    min_conf = fit_min_confidence(p_va, float(verdict["low_confidence_quantile"]))
    with torch.inference_mode():
        novel = (novelty.score(valid.content, valid.style, valid.logits) > novelty.threshold).numpy()
    return ReferPolicy(calib, novelty, clean, min_conf, p_va, valid.labels, novel, rows)
