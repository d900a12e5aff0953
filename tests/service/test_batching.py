"""Unit tests of the adaptive batcher (serve/batching.py), in-process, with a fake model:
concurrent requests share forward passes, a request longer than the room left in a pass
is split across two, and every request gets its own rows of `Predictions` back, in order,
with its own not-an-X-ray rules applied."""
from __future__ import annotations

import asyncio
import time

import numpy as np

from covid_cxr.model.checkpoint import Predictions
from covid_cxr.model.verdict import Policy, decide
from covid_cxr.serve.batching import Batcher, Overloaded, Scored


def fake_predict(calls: list[int]):
    """Class probabilities from each image's constant value v: p = softmax([v, 0, 0]/50)."""

    def predict(grays, not_xray=None) -> Predictions:
        calls.append(len(grays))
        v = grays.reshape(len(grays), -1)[:, 0].astype(np.float64)
        logits = np.stack([v / 50, np.zeros_like(v), np.zeros_like(v)], axis=1)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        novelty = v / 1000
        novel = novelty > 0.2
        verdict, reason = decide(probs, novel, Policy(min_confidence=0.0, covid_triage=None), not_xray)
        return Predictions(logits, probs, novelty, novel, verdict, reason)

    return predict


ONE = {"passes": 1, "threads": 1, "set_threads": lambda n: None}   # one pass at a time


def image(v: int) -> np.ndarray:
    return np.full((8, 8), v, np.uint8)


def test_requests_share_forward_passes_and_get_their_own_rows_back():
    calls: list[int] = []

    async def go() -> list[Scored]:
        b = Batcher(fake_predict(calls), max_batch_size=4, max_latency_ms=200, **ONE)
        jobs = [[10], [20, 30, 250], [40, 50], [60]]
        rules = [[None], [None, "not_xray_blank", None], [None, None], ["not_xray_colour"]]
        try:
            return await asyncio.gather(*(b([image(v) for v in job], r) for job, r in zip(jobs, rules)))
        finally:
            assert sum(n * k for n, k in b.sizes.items()) == sum(calls) == 7
            b.shutdown()

    out = asyncio.run(go())
    assert max(calls) <= 4 and len(calls) < 7  # batched, never over max_batch_size
    assert all(isinstance(s, Scored) and isinstance(s.pred, Predictions) for s in out)
    expect = [[10], [20, 30, 250], [40, 50], [60]]
    for s, vals in zip(out, expect):
        assert s.pred.probs.shape == (len(vals), 3) and s.pred.logits.shape == (len(vals), 3)
        np.testing.assert_allclose(s.pred.logits[:, 0], np.array(vals) / 50)
        np.testing.assert_allclose(s.pred.novelty, np.array(vals) / 1000)
        assert 1 <= s.batch_size <= 4 and s.forward_ms >= 0
    assert out[1].pred.reason == [None, "not_an_xray", "outside_training_data"]
    assert out[1].pred.verdict == ["ok", "refer", "refer"] and out[1].pred.novel.tolist() == [False, False, True]
    assert out[3].pred.reason == ["not_an_xray"] and out[0].pred.reason == [None]
    assert out[0].pred.labels == ["COVID"]  # logits (0.2, 0, 0)


def test_a_request_longer_than_a_batch_is_split_and_reassembled():
    calls: list[int] = []

    async def go() -> Scored:
        b = Batcher(fake_predict(calls), max_batch_size=3, max_latency_ms=50, **ONE)
        try:
            return await b([image(v) for v in range(0, 140, 20)], [None] * 7)
        finally:
            b.shutdown()

    s = asyncio.run(go())
    assert max(calls) <= 3 and sum(calls) == 7
    np.testing.assert_allclose(s.pred.logits[:, 0], np.arange(0, 140, 20) / 50)
    assert len(s.pred.verdict) == len(s.pred.reason) == 7 and s.batch_size <= 3


def test_a_lone_request_is_answered_at_once_in_a_pass_of_its_own():
    calls: list[int] = []

    async def go() -> float:
        b = Batcher(fake_predict(calls), max_batch_size=16, max_latency_ms=60_000, **ONE)
        try:
            t = time.perf_counter()
            for v in (10, 20, 30):                        # one after another: nobody to wait for
                await b([image(v)], [None])
            return time.perf_counter() - t
        finally:
            b.shutdown()

    took = asyncio.run(go())
    assert calls == [1, 1, 1]
    assert took < 1.0, took                               # no waiting for company (the fake model is instant)


