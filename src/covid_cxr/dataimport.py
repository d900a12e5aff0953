"""`covid-cxr data import SRC`: bring a Kaggle zip / folder or a flat `<Class>/*` folder into data/.

Files land in `data/COVID-19_Radiography_Dataset/<Class>/images/`. Rules:
- a file whose bytes are already anywhere in data/ is skipped (`skipped_identical`);
- a *different* file under a name that is already taken is never overwritten: it is kept beside
  it as `<stem>.<sha256[:8]><ext>` and reported as a conflict (re-importing it is then a skip);
- `masks/`, `Lung_Opacity/`, `*.xlsx` and top-level README/licence files are skipped, in one line;
- files outside a known class folder are not imported (`unknown_class`).
The import copies bytes only; `covid-cxr data check` is the gate for content (`--check` runs it).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from .config import KAGGLE_ROOT
from .imagecheck import Limits, StatsCache, check_batch, default_cache_dir, scan_source, sha256_file, skip_kind, skipped_line


def _data_shas(data_dir: Path) -> dict[str, Path]:
    """sha256 of every image already in data/ (from the shared stats cache when warm)."""
    out: dict[str, Path] = {}
    files = [f.path for f in scan_source(data_dir).files] if data_dir.exists() else []
    cache = StatsCache(default_cache_dir(data_dir), Limits.from_params().max_pixels)
    for p in files:
        st = cache.get(p)
        out.setdefault(st["sha256"] if st else sha256_file(p), p)
    return out


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def import_tree(
    src: Path, data_dir: Path, only: set[Path] | None = None, *, progress: bool = False
) -> dict[str, Any]:
    """Copy the class images under `src` (Kaggle or flat layout) into `data_dir`.

    `only`: import just these source files (e.g. the ones `check_batch` accepted).
    Returns lists: `added` (destination paths), `skipped_identical` (source paths),
    `conflicts` ([{"src", "existing", "kept_as"}]), `unknown_class` (source paths) and the
    `skipped` counts of non-dataset files (masks/, Lung_Opacity/, ...).
    """
    src, data_dir = Path(src), Path(data_dir)
    scan = scan_source(src)
    files = scan.files
    if only is not None:
        wanted = {Path(p).resolve() for p in only}
        files = [f for f in files if f.path.resolve() in wanted]
    result: dict[str, Any] = {
        "added": [], "skipped_identical": [], "conflicts": [], "unknown_class": [], "skipped": dict(scan.skipped),
    }
    known = _data_shas(data_dir)
    it: Iterable = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="importing", unit="file", dynamic_ncols=True)
    for f in it:
        if f.label is None:
            result["unknown_class"].append(str(f.path))
            continue
        sha = sha256_file(f.path)
        if sha in known:
            result["skipped_identical"].append(str(f.path))
            continue
        dest_dir = data_dir / KAGGLE_ROOT / f.label / "images"
        dst = dest_dir / f.path.name
        if dst.exists():
            kept = dest_dir / f"{f.path.stem}.{sha[:8]}{f.path.suffix}"
            result["conflicts"].append({"src": str(f.path), "existing": str(dst), "kept_as": str(kept)})
            dst = kept
        _copy_atomic(f.path, dst)
        known[sha] = dst
        result["added"].append(str(dst))
    return result


def _extract_zip(zf: zipfile.ZipFile, dest: Path) -> dict[str, int]:
    """Unpack the members that can be dataset images; count (and never unpack) masks/ etc."""
    skipped: dict[str, int] = {}
    root = dest.resolve()
    for m in zf.infolist():
        if m.is_dir():
            continue
        kind = skip_kind(PurePosixPath(m.filename))
        if kind:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        if root not in (dest / m.filename).resolve().parents:
            raise ValueError(f"refusing zip member outside the target folder: {m.filename}")
        zf.extract(m, dest)
    return skipped


def import_source(src: Path, data_dir: Path, *, check: bool = False, progress: bool = False) -> dict[str, Any]:
    """`import_tree` for a folder or a .zip (unpacked to a temporary folder first)."""
    src = Path(src)
    if src.is_file() and zipfile.is_zipfile(src):
        with tempfile.TemporaryDirectory(prefix="covid-cxr-import-") as tmp, zipfile.ZipFile(src) as zf:
            skipped = _extract_zip(zf, Path(tmp))
            res = _import_dir(Path(tmp), data_dir, check=check, progress=progress)
            for k, v in skipped.items():
                res["skipped"][k] = res["skipped"].get(k, 0) + v
            return res
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is neither a folder nor a zip file")
    return _import_dir(src, data_dir, check=check, progress=progress)


def _import_dir(src: Path, data_dir: Path, *, check: bool, progress: bool) -> dict[str, Any]:
    only = None
    rejected: list[dict[str, Any]] = []
    if check:
        results = check_batch(src, data_dir, progress=progress)
        only = {Path(r["path"]) for r in results if r["accepted"]}
        rejected = [r for r in results if not r["accepted"]]
    res = import_tree(src, data_dir, only=only, progress=progress)
    res["rejected"] = rejected
    return res


def register(app, data_app) -> None:
    import typer

    @data_app.command("import")
    def import_cmd(
        src: Path = typer.Argument(..., exists=True, help="Kaggle zip, or a folder in Kaggle or flat <Class>/ layout."),
        data_dir: Path = typer.Option(None, "--data", help="The project's data folder [default: <root>/data]."),
        check: bool = typer.Option(False, "--check/--no-check", help="Run `data check` first and import only accepted files."),
    ) -> None:
        """Copy new images into data/COVID-19_Radiography_Dataset/<Class>/images/ (never overwrites)."""
        from .config import Paths

        data_dir = data_dir or Paths().data
        res = import_source(src, data_dir, check=check, progress=True)
        if res["skipped"]:
            typer.echo(skipped_line(res["skipped"]))
        typer.echo(
            f"Added {len(res['added'])}, skipped {len(res['skipped_identical'])} already in data/, "
            f"{len(res['conflicts'])} name conflicts kept under a new name, "
            f"{len(res['unknown_class'])} outside a class folder, {len(res['rejected'])} rejected by the check."
        )
        for c in res["conflicts"][:5]:
            typer.echo(f"  CONFLICT {c['src']}: {c['existing']} differs, kept as {Path(c['kept_as']).name}")
        if len(res["conflicts"]) > 5:
            typer.echo(f"  ... and {len(res['conflicts']) - 5} more conflicts")
        for p in res["unknown_class"][:5]:
            typer.echo(f"  NOT IMPORTED (no class folder) {p}")
        for r in res["rejected"][:5]:
            typer.echo(f"  NOT IMPORTED ({r['reason']}) {r['path']}: {r['message']}")
        if res["added"]:
            typer.echo("Next: dvc add data && dvc push   (then commit data.dvc)")
        else:
            typer.echo("Nothing new to add.")
