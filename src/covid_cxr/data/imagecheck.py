"""The batch check behind `covid-cxr data check` (and `data import --check`, the inbox flow).

Every file of a batch gets its stats (`filestats`), is judged by the rules (`rules.judge`), then
checked for a class folder (`layouts`) and against data/ (`DataIndex`): exact copies (sha256),
near-duplicates (the `dhash` fingerprint, `fingerprint`) and, not a rejection, same-film matches
(`samefilm`, marked `same_film_as`). How the two duplicate signals were chosen and what they
catch: docs/data-checks.md.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from covid_cxr.config import CLASSES
from covid_cxr.data.filestats import StatsCache, compute_stats, default_cache_dir
from covid_cxr.data.fingerprint import decode_thumbs, hamming
from covid_cxr.data.layouts import Scan, data_image_files, scan_source
from covid_cxr.data.rules import REASONS, Limits, judge, public_stats
from covid_cxr.data.samefilm import film_pairs


# --------------------------------------------------------------------------- data index


class DataIndex:
    """sha256, dhash and thumbnail of everything already in data/, for duplicate checks."""

    def __init__(self, paths: list[Path], stats: list[dict[str, Any]]):
        self.by_sha: dict[str, Path] = {}
        hp, hv = [], []
        for p, st in zip(paths, stats):
            self.by_sha.setdefault(st["sha256"], p)
            if st.get("dhash") is not None:
                hp.append(p)
                hv.append(st["dhash"])
        self.hash_paths = hp
        self.hashes = np.array(hv, dtype=np.uint64)
        thumbs, has = decode_thumbs([st.get("thumb") for st in stats])
        self.thumb_paths = [p for p, h in zip(paths, has) if h]
        self.thumbs = thumbs[has]

    def same_films(self, encoded: Sequence[str | None], corr: float) -> dict[int, tuple[Path, float]]:
        """For each encoded thumbnail that matches a film in data/ (score >= corr): its best match."""
        thumbs, has = decode_thumbs(encoded)
        idx = np.nonzero(has)[0]
        best: dict[int, tuple[Path, float]] = {}
        if not len(idx) or not len(self.thumbs):
            return best
        for i, j, sc in film_pairs(self.thumbs, corr, others=thumbs[idx]):  # data film i ~ new file j
            k = int(idx[j])
            if k not in best or sc > best[k][1]:
                best[k] = (self.thumb_paths[i], sc)
        return best

    @classmethod
    def build(
        cls, data_dir: Path, limits: Limits, *, cache_dir: Path | None = None, workers: int | None = None,
        progress: bool = False,
    ) -> "DataIndex":
        files = [f.path for f in data_image_files(data_dir)]
        cache = StatsCache(cache_dir if cache_dir else default_cache_dir(data_dir), limits.max_pixels)
        stats = compute_stats(files, limits.max_pixels, workers=workers, cache=cache, progress=progress,
                              desc="indexing data/")
        return cls(files, stats)

    def nearest(self, h: int) -> tuple[Path | None, int]:
        if h is None or len(self.hashes) == 0:
            return None, 65
        d = hamming(self.hashes, h)
        i = int(np.argmin(d))
        return self.hash_paths[i], int(d[i])


# --------------------------------------------------------------------------- batch check


def check_source(
    batch_dir: Path,
    data_dir: Path | None = None,
    *,
    limits: Limits | None = None,
    workers: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], Scan]:
    """`check_batch` plus the scan (what was skipped)."""
    limits = limits or Limits.from_params()
    scan = scan_source(Path(batch_dir))
    index = (
        DataIndex.build(Path(data_dir), limits, cache_dir=cache_dir, workers=workers, progress=progress)
        if data_dir is not None and Path(data_dir).exists()
        else None
    )
    stats = compute_stats([f.path for f in scan.files], limits.max_pixels, workers=workers, progress=progress)
    films = index.same_films([st.get("thumb") for st in stats], limits.near_dup_corr) if index is not None else {}
    seen: dict[str, str] = {}
    results = []
    for k, (f, st) in enumerate(zip(scan.files, stats)):
        reason, message = judge(st, limits)
        extra: dict[str, Any] = {}
        if reason == "ok" and f.label is None:
            reason = "unknown_class"
            message = (
                f"folder {f.folder!r} is not a class ({', '.join(CLASSES)})" if f.folder
                else "file is not inside a class folder"
            )
        if reason == "ok" and index is not None and st["sha256"] in index.by_sha:
            reason, extra["duplicate_of"] = "duplicate", str(index.by_sha[st["sha256"]])
            message = f"identical to {extra['duplicate_of']}"
        if reason == "ok" and st["sha256"] in seen:
            reason, extra["duplicate_of"] = "duplicate_in_batch", seen[st["sha256"]]
            message = f"identical to {seen[st['sha256']]} in this batch (that copy is kept)"
        if reason == "ok" and index is not None:
            near, dist = index.nearest(st["dhash"])
            if near is not None and dist <= limits.near_dup_bits:
                reason, extra["duplicate_of"], extra["distance"] = "near_duplicate", str(near), dist
                message = f"near-duplicate of {near} (dhash distance {dist} <= {limits.near_dup_bits} bits)"
        if reason == "ok":
            seen[st["sha256"]] = str(f.path)
            if k in films:  # accepted all the same: prepare keeps it in that film's split
                extra["same_film_as"], extra["film_corr"] = str(films[k][0]), round(films[k][1], 3)
        results.append(
            {
                "path": str(f.path),
                "label": f.label,
                "folder": f.folder,
                **public_stats(st),
                "accepted": reason == "ok",
                "reason": reason,
                "message": message,
                **extra,
            }
        )
    return results, scan


def check_batch(batch_dir: Path, data_dir: Path | None = None, **kw) -> list[dict[str, Any]]:
    """Check every file of an incoming batch (Kaggle or flat layout) against the rules and data/.

    Each result has `path`, `label` (canonical class or None), `accepted`, `reason` ("ok" when
    accepted), `message`, the image stats and, for duplicates, `duplicate_of`.
    """
    return check_source(batch_dir, data_dir, **kw)[0]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    reasons = Counter(r["reason"] for r in results)
    labels = Counter(r["label"] for r in results if r["accepted"])
    return {
        "files": len(results),
        "accepted": sum(r["accepted"] for r in results),
        "rejected": sum(not r["accepted"] for r in results),
        "by_reason": dict(sorted(reasons.items())),
        "accepted_by_class": {c: labels.get(c, 0) for c in CLASSES},
        "accepted_same_film": sum(1 for r in results if r["accepted"] and r.get("same_film_as")),
    }


def write_report(results: list[dict[str, Any]], path: Path | str, skipped: dict[str, int] | None = None) -> Path:
    """JSON report: summary counts and every file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"summary": summarize(results), "skipped": dict(skipped or {}), "files": results}
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path


