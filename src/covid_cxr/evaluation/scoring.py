"""Files -> model verdicts, in-process: the path shared by the `external` stage and batch scoring.

Pixels go through preprocess (the one transform) and the "not an X-ray" rules of data check,
then through `LoadedModel.predict`, exactly as the service does for an upload.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from covid_cxr.data.checkfilm import check_film
from covid_cxr.data.preprocess import MAX_PIXELS, SHOWN_MAX, ImageError, read_bytes, resize_gray
from covid_cxr.model.checkpoint import LoadedModel, Predictions


def load_film(src, size: int, min_side: int, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """-> ((size, size) uint8 film, the not-an-X-ray rule it fails or None). Raises ImageError."""
    film = check_film(read_bytes(src), min_side=min_side, max_pixels=max_pixels)
    return resize_gray(film.gray, size), film.rule


def score_paths(model: LoadedModel, paths: Sequence[Path], bs: int = 32, desc: str = "scoring"
                ) -> tuple[Predictions | None, list[int], dict[int, ImageError]]:
    """Score files in batches. -> (predictions for the readable files, their indices, errors by index)."""
    from covid_cxr.progress import tqdm

    films, rules, ok, errors = [], [], [], {}
    for i, p in enumerate(tqdm(paths, desc=f"{desc}: decode", unit="file", mininterval=5)):
        try:
            g, r = load_film(p, model.size, model.min_side)
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
    gate = None if parts[0].gate is None else np.concatenate([p.gate for p in parts])
    return Predictions(
        logits=np.concatenate([p.logits for p in parts]), probs=np.concatenate([p.probs for p in parts]),
        novelty=nov, novel=np.concatenate([p.novel for p in parts]),
        verdict=[v for p in parts for v in p.verdict], reason=[r for p in parts for r in p.reason], gate=gate)


# --------------------------------------------------------------------------- streaming (batch scoring)
#
# `covid-cxr predict` scores folders of any size: files are read, hashed and decoded in a small
# thread pool (Pillow's decoders, its resize and hashlib release the GIL) while the main thread
# runs the model on the previous batch, so decoding overlaps the forward pass instead of adding
# to it. Each file goes through the service's decode-and-check (data/checkfilm.py), then
# resize_gray and `LoadedModel.predict` on the batch.


@dataclass
class Film:
    """One decoded file: the model-size film, the not-an-X-ray rule it fails (or None), the
    file's sha256, and (when asked) the film as a report shows it (longest side <= SHOWN_MAX)."""

    small: np.ndarray
    rule: str | None
    sha256: str
    shown: np.ndarray | None = None
    info: dict | None = None      # width, height, mode, format, sha256 (checkfilm.CheckedFilm.info)


@dataclass
class Batch:
    """One step of `score_stream`: a contiguous run of input indices, every one of them either
    scored (`indices`, `films`, `preds` row by row), refused (`errors`: index -> (sha256 or None,
    ImageError)) or skipped by the caller's `skip` (`skipped`: index -> sha256)."""

    start: int
    stop: int
    indices: list[int]
    films: list[Film]
    preds: Predictions | None
    errors: dict[int, tuple[str | None, ImageError]]
    skipped: dict[int, str]
    forward_s: float = 0.0


def shown_film(gray: np.ndarray, max_side: int = SHOWN_MAX) -> np.ndarray:
    """The film as /explain and the report show it: downscaled (bilinear) to <= max_side."""
    from PIL import Image

    h, w = gray.shape
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return gray
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR))


def read_film(path: Path | str, size: int, *, min_side: int, keep_shown: bool = False,
              max_pixels: int = MAX_PIXELS, skip=None) -> Film | str:
    """Read, hash and decode one file the way the service decodes an upload.

    -> Film, or the file's sha256 (str) when `skip(sha256)` says it needs no scoring.
    Raises ImageError (with `.sha256` set when the bytes could be read).
    """
    import hashlib

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError("unreadable", f"cannot read the file: {e.strerror or e}") from None
    sha = hashlib.sha256(data).hexdigest()
    if skip is not None and skip(sha):
        return sha
    try:
        film = check_film(data, min_side=min_side, max_pixels=max_pixels, sha256=sha)
    except ImageError as e:
        e.sha256 = sha
        raise
    del data
    return Film(resize_gray(film.gray, size), film.rule, sha, shown_film(film.gray) if keep_shown else None,
                film.info)


def default_workers() -> int:
    import os

    return max(1, min(4, os.cpu_count() or 1))


def score_stream(model: LoadedModel, paths: Sequence[Path], bs: int = 32, *, workers: int | None = None,
                 keep_shown: bool = False, skip=None, max_pixels: int = MAX_PIXELS,
                 overlap: bool = True):
    """Yield `Batch`es over `paths` in order; each scored batch holds up to `bs` films.

    `skip(index, sha256) -> bool`: files already scored (the caller's resume set); they are
    hashed but not decoded. Decoding runs `workers` files ahead in a thread pool, so the next
    batch is being decoded while this one is in the model. Bad files never stop the stream.
    """
    import time
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or default_workers()
    # bounded read-ahead: memory stays O(bs), not O(len(paths)). Without `overlap`, the pool decodes
    # one batch's worth of files at a time and is idle while the model runs.
    ahead = max(2 * bs, 4 * workers) if overlap else bs

    def job(i: int):
        try:
            return read_film(paths[i], model.size, keep_shown=keep_shown, min_side=model.min_side, max_pixels=max_pixels,
                             skip=None if skip is None else (lambda sha: skip(i, sha)))
        except ImageError as e:
            return e
        except Exception as e:  # one odd file never stops a run; the type only (no content) in the reason
            return ImageError("corrupt", f"cannot decode the image ({type(e).__name__})")

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        nxt = 0
        start = 0
        idx: list[int] = []
        films: list[Film] = []
        errors: dict[int, tuple[str | None, ImageError]] = {}
        skipped: dict[int, str] = {}

        def flush(stop: int) -> Batch:
            preds, t = None, 0.0
            if films:
                t0 = time.perf_counter()
                preds = model.predict(np.stack([f.small for f in films]), not_xray=[f.rule for f in films])
                t = time.perf_counter() - t0
            return Batch(start, stop, list(idx), list(films), preds, dict(errors), dict(skipped), t)

        while nxt < len(paths) or pending:
            while nxt < len(paths) and len(pending) < ahead and (overlap or not pending):
                pending.append((nxt, pool.submit(job, nxt)))
                nxt += 1
            i, fut = pending.popleft()
            out = fut.result()
            if isinstance(out, Film):
                idx.append(i)
                films.append(out)
            elif isinstance(out, str):
                skipped[i] = out
            else:
                errors[i] = (getattr(out, "sha256", None), out)
            # a full batch, or a long run of skips/errors (keeps the caller's appends small and regular)
            if len(films) >= bs or len(skipped) + len(errors) >= 4 * bs:
                yield flush(i + 1)
                start = i + 1
                idx.clear(), films.clear(), errors.clear(), skipped.clear()
        if start < len(paths):
            yield flush(len(paths))
