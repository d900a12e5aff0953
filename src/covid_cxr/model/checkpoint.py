"""Weights-only model files: `model.safetensors` + `model.json` (+ `ood.safetensors`, the novelty
model; + `clean_head.safetensors`, the second head of model/cleanhead.py).

Serving, evaluation and the champion check load models only through here.
Nothing is ever unpickled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from covid_cxr.config import CLASSES
from covid_cxr.model.calibration import Calibration
from covid_cxr.model.cleanhead import FILE as CLEAN_HEAD, CleanHead, mix
from covid_cxr.model.nets import CxrNet, build
from covid_cxr.data.preprocess import Norm, normalize_batch
from covid_cxr.model.verdict import Policy, decide

WEIGHTS = "model.safetensors"
META = "model.json"
OOD = "ood.safetensors"
FILES = (WEIGHTS, META, OOD, CLEAN_HEAD)    # all a model directory may hold: `package` copies these


def _pca(x: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        mu, comp = _pca(x, n_components)
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
        mu, comp = _pca(x, n_components)
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
                 centers: dict[str, float] | None = None, combine: str = "max"):
        # combine="max": what models saved before `verdict.combine` existed were fitted with
        if combine not in self.COMBINE:
            raise ValueError(f"verdict.combine must be one of {self.COMBINE}, not {combine!r}")
        self.parts, self.scales, self.threshold, self.combine = parts, scales, threshold, combine
        self.centers = centers or {k: 0.0 for k in parts}

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
        if "scales" not in desc:  # a model saved before the style part: content only, unscaled
            m = OodModel(t["mean"], t["components"], t["class_means"], t["precision"], float(desc["threshold"]),
                         t.get("resid_mean"))
            return cls({"content": m}, {"content": 1.0}, float(desc["threshold"]))
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
                   {k: float(v) for k, v in (desc.get("centers") or {}).items()} or None,
                   desc.get("combine", "max"))


@dataclass
class Predictions:
    """One batch through the model: calibrated probabilities, novelty and the verdict."""

    logits: np.ndarray            # (N, C) raw, of the trained head
    probs: np.ndarray             # (N, C) calibrated (model/calibration.py); with a clean head, the mean of both
    novelty: np.ndarray | None    # (N,) novelty score, None without a novelty model
    novel: np.ndarray             # (N,) bool: novelty over threshold
    verdict: list[str]            # "ok" | "refer"
    reason: list[str | None]      # verdict.REASONS key, None when ok

    @property
    def labels(self) -> list[str]:
        return [CLASSES[i] for i in self.probs.argmax(1)]


@dataclass
class LoadedModel:
    net: CxrNet
    meta: dict[str, Any]
    ood: Novelty | None = None
    channels_last: bool = True
    clean: CleanHead | None = None   # the second head (model/cleanhead.py), None for one-head models

    @property
    def size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def norm(self) -> Norm:
        n = self.meta["normalize"]
        return Norm(tuple(n["mean"]), tuple(n["std"]))

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_meta(self.meta)

    @property
    def policy(self) -> Policy:
        return Policy.from_meta(self.meta)

    def to_input(self, grays) -> torch.Tensor:
        """uint8 (B,H,W) at `size` -> normalised float batch."""
        return normalize_batch(grays, self.norm, self.channels_last)

    @torch.inference_mode()
    def forward(self, grays) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (raw logits, pooled features, style vector)."""
        feats, style = self.net.embed(self.to_input(grays))
        return self.net.head(feats), feats, style

    @torch.inference_mode()
    def predict(self, grays, not_xray: Sequence[str | None] | None = None) -> Predictions:
        """Calibrated probabilities, novelty and verdict for a batch of (B,S,S) uint8 films.

        `not_xray[i]`: the data-check rule (`not_xray_colour`, `not_xray_blank`) that image i
        failed before it was made grey, or None.
        """
        logits, feats, style = self.forward(grays)
        probs = self.calibration.probs(logits)
        if self.clean is not None:
            probs = mix(probs, self.clean.probs(feats, style))
        novelty, novel = None, np.zeros(len(probs), bool)
        if self.ood is not None:
            novelty = self.ood.score(feats, style, logits).numpy()
            novel = novelty > self.ood.threshold
        verdicts, reasons = decide(probs, novel, self.policy, not_xray)
        return Predictions(logits.numpy(), probs, novelty, novel, verdicts, reasons)

    def cam_head(self, x: torch.Tensor | None = None):
        """What Grad-CAM differentiates: pooled features -> per-class scores of the answer given.

        One head: its raw logits. Two heads: the log of their mean calibrated probability. A clean
        head that reads the style statistics needs `x`, the normalised batch: its style term is a
        constant of the last feature map (the style taps lie upstream of it)."""
        if self.clean is None:
            return self.net.head
        cal, clean, head = self.calibration, self.clean, self.net.head
        style = None
        if "style" in clean.inputs:
            if x is None:
                raise ValueError("this model's clean head reads style statistics: cam_head needs the input batch")
            with torch.no_grad():
                style = self.net.embed(x)[1].float()

        def score(pooled: torch.Tensor) -> torch.Tensor:
            p = (torch.softmax(cal.logits(head(pooled)), dim=1) + clean.probs_t(pooled, style)) / 2
            return p.clamp_min(1e-12).log()
        return score


def save_model(net: CxrNet, meta: dict[str, Any], out_dir: Path, ood: Novelty | OodModel | None = None,
               clean: CleanHead | None = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(sd, str(out_dir / WEIGHTS))
    meta = dict(meta)
    meta.setdefault("classes", list(CLASSES))
    meta["arch"] = net.arch
    if isinstance(ood, OodModel):
        ood = Novelty({"content": ood}, {"content": 1.0}, ood.threshold)
    if ood is not None:
        save_file({k: v.contiguous() for k, v in ood.tensors().items()}, str(out_dir / OOD))
        meta["ood"] = ood.describe()
        meta.setdefault("verdict", {})["novelty_threshold"] = ood.threshold
    if clean is not None:
        save_file(clean.tensors(), str(out_dir / CLEAN_HEAD))
        meta["clean_head"] = clean.describe()
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
        ood = Novelty.from_tensors(load_file(str(model_dir / OOD)), meta["ood"])
    clean = None
    if "clean_head" in meta:
        if not (model_dir / CLEAN_HEAD).exists():
            raise FileNotFoundError(f"model.json names a clean head but {model_dir / CLEAN_HEAD} is missing")
        clean = CleanHead.from_tensors(load_file(str(model_dir / CLEAN_HEAD)), meta["clean_head"])
    return LoadedModel(net=net, meta=meta, ood=ood, channels_last=channels_last, clean=clean)
