"""The near-duplicate fingerprint (`dhash`): a 64-bit band-pass SimHash of the 40x40 thumbnail.

Also the thumbnail's cache encoding (`encode_thumb` / `decode_thumbs`) and `hamming`. Why a plain
dHash fails on chest X-rays, and what this one catches (measured): docs/data-checks.md.
"""
from __future__ import annotations

import base64
from typing import Sequence

import numpy as np

from covid_cxr.data.xrayrule import THUMB_GRID

# Perceptual hash constants. The stats cache is keyed by a digest of this file (see
# `filestats._code_digest`), so edits here invalidate it.
HASH_SIGMA = 2.5
HASH_SEED = 20240611

# The 40x40 thumbnail lives in xrayrule.py: serving and batch scoring use it too.
HASH_GRID = THUMB_GRID


_PROJ: np.ndarray | None = None


def _projection() -> np.ndarray:
    global _PROJ
    if _PROJ is None:
        # Legacy RandomState: its stream is frozen by NumPy, so hashes are stable across versions.
        _PROJ = np.random.RandomState(HASH_SEED).standard_normal((64, HASH_GRID * HASH_GRID)).astype(np.float32)
    return _PROJ


_BLUR: np.ndarray | None = None


def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix M with M @ x = Gaussian blur of x (edge-replicated, truncated at 4 sigma)."""
    r = int(4.0 * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    m = np.zeros((n, n))
    for i in range(n):
        for j, w in zip(np.clip(i + np.arange(-r, r + 1), 0, n - 1), k):
            m[i, j] += w
    return m.astype(np.float32)


def _blur(a: np.ndarray) -> np.ndarray:
    global _BLUR
    if _BLUR is None:
        _BLUR = blur_matrix(HASH_GRID, HASH_SIGMA)
    return _BLUR @ a @ _BLUR.T


def hash_thumbnail(thumb: np.ndarray) -> int:
    """64-bit band-pass SimHash of a `thumbnail` (see docs/data-checks.md)."""
    resid = thumb - _blur(thumb)
    bits = (_projection() @ resid.ravel()) > 0
    return int(np.packbits(bits).view(">u8")[0])


def encode_thumb(thumb: np.ndarray) -> str:
    """A `thumbnail` as the cache stores it: uint8 grey levels, base64 (2,136 characters)."""
    return base64.b64encode(np.clip(np.rint(thumb), 0, 255).astype(np.uint8).tobytes()).decode("ascii")


def decode_thumbs(encoded: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnails (n, HASH_GRID, HASH_GRID) float32, has (n,) bool); rows without one are zero."""
    out = np.zeros((len(encoded), HASH_GRID, HASH_GRID), np.float32)
    has = np.zeros(len(encoded), bool)
    for i, e in enumerate(encoded):
        if e:
            out[i] = np.frombuffer(base64.b64decode(e), np.uint8).reshape(HASH_GRID, HASH_GRID)
            has[i] = True
    return out, has


def hamming(a: int | np.ndarray, b: int | np.ndarray) -> np.ndarray | int:
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    out = np.bitwise_count(x)
    return int(out) if out.ndim == 0 else out

