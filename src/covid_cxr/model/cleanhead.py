"""A second head on the same body, fitted on the clean training films: one forward pass, two opinions.

The trained head learns from films re-processed as other sites would (augment.Acquisition), so it
does not lean on how a film was acquired, and it gives up part of the test split, whose sources
are the training sources. The body's pooled features still carry that information. This head is a
multinomial logistic regression on the *unaugmented* training films' features (those `train`
computes anyway for the novelty bank): it reads the training sources as they are. Which features
it reads is `train.clean_head.inputs`:
- `content`: the pooled features the trained head reads;
- `style`: the body's early-layer activation statistics (nets.STYLE_TAPS), which carry how a film
  was acquired and processed, the information the trained head is taught to ignore.

The model's answer is the mean of the two heads' calibrated probabilities (`mix`):
- on films like the training films both heads agree, and the clean head adds what the augmented
  one gave up (experiments/twohead: test accuracy +0.4 to +1.9 points on four bodies);
- on a film from elsewhere they tend to disagree (the clean head reads the unfamiliar
  acquisition as a class), the mean falls under the low-confidence threshold and the film is
  referred, instead of being answered by the head that reads the shortcut.
Its L2 strength (params.yaml `train.clean_head.l2`, a grid) and its temperature are chosen on
valid NLL; nothing else is fitted. The novelty score stays the body's and the trained head's.
For Grad-CAM (which differentiates the last feature map) the style term is a constant: the style
taps lie upstream of that map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

INPUTS = ("content", "style")   # what a clean head can read, in the order its weights are laid out
INPUT_WORDS = {"content": "pooled features", "style": "early-layer style statistics"}


def in_words(inputs: Sequence[str]) -> str:
    """What a clean head reads, in words (model.json `kind`, the model card)."""
    return " and ".join(INPUT_WORDS.get(i, i) for i in inputs)


def check_inputs(inputs: Sequence[str]) -> tuple[str, ...]:
    inputs = tuple(inputs)
    if not inputs or any(i not in INPUTS for i in inputs) or len(set(inputs)) != len(inputs):
        raise ValueError(f"train.clean_head.inputs must be a non-empty subset of {list(INPUTS)}, not {list(inputs)}")
    return tuple(i for i in INPUTS if i in inputs)


def stack(feats: dict[str, Any], inputs: Sequence[str], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The clean head's input: the named features (arrays or tensors) side by side, differentiable."""
    missing = [i for i in inputs if feats.get(i) is None]
    if missing:
        raise ValueError(f"this clean head reads {list(inputs)}; {missing} not given")
    return torch.cat([torch.as_tensor(feats[i], dtype=dtype) for i in inputs], dim=1)


@dataclass
class CleanHead:
    weight: torch.Tensor   # (C, D), on the raw features of `inputs` side by side (standardisation folded in)
    bias: torch.Tensor     # (C,)
    temperature: float
    l2: float
    inputs: tuple[str, ...] = ("content",)

    def logits(self, feats: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        return stack({"content": feats, "style": style}, self.inputs) @ self.weight.T + self.bias

    def probs_t(self, feats: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated probabilities, differentiable in `feats` (Grad-CAM)."""
        return torch.softmax(self.logits(feats, style) / float(self.temperature), dim=1)

    def probs(self, feats: torch.Tensor, style: torch.Tensor | None = None) -> np.ndarray:
        with torch.no_grad():
            return self.probs_t(feats, style).numpy()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}

    def describe(self) -> dict[str, Any]:
        return {"kind": f"logistic regression on the clean train films' {in_words(self.inputs)}",
                "inputs": list(self.inputs), "temperature": float(self.temperature), "l2": float(self.l2)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], desc: dict[str, Any]) -> "CleanHead":
        inputs = check_inputs(desc["inputs"])
        return cls(t["weight"].float(), t["bias"].float(), float(desc["temperature"]), float(desc["l2"]), inputs)


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


def fit_clean_head(f_tr: dict[str, Any], y_tr, f_va: dict[str, Any], y_va, l2_grid: Sequence[float],
                   n_classes: int, *, inputs: Sequence[str]) -> tuple[CleanHead, list[dict[str, float]]]:
    """Fit on train features for each L2 in the grid, calibrate each on valid, keep the lowest valid NLL.

    `f_tr`, `f_va`: {"content": (N, D), "style": (N, S)}; the head reads `inputs` of them.
    -> (the head, one row per L2: l2, valid_nll, valid_accuracy, temperature)."""
    from covid_cxr.model.calibration import fit_temperature

    if not l2_grid:
        raise ValueError("train.clean_head.l2 needs at least one value")
    inputs = check_inputs(inputs)
    xt, xv = stack(f_tr, inputs, torch.float64), stack(f_va, inputs, torch.float64)
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
    return CleanHead(weight.float(), bias.float(), float(t), l2, inputs), rows
