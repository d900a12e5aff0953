"""Weights-only model files: `model.safetensors` + `model.json` (+ `ood.safetensors`).

Serving, evaluation and the champion check load models only through here.
Nothing is ever unpickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import CLASSES
from .models import CxrNet, build
from .preprocess import Norm, normalize_batch

WEIGHTS = "model.safetensors"
META = "model.json"
OOD = "ood.safetensors"


@dataclass
class OodModel:
    """Distance of pooled features from the training X-rays.

    Class-conditional Mahalanobis distance (shared covariance) inside the top-K PCA subspace,
    plus the off-subspace residual, scaled so that both parts count alike for training data.
    Without the residual, inputs whose features leave the subspace (noise, blank frames) would
    project near the class means and look normal.
    """

    mean: torch.Tensor        # (D,) feature mean
    components: torch.Tensor  # (K, D) PCA projection
    class_means: torch.Tensor # (C, K)
    precision: torch.Tensor   # (K, K)
    threshold: float
    resid_mean: torch.Tensor | None = None  # () mean squared off-subspace residual on train

    def score(self, feats: torch.Tensor) -> torch.Tensor:
        xc = feats.float() - self.mean
        z = xc @ self.components.T                                     # (N, K)
        d = z[:, None, :] - self.class_means[None]                     # (N, C, K)
        m = torch.einsum("nck,kl,ncl->nc", d, self.precision, d).min(dim=1).values  # squared distance
        if self.resid_mean is not None:
            r = (xc - z @ self.components).pow(2).sum(1)
            m = m + self.components.shape[0] * r / self.resid_mean.clamp_min(1e-12)
        return m.clamp_min(0).sqrt()

    @classmethod
    def fit(cls, feats: np.ndarray, labels: np.ndarray, n_components: int = 64) -> "OodModel":
        x = torch.as_tensor(feats, dtype=torch.float64)
        mu = x.mean(0)
        xc = x - mu
        k = min(n_components, x.shape[1], x.shape[0] - 1)
        _, _, v = torch.linalg.svd(xc, full_matrices=False)
        comp = v[:k]
        z = xc @ comp.T
        y = torch.as_tensor(labels)
        cm = torch.stack([z[y == c].mean(0) if (y == c).any() else torch.zeros(k, dtype=z.dtype)
                          for c in range(len(CLASSES))])
        r = z - cm[y]
        cov = r.T @ r / max(len(r) - 1, 1)
        cov += torch.eye(k, dtype=cov.dtype) * 1e-3 * cov.diagonal().mean()
        prec = torch.linalg.inv(cov)
        resid = (xc - z @ comp).pow(2).sum(1).mean()
        return cls(mu.float(), comp.float(), cm.float(), prec.float(), float("inf"), resid.float())

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"mean": self.mean, "components": self.components,
             "class_means": self.class_means, "precision": self.precision}
        if self.resid_mean is not None:
            t["resid_mean"] = self.resid_mean.reshape(())
        return t


@dataclass
class LoadedModel:
    net: CxrNet
    meta: dict[str, Any]
    ood: OodModel | None = None
    channels_last: bool = True
    classes: tuple[str, ...] = field(default=CLASSES)

    @property
    def size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def norm(self) -> Norm:
        n = self.meta["normalize"]
        return Norm(tuple(n["mean"]), tuple(n["std"]))

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))

    def to_input(self, grays) -> torch.Tensor:
        """uint8 (B,H,W) at `size` -> normalised float batch."""
        return normalize_batch(grays, self.norm, self.channels_last)

    @torch.inference_mode()
    def forward(self, grays) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (raw logits, pooled features)."""
        x = self.to_input(grays)
        feats = self.net.features(x)
        return self.net.head(feats), feats

    @torch.inference_mode()
    def predict(self, grays) -> dict[str, np.ndarray]:
        """Calibrated probabilities, raw logits, and OOD score/flag for a batch."""
        logits, feats = self.forward(grays)
        probs = torch.softmax(logits / self.temperature, dim=1)
        out = {"logits": logits.numpy(), "probs": probs.numpy()}
        if self.ood is not None:
            s = self.ood.score(feats)
            out["ood_score"] = s.numpy()
            out["in_distribution"] = (s <= self.ood.threshold).numpy()
        return out


def save_model(net: CxrNet, meta: dict[str, Any], out_dir: Path, ood: OodModel | None = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(sd, str(out_dir / WEIGHTS))
    meta = dict(meta)
    meta.setdefault("classes", list(CLASSES))
    meta["arch"] = net.arch
    if ood is not None:
        save_file({k: v.contiguous() for k, v in ood.tensors().items()}, str(out_dir / OOD))
        meta["ood"] = {"kind": "mahalanobis-pca+residual", "threshold": ood.threshold,
                       "components": int(ood.components.shape[0])}
    (out_dir / META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_meta(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / META).read_text())


def load_model(model_dir: Path, channels_last: bool = True) -> LoadedModel:
    model_dir = Path(model_dir)
    meta = load_meta(model_dir)
    if tuple(meta.get("classes", CLASSES)) != CLASSES:
        raise ValueError(f"model classes {meta.get('classes')} differ from {CLASSES}")
    net = build(meta["arch"], n_classes=len(CLASSES), pretrained=False)
    net.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    net.eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    ood = None
    if (model_dir / OOD).exists() and "ood" in meta:
        t = load_file(str(model_dir / OOD))
        ood = OodModel(t["mean"], t["components"], t["class_means"], t["precision"], float(meta["ood"]["threshold"]),
                       t.get("resid_mean"))
    return LoadedModel(net=net, meta=meta, ood=ood, channels_last=channels_last)
