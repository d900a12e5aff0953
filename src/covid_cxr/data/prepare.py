"""Stage `prepare`: data/ -> artifacts/data/manifest.csv (one row per image, with its split).

- Per-image stats come from `filestats` (the same code as `covid-cxr data check`).
- Near-duplicate groups: union-find over exact sha256 matches, `dhash` Hamming distance
  <= prepare.near_dup_bits (re-exports of a film) and the same-film score >= prepare.near_dup_corr
  (re-crops of a film, and near-identical films of one patient; see `samefilm`). A group never
  straddles splits.
- Split: per class (a group's class is its most common label), groups are ordered by
  sha256(f"{seed}:{group}") and cut at valid_frac / test_frac of that class's images. Deterministic
  for a seed, and adding images only moves groups that sit near a cut.
- The manifest records what is on disk, bad files included (empty width/height/mode when it
  did not decode, the folder name as label when it is not a class); `validate` judges.
"""
from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from covid_cxr.config import CLASSES, Paths, load_params
from covid_cxr.data.filestats import StatsCache, compute_stats, default_cache_dir
from covid_cxr.data.fingerprint import decode_thumbs
from covid_cxr.data.layouts import scan_source
from covid_cxr.data.rules import Limits
from covid_cxr.data.samefilm import film_pairs

MANIFEST_COLUMNS = ("path", "label", "sha256", "width", "height", "mode", "bytes", "group", "split")
SPLITS = ("train", "valid", "test")


# --------------------------------------------------------------------------- groups


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_pairs(hashes: Sequence[int | None], bits: int, block: int = 1024) -> list[tuple[int, int]]:
    """All index pairs i < j whose hashes differ in <= bits bits (None hashes never match)."""
    idx = np.array([i for i, h in enumerate(hashes) if h is not None], dtype=np.int64)
    if len(idx) < 2:
        return []
    h = np.array([hashes[i] for i in idx], dtype=np.uint64)
    out: list[tuple[int, int]] = []
    for s in range(0, len(h), block):
        d = np.bitwise_count(h[s : s + block, None] ^ h[None, :])
        ii, jj = np.nonzero(d <= bits)
        keep = jj > ii + s
        out.extend(zip(idx[ii[keep] + s].tolist(), idx[jj[keep]].tolist()))
    return out


def same_film_pairs(thumbs: Sequence[str | None], corr: float) -> list[tuple[int, int, float]]:
    """(i, j, score) for every pair of encoded thumbnails (`fingerprint.encode_thumb`) scoring >= corr."""
    t, has = decode_thumbs(thumbs)
    idx = np.nonzero(has)[0]
    return [(int(idx[i]), int(idx[j]), s) for i, j, s in film_pairs(t[idx], corr)]


def group_ids(
    shas: Sequence[str],
    hashes: Sequence[int | None],
    bits: int,
    thumbs: Sequence[str | None] | None = None,
    corr: float | None = None,
) -> list[str]:
    """Near-duplicate group per item: 'g' + the first 12 hex of the smallest sha256 in the group.

    Joined: equal sha256; hashes within `bits`; and, given `thumbs` and `corr`, same-film pairs.
    """
    n = len(shas)
    uf = _UnionFind(n)
    first: dict[str, int] = {}
    for i, s in enumerate(shas):
        if s in first:
            uf.union(first[s], i)
        else:
            first[s] = i
    for i, j in near_pairs(hashes, bits):
        uf.union(i, j)
    if thumbs is not None and corr is not None:
        for i, j, _ in same_film_pairs(thumbs, corr):
            uf.union(i, j)
    roots = [uf.find(i) for i in range(n)]
    name: dict[int, str] = {}
    for i, r in enumerate(roots):
        if r not in name or shas[i] < name[r]:
            name[r] = shas[i]
    return ["g" + name[r][:12] for r in roots]


# --------------------------------------------------------------------------- split


