"""The novelty score: how unlike the training films an input is, from the one forward pass.

Parts, each scoring its own features (model.json `ood`; weights in `ood.safetensors`):
- `content`: Mahalanobis + off-subspace residual (`OodModel`) on the pooled features;
- `style`: the same on the early-layer activation statistics (nets.STYLE_TAPS): how a film was
  acquired and processed;
- `energy`: the energy of the temperature-scaled logits (no class claims the film);
- `knn`: the distance to the k-th nearest training film's pooled features (`KnnPart`).
`Novelty` standardises each part on valid and combines them; its threshold is the valid quantile.
Fitted by `model/referpolicy.py` at training time; nothing here reads `external/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from covid_cxr.config import CLASSES


def pca(x: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (mean (D,), the top principal directions (K, D)), K = min(n_components, D, N - 1)."""
    mu = x.mean(0)
    _, _, v = torch.linalg.svd(x - mu, full_matrices=False)
    return mu, v[: min(n_components, x.shape[1], x.shape[0] - 1)]


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
        mu, comp = pca(x, n_components)
        xc = x - mu
        k = comp.shape[0]
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
class EnergyPart:
    """Energy of the calibrated logits, -T * logsumexp(z / T): high when no class claims the film."""

    temperature: float

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        t = float(self.temperature)
        return -t * torch.logsumexp(logits.float() / t, dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"temperature": torch.tensor(float(self.temperature))}


@dataclass
class KnnPart:
    """Distance to the k-th nearest training film: 1 - cosine similarity in a PCA space of the
    pooled features. Unlike the Gaussian `content` part it does not assume one blob per class, so
    it sees films that land between the training films of one class (the COVID class mixes many
    sources)."""

    mean: torch.Tensor        # (D,)
    components: torch.Tensor  # (K, D)
    bank: torch.Tensor        # (N, K) unit-norm projected training features
    k: int

    def _unit(self, feats: torch.Tensor) -> torch.Tensor:
        z = (feats.float() - self.mean) @ self.components.T
        return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def score(self, feats: torch.Tensor) -> torch.Tensor:
        sim = self._unit(feats) @ self.bank.T
        return 1.0 - sim.topk(min(self.k, self.bank.shape[0]), dim=1).values[:, -1]

    @classmethod
    def fit(cls, feats: np.ndarray, n_components: int, k: int) -> "KnnPart":
        x = torch.as_tensor(feats, dtype=torch.float64)
        mu, comp = pca(x, n_components)
        part = cls(mu.float(), comp.float(), torch.empty(0), int(k))
        part.bank = part._unit(x.float())
        return part

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components, "bank": self.bank,
                "k": torch.tensor(self.k)}


Part = OodModel | EnergyPart | KnnPart
INPUTS = {"content": "content", "style": "style", "energy": "logits", "knn": "content"}  # part -> its features


