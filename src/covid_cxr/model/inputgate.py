"""The input gate: is this a frontal chest radiograph like the training films at all?

A model of its own, sharing nothing with the diagnostic body and heads (whose COVID class gathers
the odd-looking many-source films, so their novelty score reads "odd" as COVID): a small
convolutional autoencoder on the film at `SIZE` px, fitted on the training films only. What it
cannot reconstruct is not a chest film like those: CT, MR, ultrasound or nuclear slices, photographs,
screenshots, icons. The score is its reconstruction error on the standardised film (so brightness
and contrast, which other hospitals' films vary, do not count), plus, with `latent: true`, the
distance of the film's code to the training films' codes (kNN in the bottleneck). The threshold is
the valid films' `quantile`. Refer reason `not_a_chest_film` (model/verdict.py).

With `outlier_exposure` (params.yaml `train.input_gate`), training also pushes the reconstruction
error of generated non-chest images (model/synthneg.py) above a margin; the evaluation
negatives (stage `negatives`) come from other sources and are never seen here.

Weights: `input_gate.safetensors`; model.json `input_gate` holds its settings and threshold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

SIZE = 64


class AutoEncoder(nn.Module):
    """64x64x1 -> a `code`-sized bottleneck -> 64x64x1."""

    def __init__(self, code: int, width: int):
        super().__init__()
        w = width
        self.enc = nn.Sequential(
            nn.Conv2d(1, w, 3, 2, 1), nn.LeakyReLU(0.1),           # 32
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.LeakyReLU(0.1),       # 16
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.LeakyReLU(0.1),   # 8
            nn.Conv2d(4 * w, 4 * w, 3, 2, 1), nn.LeakyReLU(0.1),   # 4
            nn.Flatten(), nn.Linear(4 * w * 16, code))
        self.dec_in = nn.Linear(code, 4 * w * 16)
        self.dec = nn.Sequential(
            nn.LeakyReLU(0.1), nn.Unflatten(1, (4 * w, 4, 4)),
            nn.ConvTranspose2d(4 * w, 4 * w, 4, 2, 1), nn.LeakyReLU(0.1),   # 8
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.1),   # 16
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.LeakyReLU(0.1),       # 32
            nn.ConvTranspose2d(w, 1, 4, 2, 1))                               # 64

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.enc(x)
        return self.dec(self.dec_in(z)), z


def gate_input(grays) -> torch.Tensor:
    """Model-size uint8 films (B, S, S) -> (B, 1, SIZE, SIZE) float, each film standardised
    (zero mean, unit standard deviation): the gate sees structure, not exposure."""
    x = torch.as_tensor(np.asarray(grays)).float()[:, None] / 255.0
    if x.shape[-1] != SIZE:
        x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="area")
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    sd = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(0.02)
    return (x - mu) / sd


@dataclass
class InputGate:
    net: AutoEncoder
    threshold: float
    settings: dict[str, Any]                  # params.yaml train.input_gate, as fitted
    bank: torch.Tensor | None = None          # (N, code) unit-norm train codes, with `latent`
    scales: dict[str, float] = field(default_factory=dict)   # valid medians and spreads of the parts

    @torch.inference_mode()
    def parts(self, grays) -> dict[str, torch.Tensor]:
        x = gate_input(grays)
        rec, z = self.net(x)
        out = {"recon": (rec - x).pow(2).mean(dim=(1, 2, 3))}
        if self.bank is not None:
            zu = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
            k = min(int(self.settings["knn_k"]), self.bank.shape[0])
            out["latent"] = 1.0 - (zu @ self.bank.T).topk(k, dim=1).values[:, -1]
        return out

    def score(self, grays) -> np.ndarray:
        """The gate's score per film: the sum of its standardised parts, (s - median) / spread."""
        parts = self.parts(grays)
        return sum(((v - self.scales[f"{k}.median"]) / self.scales[f"{k}.spread"]) for k, v in parts.items()).numpy()

    def flags(self, grays) -> tuple[np.ndarray, np.ndarray]:
        s = self.score(grays)
        return s, s > self.threshold

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {f"net.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        if self.bank is not None:
            t["bank"] = self.bank.contiguous()
        return t

    def describe(self) -> dict[str, Any]:
        return {"kind": "convolutional autoencoder on the standardised film at 64 px"
                        + (", with the distance to the training films' codes" if self.bank is not None else ""),
                "threshold": float(self.threshold), "settings": self.settings,
                "scales": {k: float(v) for k, v in self.scales.items()}}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], desc: dict[str, Any]) -> "InputGate":
        s = desc["settings"]
        net = AutoEncoder(int(s["code"]), int(s["width"]))
        net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")})
        net.eval()
        return cls(net, float(desc["threshold"]), s, t.get("bank"), dict(desc["scales"]))


def fit_input_gate(train: np.ndarray, valid: np.ndarray, settings: dict[str, Any], *, seed: int,
                   negatives=None, log=None) -> InputGate:
    """Fit the autoencoder on the train films (model-size uint8), set the scales and the threshold on
    the valid films. `negatives(rng, n)` -> n generated non-chest films (uint8, same size) when
    `settings["outlier_exposure"]` is on; nothing else is seen."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = AutoEncoder(int(settings["code"]), int(settings["width"]))
    opt = torch.optim.AdamW(net.parameters(), lr=float(settings["lr"]), weight_decay=1e-4)
    xt = gate_input(train)
    n, bs = len(xt), int(settings["batch_size"])
    steps = int(settings["epochs"]) * max(1, n // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(settings["lr"]), total_steps=steps)
    oe = float(settings.get("outlier_exposure") or 0.0)
    margin = None
    net.train()
    for step in range(steps):
        idx = torch.randint(0, n, (bs,), generator=g)
        x = xt[idx]
        shift = torch.randint(-3, 4, (2,), generator=g).tolist()   # a film is never framed the same twice
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        rec, _ = net(x)
        err = (rec - x).pow(2).mean(dim=(1, 2, 3))
        loss = err.mean()
        if oe > 0 and negatives is not None:
            neg = gate_input(negatives(rng, bs // 2))
            nerr = (net(neg)[0] - neg).pow(2).mean(dim=(1, 2, 3))
            margin = float(settings["oe_margin"]) * float(err.detach().mean()) if margin is None else \
                0.9 * margin + 0.1 * float(settings["oe_margin"]) * float(err.detach().mean())
            loss = loss + oe * torch.relu(margin - nerr).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  input gate: step {step + 1}/{steps}, train reconstruction error {float(err.detach().mean()):.4f}")
    net.eval()
    gate = InputGate(net, float("inf"), dict(settings))
    if settings.get("latent"):
        with torch.inference_mode():
            z = torch.cat([net.enc(xt[i:i + 512]) for i in range(0, n, 512)])
        gate.bank = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    parts = gate.parts(valid)
    q = float(settings["quantile"])
    for k, v in parts.items():
        med = float(torch.quantile(v, 0.5))
        gate.scales[f"{k}.median"] = med
        gate.scales[f"{k}.spread"] = max(float(torch.quantile(v, q)) - med, 1e-6)
    gate.threshold = float(np.quantile(gate.score(valid), q))
    return gate
