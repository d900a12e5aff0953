"""Shortcut probes for the evaluation report: is the model reading the lungs, or the film around them?

Reported only; no gate reads them.
- accuracy with the central lung field blanked (filled with the film's mean grey): a model
  that still scores high is reading borders, markers and the source's look;
- accuracy with everything *outside* the lung field blanked: what the lungs alone support;
- the share of Grad-CAM mass inside the central lung field (its share of the image area is
  the level a map blind to anatomy would reach), on a seeded sample of `evaluate.cam_films`
  test films: a backward pass per film is the probe's cost, and its mean settles within a few
  hundred films.
The lung field is a fixed central box (`evaluate.lung_box`: top, bottom, left, right as
fractions of the side), which is where the lungs sit on a frontal chest film.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from covid_cxr.config import CLASSES


def box_mask(size: int, box: Sequence[float]) -> np.ndarray:
    top, bottom, left, right = (int(round(f * size)) for f in box)
    m = np.zeros((size, size), bool)
    m[top:bottom, left:right] = True
    return m


def blank(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Copies of (N,S,S) uint8 films with `mask` filled by each film's mean grey."""
    out = np.array(images, copy=True)
    fill = out.reshape(len(out), -1).mean(1).round().astype(np.uint8)
    out[:, mask] = fill[:, None]
    return out


def cam_sample(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `k` of `n` films (all of them when k >= n), the same for the same n."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def shortcut_probes(model, images: np.ndarray, y: np.ndarray, box: Sequence[float], cam_films: int,
                    bs: int = 64) -> dict[str, Any]:
    import torch

    from covid_cxr.model.gradcam import gradcam

    mask = box_mask(model.size, box)

    def accuracy(imgs: np.ndarray) -> tuple[float, np.ndarray]:
        pred = np.concatenate([model.predict(imgs[i:i + bs]).probs.argmax(1) for i in range(0, len(imgs), bs)])
        return float((pred == y).mean()), pred

    acc_no_lung, pred_no_lung = accuracy(blank(images, mask))
    acc_lung_only, _ = accuracy(blank(images, ~mask))
    mass = []
    cam_idx = cam_sample(len(images), int(cam_films))
    for i in range(0, len(cam_idx), bs):
        x = model.to_input(np.asarray(images[cam_idx[i:i + bs]]))
        with torch.inference_mode(False):
            cams, _, _ = gradcam(model.net, x, None, head=model.cam_head(x))
        tot = cams.reshape(len(cams), -1).sum(1)
        inside = cams[:, mask].sum(1)
        mass.append(np.where(tot > 0, inside / np.maximum(tot, 1e-12), np.nan))
    mass = np.concatenate(mass)
    return {
        "lung_box": list(box),
        "box_area_share": float(mask.mean()),
        "accuracy_lung_blanked": acc_no_lung,
        "accuracy_outside_blanked": acc_lung_only,
        "label_mix_lung_blanked": {c: float((pred_no_lung == i).mean()) for i, c in enumerate(CLASSES)},
        "cam_films": int(len(cam_idx)),
        "cam_mass_in_lung_mean": float(np.nanmean(mass)),
        "cam_mass_in_lung_median": float(np.nanmedian(mass)),
    }