def test_films_arriving_during_a_pass_share_the_next_one():
    calls: list[int] = []
    slow = fake_predict(calls)

    def predict(grays, rules=None):
        time.sleep(0.2)
        return slow(grays, rules)

    async def go():
        b = Batcher(predict, max_batch_size=8, max_latency_ms=60_000, **ONE)
        try:
            first = asyncio.create_task(b([image(1)], [None]))
            await asyncio.sleep(0.05)                      # the first pass is running
            rest = [b([image(v)], [None]) for v in (2, 3, 4)]
            return await asyncio.gather(first, *rest)
        finally:
            b.shutdown()

    out = asyncio.run(go())
    assert calls == [1, 3] and [s.batch_size for s in out] == [1, 3, 3, 3]
    np.testing.assert_allclose([s.pred.logits[0, 0] for s in out], np.array([1, 2, 3, 4]) / 50)


def test_a_request_that_waits_too_long_is_refused_and_the_rest_go_on():
    calls: list[int] = []
    fast = fake_predict(calls)

    def predict(grays, rules=None):
        time.sleep(0.3)
        return fast(grays, rules)

    async def go():
        b = Batcher(predict, max_batch_size=1, max_latency_ms=100, **ONE)
        try:
            first = asyncio.create_task(b([image(1)], [None]))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(b([image(2)], [None]))   # waits 250 ms behind the first pass
            done = await asyncio.gather(first, second, return_exceptions=True)
            again = await b([image(3)], [None])                      # the queue is free again
            return done, again
        finally:
            b.shutdown()

    (first, second), again = asyncio.run(go())
    assert isinstance(first, Scored) and isinstance(second, Overloaded) and "retry" in str(second)
    assert isinstance(again, Scored) and calls == [1, 1]


def test_a_failing_pass_fails_its_requests_only():
    calls: list[int] = []
    ok = fake_predict(calls)

    def predict(grays, rules=None):
        if (grays == 99).all():
            raise RuntimeError("boom")
        return ok(grays, rules)

    async def go():
        b = Batcher(predict, max_batch_size=4, max_latency_ms=60_000, **ONE)
        try:
            bad = await asyncio.gather(b([image(99)], [None]), return_exceptions=True)
            good = await b([image(5)], [None])
            return bad[0], good
        finally:
            b.shutdown()

    bad, good = asyncio.run(go())
    assert isinstance(bad, RuntimeError) and isinstance(good, Scored) and good.pred.logits.shape == (1, 3)


def test_two_passes_run_at_once_and_split_the_threads():
    import threading

    calls: list[int] = []
    fast = fake_predict(calls)
    seen: list[tuple[int, int]] = []                       # (threads of this pass, passes running)
    running, lock = [0], threading.Lock()
    local = threading.local()

    def predict(grays, rules=None):
        with lock:
            running[0] += 1
            seen.append((local.threads, running[0]))
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return fast(grays, rules)

    def set_threads(n):
        local.threads = n

    async def go():
        b = Batcher(predict, max_batch_size=1, max_latency_ms=60_000, passes=2, threads=2, set_threads=set_threads)
        try:
            lone = await b([image(1)], [None])                       # alone: both threads
            t = time.perf_counter()
            both = await asyncio.gather(b([image(2)], [None]), b([image(3)], [None]))
            return lone, both, time.perf_counter() - t
        finally:
            b.shutdown()

    lone, both, took = asyncio.run(go())
    assert seen[0] == (2, 1)
    assert sorted(seen[1:]) == [(1, 1), (1, 2)] or sorted(seen[1:]) == [(1, 2), (1, 2)]
    assert took < 0.35, took                                  # side by side, not one after the other
    np.testing.assert_allclose([s.pred.logits[0, 0] for s in both], [2 / 50, 3 / 50])


def test_a_split_request_stays_in_order_when_its_later_pass_finishes_first():
    """Two passes at once: the second, smaller pass of a split request ends before the first."""
    calls: list[int] = []
    fast = fake_predict(calls)

    def predict(grays, rules=None):
        time.sleep(0.05 * len(grays))                            # a bigger pass takes longer
        return fast(grays, rules)

    async def go() -> Scored:
        b = Batcher(predict, max_batch_size=4, max_latency_ms=60_000, passes=2, threads=2,
                    set_threads=lambda n: None)
        try:
            return await b([image(v) for v in range(0, 60, 10)], [None] * 6)   # passes of 4 and 2 at once
        finally:
            b.shutdown()

    s = asyncio.run(go())
    assert calls == [2, 4]                                       # the pass of 2 ended first
    np.testing.assert_allclose(s.pred.logits[:, 0], np.arange(0, 60, 10) / 50)
    np.testing.assert_allclose(s.pred.novelty, np.arange(0, 60, 10) / 1000)
