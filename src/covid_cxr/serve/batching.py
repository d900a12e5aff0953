"""Batching: concurrent requests' films merged into one forward pass, without waiting for company.

Whenever the model is free, every film queued so far (up to `max_batch_size`) goes into one
forward pass, on the model's own thread; films that arrive meanwhile queue for the next pass. A
lone request is answered at once (one forward pass, no waiting), and under load the passes fill by
themselves: the longer a pass takes, the more films gather behind it. A request whose films
waited longer than `max_latency_ms` before their pass started is refused (Overloaded, a 503).

This replaced BentoML's adaptive dispatcher (a private class, `CorkDispatcher`), which holds a lone
request back while it expects others and polls its queue every millisecond: on a CPU-bound model
its single-request latency was 3.8x one forward pass (bench/bench_service.py, docs/serving.md).

Each request hands over its model-size films with the not-an-X-ray rule each one failed (or
None) and gets back its own rows of the model's `Predictions`, in its own order; a request with
more films than a pass holds is split across passes.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:   # torch is the worker's, never the supervising process's (service.py imports this)
    from covid_cxr.model.checkpoint import Predictions

Predict = Callable[[np.ndarray, Sequence["str | None"]], "Predictions"]


class Overloaded(RuntimeError):
    """A request waited longer than the batching latency limit (503)."""


@dataclass(frozen=True)
class Scored:
    """One request's films after the forward pass(es) they were part of."""

    pred: "Predictions"  # one row per film, in the order they were handed over
    forward_ms: float    # the longest of those forward passes
    batch_size: int      # the largest of those forward batches


@dataclass(frozen=True)
class _Row:
    """One film's place in one forward pass."""

    out: "Predictions"   # the whole forward batch
    i: int
    forward_ms: float


@dataclass(eq=False)
class _Job:
    """One request: its films, the next one to schedule, the rows it got back."""

    items: list[tuple[np.ndarray, "str | None"]]
    future: asyncio.Future
    enqueued: float
    next: int = 0
    rows: dict[int, _Row] = field(default_factory=dict)   # film position -> its row (passes may finish out of order)


def _gather(rows: Sequence[_Row]) -> "Predictions":
    """The rows, from one forward pass or several, as one Predictions."""
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
    """`await batcher(grays, rules)` -> Scored, for model-size (S,S) uint8 films and their
    not-an-X-ray rules; `predict(grays, rules)` is `LoadedModel.predict`.

    Up to `passes` forward passes run at once, each on a thread of its own (a slot). A pass takes
    the lowest free slot. A pass that starts alone runs on slot 0 with all `threads` (`set_threads`,
    torch.set_num_threads, which is per calling thread); passes that start beside another run on
    one thread each. So a lone request gets every core, and under load two one-thread passes keep
    the cores busy while the other's answers go out. Only slot 0 ever has an OpenMP team: with two teams on 2 cores, libgomp stops spinning between parallel
    regions and a lone pass took 2.3x as long (docs/serving.md). Whatever else in the worker runs
    torch (loading the model, Grad-CAM) runs on slot 0 too: `on_model_thread`.
    """

    def __init__(self, predict: Predict, max_batch_size: int, max_latency_ms: int, passes: int, threads: int,
                 set_threads: Callable[[int], None]) -> None:
        self.predict = predict
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_latency_ms) / 1000
        self.streams = int(passes)
        self.threads, self.set_threads = int(threads), set_threads
        self.sizes: Counter[int] = Counter()
        self._queue: deque[_Job] = deque()
        # one thread per pass slot; a pass takes the lowest free slot, so a lone request always runs on
        # slot 0: torch's OpenMP team of another thread would spin beside it (measured: 2.3x slower)
        self._slots = [ThreadPoolExecutor(1, thread_name_prefix=f"covid-cxr-model-{i}") for i in range(self.streams)]
        self._free = list(range(self.streams))
        self._running: set[asyncio.Task] = set()

    async def __call__(self, grays: Sequence[np.ndarray], rules: Sequence[str | None]) -> Scored:
        loop = asyncio.get_running_loop()
        job = _Job(list(zip(grays, rules)), loop.create_future(), time.monotonic())
        if not job.items:
            raise ValueError("no films to score")
        self._queue.append(job)
        self._start_passes()
        rows: list[_Row] = await job.future   # in the request's own order
        return Scored(_gather(rows), max(r.forward_ms for r in rows), max(len(r.out.probs) for r in rows))

    def _next_batch(self) -> list[tuple[_Job, int, int]]:
        """Films for one pass, first come first served: (job, first, end) per job."""
        batch, room, now = [], self.max_batch_size, time.monotonic()
        while self._queue and room:
            job = self._queue[0]
            if job.future.done():                              # cancelled (the client left) or failed
                self._queue.popleft()
                continue
            if job.next == 0 and now - job.enqueued > self.max_wait:
                self._queue.popleft()
                job.future.set_exception(Overloaded(
                    f"the model queue is full: waited over {self.max_wait * 1000:.0f} ms; retry shortly"))
                continue
            take = min(room, len(job.items) - job.next)
            batch.append((job, job.next, job.next + take))
            job.next += take
            room -= take
            if job.next == len(job.items):
                self._queue.popleft()
        return batch

    def _start_passes(self) -> None:
        """Start a forward pass on every free stream while films are queued."""
        while self._queue and len(self._running) < self.streams:
            batch = self._next_batch()
            if not batch:
                continue
            self._free.sort()
            task = asyncio.get_running_loop().create_task(self._pass(batch, self._free.pop(0)))
            self._running.add(task)

    async def _pass(self, batch: list[tuple[_Job, int, int]], slot: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            items = [it for job, a, b in batch for it in job.items[a:b]]
            threads = self.threads if slot == 0 and len(self._running) == 1 else 1   # alone: every core

            def run():
                self.set_threads(threads)
                return self.predict(np.stack([g for g, _ in items]), [r for _, r in items])

            t0 = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._slots[slot], run)
            except Exception as e:  # noqa: BLE001  (each request of the pass gets the error, the rest go on)
                for job, _, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                return
            ms = 1000 * (time.perf_counter() - t0)
            self.sizes[len(items)] += 1
            i = 0
            for job, a, b in batch:
                job.rows.update((a + k, _Row(out, i + k, ms)) for k in range(b - a))
                i += b - a
                if len(job.rows) == len(job.items) and not job.future.done():
                    job.future.set_result([job.rows[k] for k in range(len(job.items))])
        finally:
            self._running.discard(asyncio.current_task())
            self._free.append(slot)
            self._start_passes()

    async def on_model_thread(self, fn: Callable, *args):
        """fn(*args) on slot 0's thread, with all threads (queued behind a pass running there)."""
        def run():
            self.set_threads(self.threads)
            return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._slots[0], run)

    def shutdown(self) -> None:
        for task in list(self._running):
            task.cancel()
        for pool in self._slots:
            pool.shutdown(wait=False, cancel_futures=True)
