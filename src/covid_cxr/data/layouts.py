"""Folder layouts: which files of a batch (or of data/) are candidate images, and of which class.

`scan_source` reads the Kaggle layout and the flat one; class folders are matched loosely
(`canonical_class`); what a Kaggle archive carries that is not ours is skipped and counted.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from covid_cxr.config import KAGGLE_ROOT

_CLASS_ALIASES = {
    "covid": "COVID",
    "covid19": "COVID",
    "covid 19": "COVID",
    "normal": "Normal",
    "viral pneumonia": "Viral Pneumonia",
}
_SKIP_CLASS = {"lung opacity"}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def canonical_class(folder: str | None) -> str | None:
    """'covid' / 'NORMAL' / 'Viral_Pneumonia' / 'viral-pneumonia' -> canonical class, else None."""
    if not folder:
        return None
    return _CLASS_ALIASES.get(_norm(folder))


@dataclass
class SourceFile:
    path: Path
    rel: str
    folder: str | None  # the class folder as spelled on disk (None: not inside one)
    label: str | None  # canonical class or None


@dataclass
class Scan:
    files: list[SourceFile] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def skipped_line(self) -> str:
        return skipped_line(self.skipped)


def skipped_line(skipped: dict[str, int]) -> str:
    """One line naming what a Kaggle archive carries that we leave out ('' when nothing)."""
    if not skipped:
        return ""
    parts = ", ".join(f"{k} ({v} file{'s' if v != 1 else ''})" for k, v in sorted(skipped.items()))
    return f"Skipped, not part of this dataset: {parts}."


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def skip_kind(rel: PurePath) -> str | None:
    """Why a Kaggle-archive member is not ours (masks/, Lung_Opacity/, *.xlsx), else None."""
    dirs = rel.parts[:-1]
    if any(d.lower() == "masks" for d in dirs):
        return "masks/"
    if any(_norm(d) in _SKIP_CLASS for d in dirs):
        return "Lung_Opacity/"
    if rel.suffix.lower() == ".xlsx":
        return "*.xlsx"
    return None


def scan_source(src: Path) -> Scan:
    """Every candidate image file under `src` with its class folder, in sorted order.

    Accepts the Kaggle layout (`[COVID-19_Radiography_Dataset/]<Class>/images/<file>`) and the flat
    layout (`<Class>/<file>`). Skips (and counts) what a Kaggle archive carries that is not ours:
    `masks/` folders, the `Lung_Opacity` class, `*.xlsx` metadata and top-level README/licence files.
    """
    src = Path(src)
    scan = Scan()
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if any(_is_hidden(part) for part in rel.parts) or not p.is_file():
            continue
        kind = skip_kind(rel)
        if kind:
            scan.skipped[kind] += 1
            continue
        dirs = list(rel.parts[:-1])
        if dirs and dirs[-1].lower() == "images":
            dirs.pop()
        if dirs and dirs[0] == KAGGLE_ROOT:
            dirs.pop(0)
        folder = dirs[-1] if dirs else None
        if folder is None and re.match(r"(?i)(readme|licen[cs]e)", p.name):
            scan.skipped["README/licence"] += 1
            continue
        scan.files.append(SourceFile(p, rel.as_posix(), folder, canonical_class(folder)))
    return scan


def data_image_files(data_dir: Path) -> list[SourceFile]:
    """The images of the project's data/ folder (Kaggle layout)."""
    return scan_source(Path(data_dir)).files
