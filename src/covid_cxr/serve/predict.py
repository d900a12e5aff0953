"""`covid-cxr predict PATH...`: score files, folders or zips in-process, into a CSV.

    covid-cxr predict incoming/batch-002                       # -> predictions.csv
    covid-cxr predict scans.zip more/*.dcm --out run.csv --heatmaps run-heatmaps/
    covid-cxr predict incoming/ --model artifacts/model        # a model directory
    covid-cxr predict incoming/ --model covid_cxr:3f2a...      # a BentoML model tag

What it scores
    A file is one image (PNG, JPEG, BMP, TIFF, WebP, DICOM: whatever the service takes). A folder
    is read like `data import` reads one (`layouts.scan_source`: the Kaggle layout
    `<Class>/images/*` or the flat layout `<Class>/*`; masks/, Lung_Opacity/, *.xlsx, README and
    hidden files are left out and counted), and a class folder's name becomes `true_label`.
    A `.zip` is unpacked to a temporary folder with `data import`'s safe extraction (no member
    outside the folder) after the size checks below, then read like a folder; its rows' `path` is
    `<zip>::<member>`.

Which model
    The production model by default (registry/production.json -> its BentoML model tag in the
    store under BENTOML_HOME; `covid-cxr pull-production` brings it); `--model` takes a model directory
    (model.json + model.safetensors) or a BentoML model tag.

Same answer as the service
    Each file is decoded as the service decodes an upload (`scoring.read_film`) and the batch
    goes through `LoadedModel.predict` (calibrated probabilities, novelty, verdict.py's rule):
    `scoring.score_stream`, in this process, with no server. Decoding runs in a small thread pool
    ahead of the model.

The CSV (--out, default predictions.csv)
    One row per file: COLUMNS below. A file that cannot be scored gets a row with `error` (the
    reason code, as the API's) and `error_detail`; the run goes on. Rows are appended a batch at a
    time (one write + fsync per batch; a torn last line from a killed run is cut off on the next
    run). A second run with the same --out skips every file whose (path, sha256, model) already has
    a row, so an interrupted run resumes and a changed file (or a new model) is scored again; the
    file's older row is then dropped (the CSV is rewritten once, atomically, at the end).

Privacy
    Nothing of a DICOM's header is written anywhere: the CSV holds the path the user gave, the
    file's sha256 and the model's outputs; heat maps are PNGs made from the pixels only.
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import typer

from covid_cxr.config import CLASSES, Paths

PROB_COLUMNS = tuple("p_" + re.sub(r"\W+", "_", c) for c in CLASSES)   # p_COVID, p_Normal, p_Viral_Pneumonia
COLUMNS = ("path", "sha256", "true_label", "label", "verdict", "reason", *PROB_COLUMNS, "novelty",
           "in_distribution", "model", "error", "error_detail", "heatmap", "scored_at")

# A zip is unpacked before scoring: refuse archives whose declared content is out of proportion.
ZIP_MAX_BYTES = int(float(os.environ.get("COVID_CXR_ZIP_MAX_GB", "50")) * 1024 ** 3)
ZIP_MAX_MEMBERS = 1_000_000
ZIP_MAX_RATIO = 200          # uncompressed / compressed, per member over 1 MB (images barely compress)


class PredictError(RuntimeError):
    """A run that cannot start (no model, a bad zip, a CSV of another layout); the message says why."""


# --------------------------------------------------------------------------- inputs


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
    """Refuse an archive that would unpack to more than the caps or the free disk space."""
    infos = [m for m in zf.infolist() if not m.is_dir()]
    if len(infos) > ZIP_MAX_MEMBERS:
        raise PredictError(f"the zip holds {len(infos):,} files, over the {ZIP_MAX_MEMBERS:,} limit")
    total = sum(m.file_size for m in infos)
    if total > ZIP_MAX_BYTES:
        raise PredictError(f"the zip unpacks to {total / 1024 ** 3:.1f} GiB, over the "
                           f"{ZIP_MAX_BYTES / 1024 ** 3:g} GiB limit (COVID_CXR_ZIP_MAX_GB)")
    for m in infos:
        if m.file_size > (1 << 20) and m.file_size > ZIP_MAX_RATIO * max(m.compress_size, 1):
            raise PredictError(f"zip member {m.filename!r} expands {m.file_size / max(m.compress_size, 1):.0f}x: "
                               "refusing a likely zip bomb")
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


# --------------------------------------------------------------------------- model


def resolve_model(spec: str | None, paths: Paths | None = None) -> tuple[Path, str]:
    """--model (a directory or a BentoML tag) or the production model -> (model dir, model tag).

    The tag is what the service reports as `model`: the store tag, or `dir:<path>` for a directory.
    """
    if spec:
        d = Path(spec)
        if (d / "model.json").is_file():
            return d.resolve(), f"dir:{d.resolve()}"
        if d.is_dir():
            raise PredictError(f"{d} holds no model.json")
        return _store_model(spec)
    from covid_cxr.release.promotion import PromotionError, production

    paths = paths or Paths()
    try:
        rec = production(paths)
    except PromotionError as e:
        raise PredictError(str(e)) from None
    if rec is None:
        raise PredictError(f"nothing is in production yet ({paths.production} is missing): pass --model "
                           "artifacts/model (a model directory) or --model covid_cxr:<version>, or run "
                           "`covid-cxr pull-production` on a clone whose record names one")
    return _store_model(rec["model"])


def _store_model(tag: str) -> tuple[Path, str]:
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        m = bentoml.models.get(tag)
    except (NotFound, BentoMLException, ValueError) as e:
        raise PredictError(f"model {tag!r} is neither a model directory nor in the BentoML model store "
                           f"({os.environ.get('BENTOML_HOME', '~/bentoml')}): {e}") from None
    return Path(m.path), str(m.tag)


# --------------------------------------------------------------------------- the CSV


class ResultsCsv:
    """The --out CSV: what it already holds, batch appends, and the final compaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.done: dict[str, tuple[str, str]] = {}   # path -> (sha256, model) of its last row
        self.rows_per_path: Counter = Counter()
        self.superseded: set[str] = set()
        self._load()

    def _load(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):           # a run killed mid-write: drop the torn line
            cut = data.rfind(b"\n") + 1
            os.truncate(self.path, cut)
            data = data[:cut]
        if not data:
            return
        rows = csv.reader(io.StringIO(data.decode("utf-8")))
        header = next(rows, None)
        if tuple(header or ()) != COLUMNS:
            raise PredictError(f"{self.path} has other columns than `covid-cxr predict` writes; "
                               "pass another --out (or move that file away)")
        for r in rows:
            if len(r) != len(COLUMNS):
                continue
            row = dict(zip(COLUMNS, r))
            self.rows_per_path[row["path"]] += 1
            self.done[row["path"]] = (row["sha256"], row["model"])

    def is_done(self, path: str, sha256: str, model: str) -> bool:
        return bool(sha256) and self.done.get(path) == (sha256, model)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """One write and one fsync for the whole batch."""
        if not rows:
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        new = not self.path.exists() or self.path.stat().st_size == 0
        if new:
            w.writerow(COLUMNS)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r[c] for c in COLUMNS])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            if r["path"] in self.done or self.rows_per_path[r["path"]]:
                self.superseded.add(r["path"])
            self.rows_per_path[r["path"]] += 1
            self.done[r["path"]] = (r["sha256"] or "", r["model"])

    def compact(self) -> int:
        """Keep only the last row of each path (atomic rewrite). -> rows dropped."""
        if not self.path.exists() or not any(n > 1 for n in self.rows_per_path.values()):
            return 0
        with open(self.path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))[1:]
        last: dict[str, list[str]] = {}
        for r in rows:
            if len(r) == len(COLUMNS):
                last.pop(r[0], None)     # re-insert: a re-scored file moves to where it was re-scored
                last[r[0]] = r
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(COLUMNS)
            w.writerows(last.values())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.rows_per_path = Counter({p: 1 for p in last})
        return len(rows) - len(last)


