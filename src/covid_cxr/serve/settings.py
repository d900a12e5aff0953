"""The service's settings, read from environment variables at start-up.

    COVID_CXR_MAX_UPLOAD_MB (20)            request bodies / single files above this -> 413
    COVID_CXR_MAX_PIXELS (100000000)        decoded image area above this -> 413 (checked before decoding)
    COVID_CXR_MIN_SIDE (16)                 smaller images -> 422
    COVID_CXR_MAX_BATCH_FILES (32)          files per /predict_batch request
    COVID_CXR_BATCH_MAX_SIZE (16)           images per forward pass (adaptive batching, at least 2)
    COVID_CXR_BATCH_MAX_LATENCY_MS (1000)   the longest an image may wait in the batching queue
    COVID_CXR_API_TOKEN                     if set, every endpoint but /, /static/*, /healthz, /livez
                                            and /readyz needs `Authorization: Bearer <token>` (401)
    COVID_CXR_TORCH_THREADS                 torch intra-op threads (default: all cores but one)

(Not to be confused with `covid_cxr.data.imagecheck.Limits`, the data rules of `data check`.)
"""
from __future__ import annotations

import os

from covid_cxr.data.preprocess import MAX_PIXELS, MIN_SIDE


def env_num(name: str, default: float) -> float:
    """A positive number from the environment; `default` when unset or blank, ValueError naming
    the variable when it is not a positive number."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {raw}")
    return v


class ServeSettings:
    """Request limits, batching and auth of the HTTP service (see the module docstring)."""

    def __init__(self) -> None:
        self.max_upload_bytes = int(env_num("COVID_CXR_MAX_UPLOAD_MB", 20) * 1024 * 1024)
        self.max_pixels = int(env_num("COVID_CXR_MAX_PIXELS", MAX_PIXELS))
        self.min_side = int(env_num("COVID_CXR_MIN_SIDE", MIN_SIDE))
        self.max_files = int(env_num("COVID_CXR_MAX_BATCH_FILES", 32))
        self.batch_max_size = max(2, int(env_num("COVID_CXR_BATCH_MAX_SIZE", 16)))
        self.batch_max_latency_ms = int(env_num("COVID_CXR_BATCH_MAX_LATENCY_MS", 1000))
        self.token = os.environ.get("COVID_CXR_API_TOKEN") or None


def default_torch_threads() -> int:
    """All cores but one: the event loop, multipart parsing and decoding need a core of their
    own, or they stall the forward pass they feed (and vice versa)."""
    return max(1, (os.cpu_count() or 1) - 1)


def torch_threads() -> int:
    """COVID_CXR_TORCH_THREADS, else `default_torch_threads()`."""
    return int(env_num("COVID_CXR_TORCH_THREADS", default_torch_threads()))
