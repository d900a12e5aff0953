"""The inputs of `covid-cxr predict` (predict.py): PATH arguments -> the files to score.

What it scores
    A file is one image (PNG, JPEG, BMP, TIFF, WebP, DICOM: whatever the service takes). A folder
    is read like `data import` reads one (`layouts.scan_source`: the Kaggle layout
    `<Class>/images/*` or the flat layout `<Class>/*`; masks/, Lung_Opacity/, *.xlsx, README and
    hidden files are left out and counted), and a class folder's name becomes `true_label`.
    A `.zip` is unpacked to a temporary folder with `data import`'s safe extraction (no member
    outside the folder) after the size checks below, then read like a folder; its rows' `path` is
    `<zip>::<member>`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from covid_cxr.serve.predicterror import PredictError

# A zip is unpacked before scoring: refuse archives whose declared content is out of proportion.
ZIP_MAX_BYTES = int(float(os.environ.get("COVID_CXR_ZIP_MAX_GB", "50")) * 1024 ** 3)
ZIP_MAX_MEMBERS = 1_000_000
ZIP_MAX_RATIO = 200          # uncompressed / compressed, per member over 1 MB (images barely compress)


@dataclass
class Item:
    file: Path              # the file on disk (inside the temporary folder for a zip member)
    path: str               # as the CSV shows it: the path the user gave, or <zip>::<member>
    true_label: str | None  # the class folder it sits in, if any


@dataclass
class Inputs:
    items: list[Item] = field(default_factory=list)
    left_out: Counter = field(default_factory=Counter)   # masks/, Lung_Opacity/, ... (scan_source)


def _label_of(rel_dirs: Sequence[str]) -> str | None:
    from covid_cxr.config import KAGGLE_ROOT
    from covid_cxr.data.layouts import canonical_class

    dirs = list(rel_dirs)
    if dirs and dirs[-1].lower() == "images":
        dirs.pop()
    if dirs and dirs[0] == KAGGLE_ROOT:
        dirs.pop(0)
    return canonical_class(dirs[-1]) if dirs else None


def check_zip(zf: zipfile.ZipFile, dest: Path) -> None:
    """Refuse an archive that would unpack to more than the caps or the free disk space.

    The caps above go through `data import`'s header check (archive.check_zip_headers).
    """
    from covid_cxr.data.archive import UnsafeArchive, ZipLimits, check_zip_headers

    infos = [m for m in zf.infolist() if not m.is_dir()]
    limits = ZipLimits(max_total_bytes=ZIP_MAX_BYTES, max_member_bytes=ZIP_MAX_BYTES, max_ratio=ZIP_MAX_RATIO,
                       ratio_min_bytes=1 << 20, max_members=ZIP_MAX_MEMBERS,
                       names=("COVID_CXR_ZIP_MAX_GB", "COVID_CXR_ZIP_MAX_GB", "the predict limit"))
    try:
        check_zip_headers(infos, limits)
    except UnsafeArchive as e:
        raise PredictError(str(e)) from None
    total = sum(m.file_size for m in infos)
    free = shutil.disk_usage(dest).free
    if total > free * 0.9:
        raise PredictError(f"the zip unpacks to {total / 1e9:.1f} GB but {dest} has {free / 1e9:.1f} GB free "
                           "(set TMPDIR to a larger disk)")


def _unzip(src: Path, stack: ExitStack) -> Path:
    from covid_cxr.data.archive import _extract_zip

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="covid-cxr-predict-")))
    try:
        with zipfile.ZipFile(src) as zf:
            check_zip(zf, tmp)
            _extract_zip(zf, tmp)   # the safe extraction of `data import` (members stay inside tmp)
    except zipfile.BadZipFile as e:
        raise PredictError(f"{src}: not a readable zip file ({e})") from None
    except ValueError as e:        # a member outside the folder
        raise PredictError(f"{src}: {e}") from None
    return tmp


def _folder(root: Path, shown: str, out: Inputs, zip_mode: bool = False) -> None:
    from covid_cxr.data.layouts import scan_source

    scan = scan_source(root)
    out.left_out.update(scan.skipped)
    sep = "::" if zip_mode else "/"
    for f in scan.files:
        out.items.append(Item(f.path, f"{shown.rstrip('/')}{sep}{f.rel}", f.label))


def collect(sources: Sequence[str | Path], stack: ExitStack) -> Inputs:
    """PATH arguments -> the files to score, in argument order (each folder sorted), no duplicates."""
    out = Inputs()
    for s in sources:
        shown = os.fspath(s)
        p = Path(shown)
        if p.is_dir():
            _folder(p, shown, out)
        elif p.is_file() and p.suffix.lower() == ".zip":
            _folder(_unzip(p, stack), shown, out, zip_mode=True)
        elif p.is_file():
            out.items.append(Item(p, shown, _label_of(p.absolute().parent.parts[-2:])))
        else:
            raise FileNotFoundError(f"{shown}: no such file or folder")
    seen: set[str] = set()
    uniq = []
    for it in out.items:
        if it.path not in seen:
            seen.add(it.path)
            uniq.append(it)
    out.items = uniq
    return out
