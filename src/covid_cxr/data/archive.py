"""`covid-cxr data import SRC`: bring a Kaggle zip / folder or a flat `<Class>/*` folder into data/.

Files land in `data/COVID-19_Radiography_Dataset/<Class>/images/`. Rules:
- a file whose bytes are already anywhere in data/ is skipped (`skipped_identical`);
- a *different* file under a name that is already taken is never overwritten: it is kept beside
  it as `<stem>.<sha256[:8]><ext>` and reported as a conflict (re-importing it is then a skip);
- `masks/`, `Lung_Opacity/`, `*.xlsx` and top-level README/licence files are skipped, in one line;
- files outside a known class folder are not imported (`unknown_class`).
A zip is unpacked to a temporary folder under the zip-bomb limits of params.yaml's `import:`
section (total and per-member uncompressed size, compression ratio), checked from its headers
before anything is unpacked and counted again while unpacking (headers can lie); an archive
over a limit is refused with one line and nothing is written to data/.
The import copies bytes only; `covid-cxr data check` is the gate for content (`--check` runs it).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from covid_cxr.config import KAGGLE_ROOT, load_params, project_root
from covid_cxr.data.filestats import StatsCache, default_cache_dir
from covid_cxr.hashing import sha256_file
from covid_cxr.data.imagecheck import check_batch
from covid_cxr.data.layouts import scan_source, skip_kind, skipped_line
from covid_cxr.data.rules import Limits


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
        from covid_cxr.progress import tqdm

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


class UnsafeArchive(ValueError):
    """An archive that is refused as a whole (zip bomb, zip slip, corrupt member); one-line message."""


MB = 1024 * 1024
CHUNK = 1 << 20


@dataclass(frozen=True)
class ZipLimits:
    """Zip-bomb guards from params.yaml `import:` (no defaults here: the numbers live in params.yaml).

    Another caller (`covid-cxr predict`) passes its own: `max_members` caps the member count
    (None: no cap, as for `data import`) and `names` are the settings a refusal names.
    """

    max_total_bytes: int
    max_member_bytes: int
    max_ratio: float
    ratio_min_bytes: int
    max_members: int | None = None
    names: tuple[str, str, str] = ("import.max_total_mb", "import.max_member_mb", "import.max_ratio")  # total, member, ratio

    @classmethod
    def from_params(cls, params: dict[str, Any] | None = None) -> "ZipLimits":
        params = params if params is not None else load_params(project_root() / "params.yaml")
        imp = params.get("import") or {}
        missing = [k for k in ("max_total_mb", "max_member_mb", "max_ratio", "ratio_min_mb") if k not in imp]
        if missing:
            raise KeyError(f"params.yaml import: lacks {', '.join(missing)} (the zip-bomb limits of `data import`)")
        return cls(int(float(imp["max_total_mb"]) * MB), int(float(imp["max_member_mb"]) * MB),
                   float(imp["max_ratio"]), int(float(imp["ratio_min_mb"]) * MB))


def _mb(n: int) -> str:
    return f"{n / MB:,.1f} MB"


def _members(zf: zipfile.ZipFile, dest: Path) -> tuple[list[zipfile.ZipInfo], dict[str, int]]:
    """The members that would be unpacked (zip slip refused), and the counts of skipped ones."""
    skipped: dict[str, int] = {}
    out = []
    root = dest.resolve()
    for m in zf.infolist():
        if m.is_dir():
            continue
        kind = skip_kind(PurePosixPath(m.filename))
        if kind:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        if root not in (dest / m.filename).resolve().parents:
            raise UnsafeArchive(f"refusing zip member outside the target folder: {m.filename}")
        out.append(m)
    return out, skipped


def check_zip_headers(members: list[zipfile.ZipInfo], limits: ZipLimits) -> None:
    """Refuse, before unpacking anything, what the headers already show to be too big."""
    total_name, member_name, ratio_name = limits.names
    if limits.max_members is not None and len(members) > limits.max_members:
        raise UnsafeArchive(f"the archive holds {len(members):,} files, over the {limits.max_members:,} limit")
    total = 0
    for m in members:
        if m.file_size > limits.max_member_bytes:
            raise UnsafeArchive(f"member {m.filename} would unpack to {_mb(m.file_size)}, over "
                                f"{member_name} ({_mb(limits.max_member_bytes)})")
        if m.file_size > limits.ratio_min_bytes and m.file_size > limits.max_ratio * max(m.compress_size, 1):
            raise UnsafeArchive(f"member {m.filename} is compressed {m.file_size / max(m.compress_size, 1):,.0f}:1, "
                                f"over {ratio_name} ({limits.max_ratio:g}:1): a zip bomb?")
        total += m.file_size
        if total > limits.max_total_bytes:
            raise UnsafeArchive(f"the archive would unpack to more than {_mb(limits.max_total_bytes)} "
                                f"({total_name})")


def _unpack_member(zf: zipfile.ZipFile, m: zipfile.ZipInfo, dst: Path, limits: ZipLimits, done: int) -> int:
    """Stream one member to `dst`, counting the bytes it really yields; returns that count."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with zf.open(m) as src, open(dst, "wb") as out:
        while chunk := src.read(CHUNK):
            n += len(chunk)
            if n > m.file_size:
                raise UnsafeArchive(f"member {m.filename} unpacks to more than the {m.file_size:,} bytes its "
                                    "header declares: refusing the archive")
            if n > limits.max_member_bytes or done + n > limits.max_total_bytes:
                raise UnsafeArchive(f"member {m.filename} goes over the import limits while unpacking "
                                    f"({limits.names[1]} / {limits.names[0]})")
            out.write(chunk)
    return n


def _extract_zip(zf: zipfile.ZipFile, dest: Path, limits: ZipLimits | None = None) -> dict[str, int]:
    """Unpack the members that can be dataset images; count (and never unpack) masks/ etc."""
    limits = limits or ZipLimits.from_params()
    members, skipped = _members(zf, dest)
    check_zip_headers(members, limits)
    done = 0
    for m in members:
        try:
            done += _unpack_member(zf, m, dest / m.filename, limits, done)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
            # bad CRC / truncated stream / unknown compression / encrypted; OSError (disk full) propagates
            raise UnsafeArchive(f"member {m.filename} is corrupt ({e}): refusing the archive") from e
    return skipped


def import_source(src: Path, data_dir: Path, *, check: bool = False, progress: bool = False,
                  limits: ZipLimits | None = None) -> dict[str, Any]:
    """`import_tree` for a folder or a .zip (unpacked to a temporary folder first, under `limits`)."""
    src = Path(src)
    if src.is_file() and zipfile.is_zipfile(src):
        limits = limits or ZipLimits.from_params()
        with tempfile.TemporaryDirectory(prefix="covid-cxr-import-") as tmp, zipfile.ZipFile(src) as zf:
            try:
                skipped = _extract_zip(zf, Path(tmp), limits)
            except UnsafeArchive as e:
                raise UnsafeArchive(f"{src.name}: {e}") from None
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
        from covid_cxr.config import Paths

        data_dir = data_dir or Paths().data
        try:
            res = import_source(src, data_dir, check=check, progress=True)
        except UnsafeArchive as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
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
