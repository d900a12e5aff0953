"""Decoded-image cache: every manifest image decoded once, at one size, to a uint8 array.

Training and evaluation read pixels from here; both go through
`preprocess.load_gray`, so the cache is the same transform serving applies.
The cache key covers the manifest rows (path, sha256), the size and the code that makes
the pixels (preprocess.py, this module's decode path, Pillow's version): editing the
preprocessing invalidates the cache instead of serving stale pixels.
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import numpy as np
import pandas as pd
from covid_cxr.data.pool import process_map
from covid_cxr.data.preprocess import load_gray
from covid_cxr.progress import tqdm


CACHE_VERSION = 2  # bump when the file layout changes
POOL_MIN_JOBS = 257  # a decode pool for more than 256 images only


def code_digest() -> str:
    """Digest of everything that turns a file into cached pixels.

    preprocess.py as a whole (load_gray and what it calls), this module's decode path
    (`_decode`, `decoded`) and the Pillow version (its decoders and resampling).
    """
    import PIL

    from covid_cxr.data import preprocess

    h = hashlib.sha256(f"v{CACHE_VERSION}|PIL {PIL.__version__}|".encode())
    h.update(Path(preprocess.__file__).read_bytes())
    for fn in (_decode, decoded):
        try:
            h.update(inspect.getsource(fn).encode())
        except OSError:  # no source shipped: the bytecode still changes with the code
            h.update(fn.__code__.co_code)
    return h.hexdigest()[:16]


def _key(df: pd.DataFrame, size: int) -> str:
    h = hashlib.sha1(f"{size}|{code_digest()}|".encode())
    for p, s in zip(df["path"], df["sha256"]):
        h.update(f"{p}|{s}\n".encode())
    return h.hexdigest()[:16]


def _decode(args: tuple[str, int]) -> np.ndarray:
    path, size = args
    return load_gray(path, size)


def decoded(df: pd.DataFrame, size: int, root: Path, cache_dir: Path, workers: int = 2) -> np.ndarray:
    """(N, size, size) uint8 for the manifest rows, in row order; memory-mapped when cached."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    f = cache_dir / f"decoded_{size}_{_key(df, size)}.npy"
    if f.exists():
        return np.load(f, mmap_mode="r")
    jobs = [(str(root / p), size) for p in df["path"]]
    out = np.empty((len(jobs), size, size), np.uint8)
    desc = f"decode {len(jobs)} images @ {size}px"
    with process_map(_decode, jobs, workers, min_items=POOL_MIN_JOBS) as results:
        for i, a in enumerate(tqdm(results, total=len(jobs), desc=desc)):
            out[i] = a
    tmp = f.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(f)
    return out
