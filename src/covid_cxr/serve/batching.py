"""Adaptive batching: concurrent requests' images merged into one forward pass.

Each request hands over its decoded, model-size images with the not-an-X-ray rule each one
failed (or None); BentoML's adaptive batching dispatcher queues them and calls the model on
whatever has gathered, at most `max_batch_size` images at a time, within `max_latency_ms`.
Each request gets back its own rows of the model's `Predictions`, in its own order.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from bentoml.exceptions import ServiceUnavailable

from covid_cxr.serve.bentoml_private import CorkDispatcher

if TYPE_CHECKING:   # torch is the worker's, never the supervising process's (service.py imports this)
    from covid_cxr.model.checkpoint import Predictions

Predict = Callable[[np.ndarray, Sequence["str | None"]], "Predictions"]


class Overloaded(RuntimeError):
    """The batching queue gave up on a request (503)."""


@dataclass(frozen=True)
class Scored:
    """One request's images after the forward pass(es) they were part of."""

    pred: "Predictions"  # one row per image, in the order they were handed over
    forward_ms: float    # the longest of those forward passes
    batch_size: int      # the largest of those forward batches


@dataclass(frozen=True)
class _Row:
    """One image's place in one forward pass."""

    out: "Predictions"   # the whole forward batch
    i: int
    forward_ms: float


def _gather(rows: Sequence[_Row]) -> "Predictions":
    """The rows, from one forward pass or two, as one Predictions."""
    from covid_cxr.model.checkpoint import Predictions

    return Predictions(
        logits=np.stack([r.out.logits[r.i] for r in rows]),
        probs=np.stack([r.out.probs[r.i] for r in rows]),
        novelty=None if rows[0].out.novelty is None else np.stack([r.out.novelty[r.i] for r in rows]),
        novel=np.array([r.out.novel[r.i] for r in rows], bool),
        verdict=[r.out.verdict[r.i] for r in rows],
        reason=[r.out.reason[r.i] for r in rows],
        gate=None if rows[0].out.gate is None else np.stack([r.out.gate[r.i] for r in rows]),
    )


class Batcher:
    """`await batcher(grays, rules)` -> Scored, for model-size (S,S) uint8 images and their
    not-an-X-ray rules; `predict(grays, rules)` is `LoadedModel.predict`.

    A job is one request's list of (image, rule) pairs: the dispatcher may split a long one
    across two forward passes, and hands back one `_Row` per image.
    """

    def __init__(self, predict: Predict, max_batch_size: int, max_latency_ms: int) -> None:
        def overloaded() -> None:
            raise ServiceUnavailable("the model queue is full; retry shortly")

        self.predict = predict
        self.sizes: Counter[int] = Counter()
        self._cork = CorkDispatcher(
            max_latency_in_ms=max_latency_ms,
            max_batch_size=max_batch_size,
            fallback=overloaded,
            get_batch_size=len,
            batch_dim=(0, 0),
        )
        self._call = self._cork(self._run)

    def _run(self, jobs: Sequence[list[tuple[np.ndarray, str | None]]]) -> list[list[_Row]]:
        items = [it for job in jobs for it in job]
        t0 = time.perf_counter()
        out = self.predict(np.stack([g for g, _ in items]), [r for _, r in items])
        ms = 1000 * (time.perf_counter() - t0)
        self.sizes[len(items)] += 1
        rows = [_Row(out, i, ms) for i in range(len(items))]
        res, i = [], 0
        for job in jobs:
            res.append(rows[i:i + len(job)])
            i += len(job)
        return res

    async def __call__(self, grays: Sequence[np.ndarray], rules: Sequence[str | None]) -> Scored:
        try:
            rows = await self._call(list(zip(grays, rules)))
        except ServiceUnavailable as e:
            raise Overloaded(str(e)) from None
        return Scored(_gather(rows), max(r.forward_ms for r in rows), max(len(r.out.probs) for r in rows))

    def shutdown(self) -> None:
        self._cork.shutdown()
