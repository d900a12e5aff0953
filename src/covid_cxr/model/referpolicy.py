"""The refer policy: everything fitted after the body is trained, on train and valid features only.

`fit_refer_policy` is the one place that fits, in this order:
1. calibration of the trained head on valid (model/calibration.py);
2. the novelty model (model/novelty.py): its parts on train, their scales and threshold on valid;
3. the clean second head (model/cleanhead.py), when `train.clean_head` is set: on train, L2 and T
   by valid NLL; the model's probabilities become the mean of both heads;
4. the low-confidence threshold on those probabilities (model/verdict.py).
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
from covid_cxr.model.verdict import fit_min_confidence


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
    clean_rows: list[dict[str, float]] = field(default_factory=list)   # one per L2 of the grid

    @property
    def valid_accuracy(self) -> float:
        """Of the label the service gives (with a clean head, the mean of both heads)."""
        return float((self.valid_probs.argmax(1) == self.valid_labels).mean())

    def meta(self) -> dict[str, Any]:
        """What model.json records of the policy (besides `ood` and `clean_head`, which
        checkpoint.save_model writes from the parts themselves)."""
        return {**self.calibration.to_meta(), "verdict": {"min_confidence": self.min_confidence},
                "valid_accuracy": self.valid_accuracy, "clean_head_fit": self.clean_rows}


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
    return ReferPolicy(calib, novelty, clean, min_conf, p_va, valid.labels, rows)
