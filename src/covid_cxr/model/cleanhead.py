"""A second head on the same body, fitted on the clean training films: one forward pass, two opinions.

The trained head learns from films re-processed as other sites would (augment.Acquisition), so it
does not lean on how a film was acquired, and it gives up part of the test split, whose sources
are the training sources. The body's pooled features still carry that information. This head is a
multinomial logistic regression on the pooled features of the *unaugmented* training films (the
features `train` computes anyway for the novelty bank): it reads the training sources as they are.

The model's answer is the mean of the two heads' calibrated probabilities (`mix`):
- on films like the training films both heads agree, and the clean head adds what the augmented
  one gave up (bench/ood_twohead.py: test accuracy +0.4 to +1.9 points on four bodies);
- on a film from elsewhere they tend to disagree (the clean head reads the unfamiliar
  acquisition as a class), the mean falls under the low-confidence threshold and the film is
  referred, instead of being answered by the head that reads the shortcut.
Its L2 strength (params.yaml `train.clean_head.l2`, a grid) and its temperature are chosen on
valid NLL; nothing else is fitted. The novelty score stays the body's and the trained head's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

FILE = "clean_head.safetensors"


@dataclass
class CleanHead:
    weight: torch.Tensor   # (C, D), on raw pooled features (standardisation folded in)
    bias: torch.Tensor     # (C,)
    temperature: float
    l2: float

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.float() @ self.weight.T + self.bias

    def probs_t(self, feats: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities, differentiable in `feats` (Grad-CAM)."""
        return torch.softmax(self.logits(feats) / float(self.temperature), dim=1)

    def probs(self, feats: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.probs_t(feats).numpy()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}

    def describe(self) -> dict[str, Any]:
        return {"kind": "logistic regression on the clean train films' pooled features",
                "temperature": float(self.temperature), "l2": float(self.l2)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], desc: dict[str, Any]) -> "CleanHead":
        return cls(t["weight"].float(), t["bias"].float(), float(desc["temperature"]), float(desc["l2"]))


def mix(head_probs: np.ndarray, clean_probs: np.ndarray) -> np.ndarray:
    """The model's probabilities: the mean of the two heads' calibrated probabilities."""
    return (np.asarray(head_probs) + np.asarray(clean_probs)) / 2


def _fit_one(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


def fit_clean_head(f_tr, y_tr, f_va, y_va, l2_grid: Sequence[float], n_classes: int
                   ) -> tuple[CleanHead, list[dict[str, float]]]:
    """Fit on train features for each L2 in the grid, calibrate each on valid, keep the lowest valid NLL.

    -> (the head, one row per L2: l2, valid_nll, valid_accuracy, temperature)."""
    from covid_cxr.model.calibration import fit_temperature

    if not l2_grid:
        raise ValueError("train.clean_head.l2 needs at least one value")
    xt = torch.as_tensor(np.asarray(f_tr), dtype=torch.float64)
    xv = torch.as_tensor(np.asarray(f_va), dtype=torch.float64)
    yt, yv = torch.as_tensor(np.asarray(y_tr)), torch.as_tensor(np.asarray(y_va))
    mu, sd = xt.mean(0), xt.std(0) + 1e-6           # standardise on train, fold into the weights
    zt, zv = (xt - mu) / sd, (xv - mu) / sd
    rows, best = [], None
    for l2 in l2_grid:
        w, b = _fit_one(zt, yt, n_classes, float(l2))
        lv = zv @ w.T + b
        t = fit_temperature(lv, yv)
        nll = float(torch.nn.functional.cross_entropy(lv / t, yv))
        rows.append({"l2": float(l2), "valid_nll": nll, "valid_accuracy": float((lv.argmax(1) == yv).float().mean()),
                     "temperature": float(t)})
        if best is None or nll < best[0]:
            best = (nll, float(l2), w, b, t)
    _, l2, w, b, t = best
    weight = w / sd                                 # logits = ((x - mu) / sd) @ w.T + b
    bias = b - (mu / sd) @ w.T
    return CleanHead(weight.float(), bias.float(), float(t), l2), rows