def assign_splits(
    groups: Sequence[str], labels: Sequence[str], seed: int, valid_frac: float, test_frac: float
) -> list[str]:
    """Deterministic split per item: stratified by the group's majority label, whole groups only."""
    if not (0 <= valid_frac and 0 <= test_frac and valid_frac + test_frac < 1):
        raise ValueError(f"bad split fractions valid={valid_frac} test={test_frac}")
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_class: dict[str, list[str]] = defaultdict(list)
    for g, items in members.items():
        votes = Counter(labels[i] for i in items)
        top = max(votes.values())
        by_class[min(lab for lab, v in votes.items() if v == top)].append(g)
    split_of: dict[str, str] = {}
    for _, gs in sorted(by_class.items()):
        gs.sort(key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        n = sum(len(members[g]) for g in gs)
        n_test, n_valid = test_frac * n, valid_frac * n
        c = 0
        for g in gs:
            size = len(members[g])
            mid = c + size / 2  # cut by each group's midpoint: the smallest error for whole groups
            split_of[g] = "test" if mid < n_test else "valid" if mid < n_test + n_valid else "train"
            c += size
    return [split_of[g] for g in groups]


# --------------------------------------------------------------------------- manifest


def build_manifest(
    root: Path | None = None,
    params: dict[str, Any] | None = None,
    *,
    use_cache: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    paths = Paths(root)
    params = params if params is not None else load_params(paths.root / "params.yaml")
    limits = Limits.from_params(params)
    pp = params["prepare"]
    data_root = paths.root / params["data"]["root"]
    if not data_root.is_dir():
        raise FileNotFoundError(f"{data_root} does not exist: run `dvc pull` (or `covid-cxr data import`) first")
    files = scan_source(data_root).files
    cache = StatsCache(default_cache_dir(paths.data), limits.max_pixels) if use_cache else None
    stats = compute_stats([f.path for f in files], limits.max_pixels, workers=workers, cache=cache,
                          progress=progress, desc="prepare: image stats")
    labels = [f.label or (f.folder or "") for f in files]
    groups = group_ids([s["sha256"] for s in stats], [s["dhash"] for s in stats], limits.near_dup_bits,
                       [s.get("thumb") for s in stats], limits.near_dup_corr)
    splits = assign_splits(groups, labels, int(pp["seed"]), float(pp["valid_frac"]),
                           float(pp["test_frac"]))
    rows = []
    for f, st, lab, g, sp in zip(files, stats, labels, groups, splits):
        rows.append(
            {
                "path": Path(os.path.relpath(f.path, paths.root)).as_posix(),
                "label": lab,
                "sha256": st["sha256"],
                "width": st["width"],
                "height": st["height"],
                "mode": st["mode"],
                "bytes": st["bytes"],
                "group": g,
                "split": sp,
            }
        )
    return rows


def write_manifest(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r[k] is None else r[k] for k in MANIFEST_COLUMNS})
    os.replace(tmp, path)
    return path


def describe(rows: list[dict[str, Any]]) -> str:
    table = Counter((r["label"], r["split"]) for r in rows)
    labels = sorted({r["label"] for r in rows}, key=lambda x: (x not in CLASSES, x))
    lines = [f"{'class':<18}" + "".join(f"{s:>8}" for s in SPLITS) + f"{'total':>8}"]
    for lab in labels:
        n = [table[(lab, s)] for s in SPLITS]
        lines.append(f"{lab:<18}" + "".join(f"{v:>8}" for v in n) + f"{sum(n):>8}")
    tot = [sum(table[(lab, s)] for lab in labels) for s in SPLITS]
    lines.append(f"{'all':<18}" + "".join(f"{v:>8}" for v in tot) + f"{sum(tot):>8}")
    sizes = Counter(r["group"] for r in rows)
    multi = [n for n in sizes.values() if n > 1]
    bad = sum(1 for r in rows if r["width"] is None)
    lines.append(
        f"{len(sizes)} groups; {len(multi)} near-duplicate groups holding {sum(multi)} images"
        f" (largest {max(multi, default=1)}); {bad} undecodable"
    )
    return "\n".join(lines)


def run(root: Path | None = None, *, use_cache: bool = True, workers: int | None = None,
        progress: bool = True) -> list[dict[str, Any]]:
    paths = Paths(root)
    rows = build_manifest(paths.root, use_cache=use_cache, workers=workers, progress=progress)
    write_manifest(rows, paths.manifest)
    return rows


def register(app, data_app) -> None:
    import typer

    @app.command("prepare")
    def prepare_cmd(
        cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse per-file stats from .cache/covid_cxr/."),
        workers: int = typer.Option(None, help="Decode processes [default: $COVID_CXR_WORKERS, else one per core]."),
    ) -> None:
        """Stage prepare: image stats, near-duplicate groups and the train/valid/test split -> manifest.csv."""
        paths = Paths()
        rows = run(paths.root, use_cache=cache, workers=workers)
        typer.echo(describe(rows))
        typer.echo(f"Wrote {paths.manifest.relative_to(paths.root)} ({len(rows)} images)")
