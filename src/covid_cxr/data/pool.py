"""The package's one process pool: `process_map`, used by the per-file stats (`filestats`) and the
decoded-image cache (`data.cache`)."""
from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

POOL_CHUNK = 64  # items per task handed to a pool process


@contextmanager
def process_map(fn: Callable, items: Sequence, workers: int, *, min_items: int) -> Iterator[Iterator]:
    """`fn` over `items`, in order: in `workers` forked processes, or serially in this one.

    A pool only for `workers` > 1 and at least `min_items` items, and only from a single-threaded
    process (the CLI / a DVC stage): forking a threaded one (a Prefect worker, a server) can
    deadlock on a lock held by another thread; there, and without fork, the items run serially.
    Every item is submitted (so the processes forked) before this yields: start progress bars
    (tqdm's monitor thread) inside the `with`. The pool is shut down on leaving it.
    """
    ctx = None
    if workers > 1 and len(items) >= min_items and threading.active_count() == 1:
        try:
            ctx = multiprocessing.get_context("fork")
        except ValueError:  # no fork on this platform
            ctx = None
    pool = ProcessPoolExecutor(workers, mp_context=ctx) if ctx else None
    try:
        yield pool.map(fn, items, chunksize=POOL_CHUNK) if pool else map(fn, items)
    finally:
        if pool:
            pool.shutdown()