# --------------------------------------------------------------------------- heat maps


def _heatmap_name(item: Item, sha256: str) -> str:
    stem = Path(item.path.split("::")[-1]).stem
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:80]}.{sha256[:10]}.png"


def write_heatmaps(model, films, labels: list[str], items: list[Item], out_dir: Path) -> list[str]:
    """Grad-CAM overlays for one batch (as /explain makes them). -> the files written."""
    import numpy as np

    from covid_cxr.model.gradcam import gradcam, overlay, to_png

    x = model.to_input(np.stack([f.small for f in films]))
    cams, _, _ = gradcam(model.net, x, [CLASSES.index(lab) for lab in labels])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f, cam, it in zip(films, cams, items):
        dst = out_dir / _heatmap_name(it, f.sha256)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
        tmp.write_bytes(to_png(overlay(f.shown if f.shown is not None else f.small, cam)))
        os.replace(tmp, dst)
        written.append(str(dst))
    return written


# --------------------------------------------------------------------------- the run


class _LogLines:
    """tqdm's output for a non-terminal stderr: one plain line per refresh, no carriage returns."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, enabled: bool = True):
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc="predict", unit="file", disable=not enabled, mininterval=0.5 if tty else 15,
                file=sys.stderr if tty else _LogLines(sys.stderr), ascii=not tty, ncols=None if tty else 100,
                dynamic_ncols=tty)


def default_threads() -> int:
    """torch threads while decoding overlaps the forward: all cores but one (the service's rule)."""
    return max(1, (os.cpu_count() or 1) - 1)


def _row(item: Item, **kw) -> dict[str, Any]:
    r = {"path": item.path, "true_label": item.true_label}
    r.update(kw)
    return r


def run_predict(sources: Sequence[str | Path], out: Path, model=None, model_tag: str | None = None, *,
                model_spec: str | None = None, heatmaps: Path | None = None, batch_size: int = 32,
                workers: int | None = None, progress: bool = True, overlap: bool = True) -> dict[str, Any]:
    """Score `sources` into the CSV `out`. Pass a loaded `model` (+ its tag) or `model_spec`
    (resolve_model's argument). -> the run's summary (see `format_summary`)."""
    from covid_cxr.evaluation.scoring import score_stream

    t_start = time.perf_counter()
    for s in sources:  # a mistyped path is reported before the model is loaded
        if not Path(s).exists():
            raise FileNotFoundError(f"{s}: no such file or folder")
    res = ResultsCsv(out)
    if model is None:
        from covid_cxr.model.checkpoint import load_model

        mdir, model_tag = resolve_model(model_spec)
        model = load_model(mdir)
    model_tag = model_tag or "unknown"
    summary: dict[str, Any] = {"out": str(out), "model": model_tag, "files": 0, "scored": 0, "skipped": 0,
                               "errors": Counter(), "labels": Counter(), "labels_ok": Counter(),
                               "verdicts": Counter(), "reasons": Counter(), "left_out": {}, "heatmaps": 0,
                               "true_label": {"n": 0, "agree": 0, "n_ok": 0, "agree_ok": 0}}
    with ExitStack() as stack:
        inputs = collect(sources, stack)
        items = inputs.items
        summary["files"], summary["left_out"] = len(items), dict(inputs.left_out)
        bar = stack.enter_context(progress_bar(len(items), progress))
        t0 = time.perf_counter()
        forward = 0.0
        stream = score_stream(model, [it.file for it in items], batch_size, workers=workers,
                              keep_shown=heatmaps is not None, overlap=overlap,
                              skip=lambda i, sha: res.is_done(items[i].path, sha, model_tag))
        for b in stream:
            forward += b.forward_s
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            rows: dict[int, dict[str, Any]] = {}
            for i, (sha, err) in b.errors.items():
                rows[i] = _row(items[i], sha256=sha, model=model_tag, error=err.code, error_detail=err.message,
                               scored_at=now)
                summary["errors"][err.code] += 1
            if b.preds is not None:
                p = b.preds
                labels = p.labels
                maps = [None] * len(b.indices)
                if heatmaps is not None:
                    maps = write_heatmaps(model, b.films, labels, [items[i] for i in b.indices], Path(heatmaps))
                    summary["heatmaps"] += len(maps)
                for k, i in enumerate(b.indices):
                    nov = None if p.novelty is None else round(float(p.novelty[k]), 4)
                    rows[i] = _row(
                        items[i], sha256=b.films[k].sha256, label=labels[k], verdict=p.verdict[k],
                        reason=p.reason[k], **{c: f"{float(v):.6f}" for c, v in zip(PROB_COLUMNS, p.probs[k])},
                        novelty=nov, in_distribution=str(not bool(p.novel[k])).lower(), model=model_tag,
                        heatmap=maps[k], scored_at=now)
                    _count(summary, items[i], labels[k], p.verdict[k], p.reason[k])
            res.append([rows[i] for i in sorted(rows)])
            summary["scored"] += len(b.indices)
            summary["skipped"] += len(b.skipped)
            bar.update(b.stop - b.start)
            bar.set_postfix(scored=summary["scored"], errors=sum(summary["errors"].values()),
                            skipped=summary["skipped"], refresh=False)
        wall = time.perf_counter() - t0
    summary["dropped_old_rows"] = res.compact()
    summary["wall_s"] = round(wall, 3)
    summary["forward_s"] = round(forward, 3)
    summary["total_s"] = round(time.perf_counter() - t_start, 3)
    summary["images_per_s"] = round(summary["scored"] / wall, 2) if wall > 0 and summary["scored"] else 0.0
    return summary


def _count(summary: dict[str, Any], item: Item, label: str, verdict: str, reason: str | None) -> None:
    summary["labels"][label] += 1
    summary["verdicts"][verdict] += 1
    if reason:
        summary["reasons"][reason] += 1
    else:
        summary["labels_ok"][label] += 1
    if item.true_label:
        t = summary["true_label"]
        t["n"] += 1
        t["agree"] += label == item.true_label
        if verdict == "ok":
            t["n_ok"] += 1
            t["agree_ok"] += label == item.true_label


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def format_summary(s: dict[str, Any]) -> str:
    from covid_cxr.data.layouts import skipped_line

    n_err = sum(s["errors"].values())
    lines = [
        f"Scored {s['scored']} of {s['files']} files with {s['model']} in {s['wall_s']:.1f} s "
        f"({s['images_per_s']:.1f} images/s); {s['skipped']} already in {s['out']}, {n_err} could not be scored.",
        f"  labels (most probable class): {_counts(s['labels'])}",
        f"  verdicts: {_counts(s['verdicts'])}" + (f"; refer reasons: {_counts(s['reasons'])}" if s["reasons"] else ""),
        f"  labels with verdict ok: {_counts(s['labels_ok'])}",
    ]
    if n_err:
        lines.append(f"  errors: {_counts(s['errors'])} (rows with `error` in the CSV)")
    t = s["true_label"]
    if t["n"]:
        lines.append(f"  against the class folders: {t['agree']}/{t['n']} agree ({100 * t['agree'] / t['n']:.1f} %)"
                     + (f"; {t['agree_ok']}/{t['n_ok']} of the ok verdicts" if t["n_ok"] else ""))
    if s["left_out"]:
        lines.append("  " + skipped_line(s["left_out"]))
    if s["heatmaps"]:
        lines.append(f"  {s['heatmaps']} Grad-CAM heat maps written")
    if s.get("dropped_old_rows"):
        lines.append(f"  {s['dropped_old_rows']} older rows of re-scored files dropped from {s['out']}")
    return "\n".join(lines)


def register(app, data_app) -> None:  # noqa: ARG001
    @app.command("predict")
    def predict_cmd(
        paths: list[str] = typer.Argument(..., metavar="PATH...", help="Image files, folders (Kaggle or flat "
                                          "<Class>/ layout) or .zip archives."),
        out: Path = typer.Option(Path("predictions.csv"), "--out", "-o",
                                 help="CSV to write; an existing one is resumed (scored files are skipped)."),
        heatmaps: Path = typer.Option(None, "--heatmaps", help="Write a Grad-CAM overlay PNG per film here."),
        model: str = typer.Option(None, "--model", help="Model directory or BentoML model tag "
                                  "(default: the production model)."),
        batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Films per forward pass."),
        workers: int = typer.Option(None, "--workers", min=1, help="Decoding threads (default: min(4, cores))."),
        threads: int = typer.Option(None, "--threads", min=1, help="torch intra-op threads (default: all cores "
                                    "but one, as the service: the decoding threads get the last one)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    ) -> None:
        """Score X-rays in-process (no server) with the service's forward pass and verdict, into a CSV."""
        import torch

        torch.set_num_threads(threads or default_threads())
        try:
            s = run_predict(paths, out, model_spec=model, heatmaps=heatmaps, batch_size=batch_size,
                            workers=workers, progress=progress)
        except PredictError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
        typer.echo(format_summary(s), err=True)
        if not s["files"]:
            typer.secho("error: no image files found in " + " ".join(paths), fg=typer.colors.RED, err=True)
            raise typer.Exit(1)
