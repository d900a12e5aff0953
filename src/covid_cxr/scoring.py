"""Files -> model verdicts, in-process: the path shared by the `external` stage and batch scoring.

Pixels go through preprocess (the one transform) and the "not an X-ray" rules of data check,
then through `LoadedModel.predict`, exactly as the service does for an upload.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .xrayrule import xray_rule
from .model_io import LoadedModel, Predictions
from .preprocess import MAX_PIXELS, ImageError, open_image, resize_gray, to_gray


def load_film(src, size: int, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """-> ((size, size) uint8 film, the not-an-X-ray rule it fails or None). Raises ImageError."""
    im = open_image(src, max_pixels=max_pixels)
    gray = to_gray(im)
    return resize_gray(gray, size), xray_rule(im, gray)


def score_paths(model: LoadedModel, paths: Sequence[Path], bs: int = 32, desc: str = "scoring"
                ) -> tuple[Predictions | None, list[int], dict[int, ImageError]]:
    """Score files in batches. -> (predictions for the readable files, their indices, errors by index)."""
    from .progress import tqdm

    films, rules, ok, errors = [], [], [], {}
    for i, p in enumerate(tqdm(paths, desc=f"{desc}: decode", unit="file", mininterval=5)):
        try:
            g, r = load_film(p, model.size)
        except ImageError as e:
            errors[i] = e
            continue
        films.append(g)
        rules.append(r)
        ok.append(i)
    if not films:
        return None, ok, errors
    parts = []
    for j in tqdm(range(0, len(films), bs), desc=f"{desc}: model", unit="batch", mininterval=5):
        parts.append(model.predict(np.stack(films[j:j + bs]), not_xray=rules[j:j + bs]))
    return concat(parts), ok, errors


def concat(parts: Sequence[Predictions]) -> Predictions:
    nov = None if parts[0].novelty is None else np.concatenate([p.novelty for p in parts])
    return Predictions(
        logits=np.concatenate([p.logits for p in parts]), probs=np.concatenate([p.probs for p in parts]),
        novelty=nov, novel=np.concatenate([p.novel for p in parts]),
        verdict=[v for p in parts for v in p.verdict], reason=[r for p in parts for r in p.reason])
