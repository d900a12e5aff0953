"""The service with BentoML's documented adaptive batching instead of its own dispatcher.

For bench/bench_service.py and experiments/batching/bench_batching.py only
(`--service experiments.batching.batching_variants:SelfCall` or `:Composed`, from the repository root):
the same routes, decoding, answers and prediction log as covid_cxr.serve.service:CovidCxr;
only the way the decoded images reach the model differs.

    SelfCall   a `@bentoml.api(batchable=True)` method on the service itself, called from the
               API methods through the service's own client (`self.to_async.forward`), which
               BentoML routes in-process through its HTTP app (JSON body), so the call gets
               the API's adaptive batching.
    Composed   the model in a second service, `Forward`, with that batchable API, and the
               front service depending on it (`bentoml.depends`): a second process, called
               over a local socket (pickle body).

Both hand the model a (N,S,S) uint8 array and get back one float row per image:
[p(class) x C, novelty (nan without a novelty model), novel (0/1), forward ms, batch size].
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Sequence

import anyio
import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable

from covid_cxr.config import CLASSES
from covid_cxr.model.checkpoint import Predictions
from covid_cxr.model.verdict import Policy, decide
from covid_cxr.serve.batching import Overloaded, Scored
from covid_cxr.serve.guard import GuardMiddleware
from covid_cxr.serve.modelsource import locate_model
from covid_cxr.serve.service import CovidCxr
from covid_cxr.serve.settings import ServeSettings, torch_threads

S = ServeSettings()
BATCH = dict(batchable=True, max_batch_size=S.batch_max_size, max_latency_ms=S.batch_max_latency_ms)


def packed_forward(model: Any, grays: np.ndarray, sizes: Counter) -> np.ndarray:
    t0 = time.perf_counter()
    out = model.predict(np.asarray(grays, np.uint8))
    ms = 1000 * (time.perf_counter() - t0)
    n = len(grays)
    sizes[n] += 1
    nov = out.novelty if out.novelty is not None else np.full(n, np.nan)
    return np.concatenate([out.probs.astype(np.float64), nov.astype(np.float64)[:, None],
                           out.novel.astype(np.float64)[:, None], np.full((n, 2), (ms, n), np.float64)], axis=1)


class ApiBatcher:
    """Batcher's interface over a batchable BentoML API `call(grays) -> packed rows`."""

    def __init__(self, call: Callable[[np.ndarray], Any], policy: Policy, sizes: Counter | None = None) -> None:
        self.call, self.policy = call, policy
        self.sizes: Counter[int] = sizes if sizes is not None else Counter()

    async def __call__(self, grays: Sequence[np.ndarray], rules: Sequence[str | None]) -> Scored:
        try:
            rows = np.asarray(await self.call(np.stack(grays)), np.float64)
        except ServiceUnavailable as e:  # the batchable API's dispatcher shed it (503)
            raise Overloaded(str(e)) from None
        c = len(CLASSES)
        probs, nov, novel = rows[:, :c], rows[:, c], rows[:, c + 1].astype(bool)
        verdict, reason = decide(probs, novel, self.policy, rules)
        pred = Predictions(np.log(probs), probs, None if np.isnan(nov).all() else nov, novel, verdict, reason)
        return Scored(pred, float(rows[:, -2].max()), int(rows[:, -1].max()))

    def shutdown(self) -> None:
        pass


def keep_session(client: Any) -> Any:
    """Work around BentoML issue #5540 (1.4.31 and later, open): the client that calls another
    service, or the service itself, replaces its aiohttp session every 100 requests or 300 s and
    closes the old one under the requests still in flight on it, which then fail (a 500 to our
    caller) under concurrent load. Without this the variants below cannot finish a benchmark."""
    sm = client._session_manager
    sm.max_requests, sm.max_age = 10**12, 1e12
    return client


async def _warm(self: Any, client: Callable[[], Any], sizes: Counter | None = None) -> None:
    """_load_and_warm with an ApiBatcher over `client().forward` (the client exists only once
    BentoML has started the service)."""
    import asyncio

    try:
        await anyio.to_thread.run_sync(self._load)
        c = keep_session(client())
        self.batcher = ApiBatcher(lambda x: c.forward(x), self.model.policy, sizes)
        z = np.zeros((self.model.size, self.model.size), np.uint8)
        for _ in range(4):
            await asyncio.gather(*(self.batcher([z], [None]) for _ in range(4)))
        self.batcher.sizes.clear()
        self.ready = True
    except Exception as e:
        self.load_error = f"{type(e).__name__}: {e}"
        raise


class _SelfCall(CovidCxr.inner):
    @bentoml.api(route="/forward", **BATCH)
    def forward(self, grays: np.ndarray) -> np.ndarray:
        return packed_forward(self.model, grays, self._sizes)

    async def _load_and_warm(self) -> None:
        self._sizes: Counter[int] = Counter()
        await _warm(self, lambda: self.to_async, self._sizes)


@bentoml.service(name="covid_cxr_forward", workers=1, traffic={"timeout": 120})
class Forward:
    def __init__(self) -> None:
        import torch

        from covid_cxr.model.checkpoint import load_model

        torch.set_num_threads(torch_threads())
        self.model = load_model(locate_model(None, None)[0])  # COVID_CXR_MODEL_DIR
        self.model.predict(np.zeros((1, self.model.size, self.model.size), np.uint8))
        self.sizes: Counter[int] = Counter()

    @bentoml.api(**BATCH)
    def forward(self, grays: np.ndarray) -> np.ndarray:
        return packed_forward(self.model, grays, self.sizes)


class _Composed(CovidCxr.inner):
    forward_svc = bentoml.depends(Forward)

    async def _load_and_warm(self) -> None:
        await _warm(self, lambda: self.forward_svc.to_async)


SelfCall = bentoml.service(name="covid_cxr", workers=1, traffic={"timeout": 120})(_SelfCall)
SelfCall.add_asgi_middleware(GuardMiddleware)
Composed = bentoml.service(name="covid_cxr", workers=1, traffic={"timeout": 120})(_Composed)
Composed.add_asgi_middleware(GuardMiddleware)
