"""Per-file stats, their cache, and the package's one process pool.

`file_stats` reads one file's raw, parameter-free facts (`bytes`, `sha256`, `width`, `height`,
`mode`, `format`, the `dhash` fingerprint, the 40x40 `thumb`, and the `colour` / `std` numbers of
the "is this an X-ray at all" rule); `rules.judge` then holds them against the limits in
params.yaml. Pixels are decoded only through `preprocess.open_image` / `to_gray`.
`StatsCache` keeps the stats on disk, `compute_stats` computes many (in a `pool.process_map` pool
for big lists).
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from covid_cxr.data.errors import ImageError
from covid_cxr.data.fingerprint import encode_thumb, hash_thumbnail
from covid_cxr.data.pool import process_map
from covid_cxr.data.preprocess import open_image, to_gray
from covid_cxr.data.xrayrule import colourfulness, thumbnail

# The stats cache is keyed by a digest of the code that makes the stats (`_code_digest`), so edits
# there invalidate it; STATS_VERSION is only for changes made elsewhere.
STATS_VERSION = 2


STAT_KEYS = (
    "bytes", "sha256", "width", "height", "mode", "format", "dhash", "thumb", "colour", "std", "error", "error_message",
)


def file_stats(path: Path | str, max_pixels: int) -> dict[str, Any]:
    """Raw, parameter-free facts about one file (cacheable). Never raises for a bad image."""
    data = Path(path).read_bytes()
    st: dict[str, Any] = dict.fromkeys(STAT_KEYS)
    st["bytes"] = len(data)
    st["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        im = open_image(data, max_pixels=max_pixels)
    except ImageError as e:
        st["error"], st["error_message"] = e.code, e.message
        return st
    st["width"], st["height"] = im.size
    st["mode"], st["format"] = im.mode, im.format
    try:
        st["colour"] = round(colourfulness(im), 3)
        thumb = thumbnail(im if im.mode == "L" else to_gray(im))  # one decode; L needs no conversion
    except Exception as e:  # an exotic mode Pillow decodes but cannot convert
        st["error"], st["error_message"] = "corrupt", f"decoded, but cannot be converted to greyscale: {e}"
        return st
    st["std"] = round(float(thumb.std()), 3)
    st["dhash"] = hash_thumbnail(thumb)
    st["thumb"] = encode_thumb(thumb)
    return st


def _code_digest() -> str:
    """Digest of the code that produces stats: edits invalidate the cache.

    This module, the fingerprint, the decode path (preprocess, dicomsniff, dicom, errors: the error
    codes and messages are stats too) and xrayrule (thumbnail, colourfulness). Not rules.py: `judge`
    runs on the cached stats.
    """
    from covid_cxr.data import dicom, dicomsniff, errors, fingerprint, preprocess, xrayrule

    h = hashlib.sha256(f"{STATS_VERSION}".encode())
    for mod in (__file__, fingerprint.__file__, preprocess.__file__, dicomsniff.__file__, dicom.__file__,
                xrayrule.__file__, errors.__file__):
        h.update(Path(mod).read_bytes())
    return h.hexdigest()[:16]


class StatsCache:
    """JSON cache of `file_stats`, one file per (code digest, max_pixels).

    Entries are keyed by absolute path and reused only while (size, mtime_ns, inode) match.
    """

    def __init__(self, cache_dir: Path, max_pixels: int):
        self.max_pixels = max_pixels
        self.path = Path(cache_dir) / f"imagestats-{_code_digest()}-{max_pixels}.json"
        self.entries: dict[str, list] = {}
        self.dirty = False
        try:
            self.entries = json.loads(self.path.read_text())["entries"]
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}

    @staticmethod
    def _key(path: Path) -> tuple[str, list[int]]:
        p = Path(path).resolve()
        s = p.stat()
        return str(p), [s.st_size, s.st_mtime_ns, s.st_ino]

    def get(self, path: Path) -> dict[str, Any] | None:
        k, sig = self._key(path)
        e = self.entries.get(k)
        return e[1] if e and e[0] == sig else None

    def put(self, path: Path, st: dict[str, Any]) -> None:
        k, sig = self._key(path)
        self.entries[k] = [sig, st]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": STATS_VERSION, "entries": self.entries}))
        os.replace(tmp, self.path)
        self.dirty = False
        for old in self.path.parent.glob(f"imagestats-*-{self.max_pixels}.json"):
            if old != self.path:  # written by an older version of the code: never read again
                old.unlink(missing_ok=True)


def default_workers() -> int:
    """$COVID_CXR_WORKERS, else one decode process per core (at most 8).

    Measured on the 2-core box: threads do not help (Pillow's PNG decoder hands the GIL back and
    forth: 2 threads 650 img/s vs 850 for 1); processes cost +13 % CPU per image (0.95 -> 1.08 ms:
    fork, pickling), so on idle cores 2 processes are ~1.8x faster, on a saturated box no faster.
    """
    env = os.environ.get("COVID_CXR_WORKERS")
    return max(1, int(env)) if env else max(1, min(8, os.cpu_count() or 1))


def default_cache_dir(data_dir: Path) -> Path:
    """`.cache/covid_cxr/` beside the data folder (the project root for the real data)."""
    return Path(data_dir).resolve().parent / ".cache" / "covid_cxr"


POOL_MIN_FILES = 200  # below this a process pool costs more than it saves


def _stats_at(max_pixels: int, path: Path) -> dict[str, Any]:
    return file_stats(path, max_pixels)  # looked up when called: tests patch file_stats


def compute_stats(
    paths: Sequence[Path],
    max_pixels: int,
    *,
    workers: int | None = None,
    cache: StatsCache | None = None,
    progress: bool = False,
    desc: str = "checking images",
) -> list[dict[str, Any]]:
    """`file_stats` for many files, in order, reusing `cache` hits; `workers` processes for big lists."""
    out: list[dict[str, Any] | None] = [cache.get(p) if cache else None for p in paths]
    todo = [i for i, st in enumerate(out) if st is None]
    workers = min(workers or default_workers(), max(1, len(todo)))
    with process_map(partial(_stats_at, max_pixels), [paths[i] for i in todo], workers,
                     min_items=POOL_MIN_FILES) as results:
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=desc, unit="img", dynamic_ncols=True)
        for i, st in zip(todo, results):
            out[i] = st
            if bar:
                bar.update()
        if bar:
            bar.close()
    if cache:
        for i in todo:
            cache.put(paths[i], out[i])  # type: ignore[arg-type]
        cache.save()
    return out  # type: ignore[return-value]
