"""Calibration, fitted on the validation split: probabilities = softmax(logits / T + b).

Two kinds (params.yaml `train.calibration`):
- `temperature`: one temperature T (Guo et al. 2017), the bias b stays 0; it changes confidences,
  never the label;
- `temperature_bias`: T plus one offset per class (vector scaling restricted to a bias), both by
  valid NLL. It corrects a class prior that training left off (MixUp and label smoothing pull the
  model towards the class mix of its mixed targets), so it can change the label of a film between
  two classes.

Both travel in model.json (`temperature`, `class_bias`); every consumer (the service, batch
scoring, the external stage, evaluate) goes through `Calibration.probs`. The novelty model's
energy part scores the temperature-scaled logits only: an offset per class is a prior, not
evidence that a class claims the film.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

KINDS = ("temperature", "temperature_bias")
T_BOUNDS = (0.05, 20.0)


@dataclass(frozen=True)
class Calibration:
    temperature: float
    bias: tuple[float, ...] | None = None    # per class, mean zero; None: temperature only

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        out = z.float() / float(self.temperature)
        if self.bias is not None:
            out = out + torch.tensor(self.bias, dtype=out.dtype)
        return out

    def probs(self, z) -> np.ndarray:
        return torch.softmax(self.logits(torch.as_tensor(z)), dim=1).numpy()

    def to_meta(self) -> dict[str, Any]:
        return {"temperature": float(self.temperature),
                "class_bias": None if self.bias is None else [float(x) for x in self.bias]}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Calibration":
        """From model.json (schema 2: older files go through modelmeta.migrate first)."""
        b = meta["class_bias"]
        return cls(float(meta["temperature"]), None if b is None else tuple(float(x) for x in b))

    def describe(self, classes: Sequence[str]) -> str:
        s = f"temperature {self.temperature:.3f}"
        if self.bias is not None:
            s += ", class offsets " + ", ".join(f"{c} {b:+.2f}" for c, b in zip(classes, self.bias))
        return s


def fit_temperature(logits, labels) -> float:
    """Temperature T minimising valid NLL of softmax(logits / T)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t):
        # LBFGS can diverge to NaN on near-flat logits (a smoke model on a dozen valid films):
        # fall back to the best of a log-spaced grid over the same bounds
        grid = torch.linspace(float(np.log(T_BOUNDS[0])), float(np.log(T_BOUNDS[1])), 401, dtype=torch.float64).exp()
        with torch.no_grad():
            nll = torch.stack([torch.nn.functional.cross_entropy(z / g, y) for g in grid])
        t = float(grid[int(nll.argmin())])
    return min(max(t, T_BOUNDS[0]), T_BOUNDS[1])


def fit_temperature_bias(logits, labels) -> tuple[float, tuple[float, ...]]:
    """T and a mean-zero per-class offset b minimising valid NLL of softmax(logits / T + b).

    Starts from the temperature-only fit; falls back to it (b = 0) when the joint fit does not
    improve the NLL or leaves the bounds (a near-flat smoke model)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    t0 = fit_temperature(z, y)
    log_t = torch.tensor([np.log(t0)], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, b], lr=0.1, max_iter=500)

    def nll(lt, bb):
        return torch.nn.functional.cross_entropy(z / lt.exp() + (bb - bb.mean()), y)

    def closure():
        opt.zero_grad()
        loss = nll(log_t, b)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        t, bb = float(log_t.exp()), (b - b.mean())
        base = float(nll(torch.tensor([np.log(t0)], dtype=torch.float64), torch.zeros_like(b)))
        ok = np.isfinite(t) and bool(torch.isfinite(bb).all()) and T_BOUNDS[0] <= t <= T_BOUNDS[1]
        if not ok or float(nll(log_t, b)) > base:
            return t0, tuple(0.0 for _ in range(z.shape[1]))
    return t, tuple(float(x) for x in bb)


def fit_calibration(logits, labels, kind: str) -> Calibration:
    if kind == "temperature":
        return Calibration(fit_temperature(logits, labels))
    if kind == "temperature_bias":
        t, b = fit_temperature_bias(logits, labels)
        return Calibration(t, b)
    raise ValueError(f"train.calibration must be one of {KINDS}, not {kind!r}")