class Novelty:
    """How unlike the training films an input is, from one forward pass.

    Parts, each scoring its own features:
    - `content`: Mahalanobis + residual (OodModel) on the pooled features (what the film shows);
    - `style`: the same on early-layer activation statistics (how it was acquired and processed;
      nets.STYLE_TAPS);
    - `energy`: the energy of the temperature-scaled logits (no class claims the film);
    - `knn`: distance to the k-th nearest training film's pooled features (KnnPart).
    Each part's score is standardised on the validation split, (s - median) / (quantile - median),
    at the part's own quantile where `part_quantiles` names one. The novelty score combines the
    standardised parts (`combine`, verdict.combine): `max`, the largest part, or `sum`, their sum,
    which adds up evidence from films that are somewhat unusual in several parts at once.
    `threshold` is that score's validation quantile. Means and covariances come from train;
    medians, quantiles and threshold from valid.
    """

    COMBINE = ("max", "sum")

    def __init__(self, parts: dict[str, Part], scales: dict[str, float], threshold: float,
                 centers: dict[str, float], combine: str):
        if combine not in self.COMBINE:
            raise ValueError(f"verdict.combine must be one of {self.COMBINE}, not {combine!r}")
        self.parts, self.scales, self.threshold, self.combine = parts, scales, threshold, combine
        self.centers = centers

    def part_scores(self, content: torch.Tensor, style: torch.Tensor | None = None,
                    logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        feats = {"content": content, "style": style, "logits": logits}
        return {k: (m.score(feats[INPUTS[k]]) - self.centers[k]) / self.scales[k]
                for k, m in self.parts.items() if feats[INPUTS[k]] is not None}

    def score(self, content: torch.Tensor, style: torch.Tensor | None = None,
              logits: torch.Tensor | None = None) -> torch.Tensor:
        parts = torch.stack(list(self.part_scores(content, style, logits).values()))
        return parts.sum(0) if self.combine == "sum" else parts.amax(0)

    @classmethod
    def fit(cls, train: dict[str, np.ndarray], labels: np.ndarray, valid: dict[str, torch.Tensor],
            quantile: float, n_components: dict[str, int], parts: tuple[str, ...], temperature: float,
            knn_k: int | None = None, part_quantiles: dict[str, float] | None = None, *,
            combine: str) -> "Novelty":
        models: dict[str, Part] = {}
        for k in parts:
            if k == "energy":
                models[k] = EnergyPart(temperature)
            elif k == "knn":
                if knn_k is None:
                    raise ValueError("the knn novelty part needs verdict.knn_k")
                models[k] = KnnPart.fit(train[INPUTS[k]], n_components[k], knn_k)
            else:
                models[k] = OodModel.fit(train[INPUTS[k]], labels, n_components=n_components[k])
        centers, scales = {}, {}
        for k, m in models.items():
            v = m.score(valid[INPUTS[k]])
            centers[k] = float(torch.quantile(v, 0.5))
            # a part scaled at a higher valid quantile takes a smaller share of the one budget and
            # refers only its extremes (the style part: photographs, not another site's processing)
            q = float((part_quantiles or {}).get(k, quantile))
            scales[k] = max(float(torch.quantile(v, q)) - centers[k], 1e-6)
        nov = cls(models, scales, float("inf"), centers, combine)
        nov.threshold = float(torch.quantile(nov.score(valid["content"], valid.get("style"), valid.get("logits")),
                                             quantile))
        return nov

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{n}": t for k, m in self.parts.items() for n, t in m.tensors().items()}

    def describe(self) -> dict[str, Any]:
        return {"kind": f"{self.combine} of standardised parts: " + ", ".join(self.parts),
                "combine": self.combine, "threshold": self.threshold,
                "scales": self.scales, "centers": self.centers,
                "components": {k: int(m.components.shape[0]) for k, m in self.parts.items()
                               if isinstance(m, (OodModel, KnnPart))}}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], desc: dict[str, Any]) -> "Novelty":
        """The novelty model of a model directory: `ood.safetensors` and model.json's `ood` (schema 2,
        modelmeta.migrate)."""
        if desc.get("flat_tensors"):   # a schema-1 content-only model: its tensors carry no part prefix
            t = {f"content.{n}": v for n, v in t.items()}
        parts: dict[str, Part] = {}
        for k in desc["scales"]:
            g = {n.split(".", 1)[1]: v for n, v in t.items() if n.startswith(k + ".")}
            if k == "energy":
                parts[k] = EnergyPart(float(g["temperature"]))
            elif k == "knn":
                parts[k] = KnnPart(g["mean"], g["components"], g["bank"], int(g["k"]))
            else:
                parts[k] = OodModel(g["mean"], g["components"], g["class_means"], g["precision"], float("inf"),
                                    g.get("resid_mean"))
        return cls(parts, {k: float(v) for k, v in desc["scales"].items()}, float(desc["threshold"]),
                   {k: float(v) for k, v in desc["centers"].items()}, desc["combine"])
