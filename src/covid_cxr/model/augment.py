"""Acquisition-style augmentation: make one film look as if another hospital had processed it.

The Kaggle classes are confounded with their sources, so a network can learn a source's
look (sharpening, contrast curve, noise, compression) instead of the lungs. Each op here
imitates a step of some other site's processing chain and is applied at random, per sample,
on the uint8 greyscale film before the shared normalisation (preprocess.normalize_batch).

Every range and probability comes from params.yaml (`train.augment.acquisition`); nothing
here has a default. Training only: evaluation and serving never call this module.
"""
from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageFilter, ImageOps

Op = Callable[[np.ndarray, np.random.Generator, dict[str, Any]], np.ndarray]


def _u(rng: np.random.Generator, lo_hi) -> float:
    lo, hi = lo_hi
    return float(rng.uniform(lo, hi))


def unsharp(g: np.ndarray, rng, c) -> np.ndarray:
    f = ImageFilter.UnsharpMask(radius=_u(rng, c["radius"]), percent=int(_u(rng, c["percent"])), threshold=2)
    return np.asarray(Image.fromarray(g).filter(f))


def blur(g: np.ndarray, rng, c) -> np.ndarray:
    return np.asarray(Image.fromarray(g).filter(ImageFilter.GaussianBlur(_u(rng, c["sigma"]))))


def gamma(g: np.ndarray, rng, c) -> np.ndarray:
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** _u(rng, c["range"]) + 0.5, 0, 255).astype(np.uint8)
    return lut[g]


def contrast(g: np.ndarray, rng, c) -> np.ndarray:
    x = g.astype(np.float32) / 255.0
    m = float(x.mean())
    x = (x - m) * _u(rng, c["scale"]) + m + _u(rng, c["shift"])
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def equalize(g: np.ndarray, rng, c) -> np.ndarray:
    """A partial histogram equalisation: blend of the film and its equalised copy."""
    a = _u(rng, c["alpha"])
    eq = np.asarray(ImageOps.equalize(Image.fromarray(g)), dtype=np.float32)
    return np.clip((1 - a) * g + a * eq + 0.5, 0, 255).astype(np.uint8)


def noise(g: np.ndarray, rng, c) -> np.ndarray:
    x = g.astype(np.float32) + rng.normal(0.0, 255.0 * _u(rng, c["sigma"]), g.shape).astype(np.float32)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def jpeg(g: np.ndarray, rng, c) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="JPEG", quality=int(_u(rng, c["quality"])))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("L"))


def border(g: np.ndarray, rng, c) -> np.ndarray:
    """Black (or white) bands on one to four sides: other collimation, other crops."""
    h, w = g.shape
    out = g.copy()
    value = 0 if rng.random() < 0.8 else 255
    for side in range(4):
        if rng.random() < 0.5:
            k = int(_u(rng, c["frac"]) * (h if side < 2 else w))
            if k <= 0:
                continue
            if side == 0:
                out[:k] = value
            elif side == 1:
                out[h - k:] = value
            elif side == 2:
                out[:, :k] = value
            else:
                out[:, w - k:] = value
    return out


def marker(g: np.ndarray, rng, c) -> np.ndarray:
    """A bright burnt-in marker block (side letters, labels) in a random corner area."""
    h, w = g.shape
    s = max(2, int(_u(rng, c["size"]) * min(h, w)))
    y = int(rng.choice([rng.integers(0, max(1, h // 5)), rng.integers(max(0, 4 * h // 5 - s), max(1, h - s))]))
    x = int(rng.integers(0, max(1, w - s)))
    out = g.copy()
    out[y:y + s, x:x + max(2, s // 2)] = int(rng.integers(200, 256))
    return out


OPS: dict[str, Op] = {
    "unsharp": unsharp,
    "blur": blur,
    "gamma": gamma,
    "contrast": contrast,
    "equalize": equalize,
    "noise": noise,
    "jpeg": jpeg,
    "border": border,
    "marker": marker,
}


class Acquisition:
    """Callable (uint8 HxW, rng) -> uint8 HxW; each enabled op fires with its own probability.

    `cfg` is `train.augment.acquisition` from params.yaml: `{op: {p: float, ...ranges}}`.
    An op that is absent, or has p = 0, is off (that is how ablations switch parts off).
    The order is random per sample, as different sites chain their steps differently.
    """

    def __init__(self, cfg: dict[str, Any] | None):
        cfg = cfg or {}
        unknown = set(cfg) - set(OPS)
        if unknown:
            raise ValueError(f"unknown acquisition ops {sorted(unknown)}; known: {sorted(OPS)}")
        self.ops = [(name, OPS[name], spec) for name, spec in cfg.items() if float(spec["p"]) > 0]

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __call__(self, g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        order = rng.permutation(len(self.ops))
        for i in order:
            _, fn, spec = self.ops[i]
            if rng.random() < float(spec["p"]):
                g = fn(g, rng, spec)
        return np.array(g, dtype=np.uint8)  # writable, contiguous (PIL results are read-only)