def format_summary(results: list[dict[str, Any]]) -> str:
    s = summarize(results)
    lines = [f"{'reason':<20} {'files':>6}  meaning", f"{'-' * 20} {'-' * 6}  {'-' * 40}"]
    for reason, n in sorted(s["by_reason"].items(), key=lambda kv: (kv[0] != "ok", kv[0])):
        lines.append(f"{reason:<20} {n:>6}  {REASONS.get(reason, '')}")
    per_class = ", ".join(f"{c} {n}" for c, n in s["accepted_by_class"].items())
    lines.append(f"{s['accepted']} of {s['files']} files accepted ({per_class})")
    if s["accepted_same_film"]:
        lines.append(
            f"{s['accepted_same_film']} accepted file(s) look like a re-crop of a film already in data/ "
            "(same_film_as in the report); prepare keeps each in that film's split"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def register(app, data_app) -> None:
    import typer

    @data_app.command("check")
    def check_cmd(
        directory: Path = typer.Argument(..., exists=True, file_okay=False, help="Batch folder (Kaggle or flat layout)."),
        report: Path = typer.Option(None, "--report", help="Write the JSON report here [default: DIR-check.json in .cache]."),
        data_dir: Path = typer.Option(None, "--data", help="The project's data folder [default: <root>/data]."),
        show: int = typer.Option(10, help="List at most this many rejected files."),
    ) -> None:
        """Check a batch of images before import. Changes nothing but the report; exit 1 if any file is rejected."""
        from covid_cxr.config import Paths

        paths = Paths()
        data_dir = data_dir or paths.data
        results, scan = check_source(directory, data_dir, limits=Limits.from_params(), progress=True)
        if scan.skipped:
            typer.echo(scan.skipped_line())
        report = report or paths.cache / "reports" / f"{Path(directory).resolve().name}-check.json"
        write_report(results, report, scan.skipped)
        typer.echo(format_summary(results))
        bad = [r for r in results if not r["accepted"]]
        for r in bad[:show]:
            typer.echo(f"  REJECTED {r['path']}: {r['reason']}: {r['message']}")
        if len(bad) > show:
            typer.echo(f"  ... and {len(bad) - show} more (see the report)")
        typer.echo(f"Report: {report}")
        if not results:
            typer.echo("No image files found.")
            raise typer.Exit(1)
        raise typer.Exit(1 if bad else 0)
