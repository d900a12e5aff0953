"""`covid-cxr predict PATH...`: score files, folders or zips in-process, into a CSV.

    covid-cxr predict incoming/batch-002 > run.csv             # the CSV on stdout, the summary on stderr
    covid-cxr predict scans.zip more/*.dcm --out run.csv --heatmaps run-heatmaps/   # resumable
    covid-cxr predict incoming/ --model artifacts/model        # a model directory
    covid-cxr predict incoming/ --model covid_cxr:3f2a...      # a BentoML model tag

What it scores (files, folders, zips): predictinput.py. The CSV it writes: predictcsv.py.

Which model
    The production model by default (registry/production.json -> its BentoML model tag in the
    store under BENTOML_HOME; `covid-cxr pull-production` brings it); `--model` takes a model directory
    (model.json + model.safetensors) or a BentoML model tag.

Same answer as the service
    Each file is decoded as the service decodes an upload (`scoring.read_film`) and the batch
    goes through `LoadedModel.predict` (calibrated probabilities, novelty, verdict.py's rule):
    `scoring.score_stream`, in this process, with no server. Decoding runs in a small thread pool
    ahead of the model.

Where it writes
    Only where it is told: the CSV to stdout, or to --out (a second run with the same --out
    resumes); heat maps only with --heatmaps. Each scored film is appended to the prediction log
    (serve/monitoring/predlog.py: the service's default location, `bento` null), so `covid-cxr
    monitor` sees batch scoring too; --no-log leaves it out.

Exit status
    0 when the run scored its files (some may have failed: their rows carry `error`); 1 when no
    file could be scored, or none was found; 2 for a missing path.

Privacy
    Nothing of a DICOM's header is written anywhere: the CSV holds the path the user gave, the
    file's sha256 and the model's outputs; heat maps are PNGs made from the pixels only.
"""
from __future__ import annotations

import os
import re
import sys
import time
from collections import Counter
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import typer

from covid_cxr.config import CLASSES, Paths
from covid_cxr.serve.predictcsv import PROB_COLUMNS, ResultsCsv
from covid_cxr.serve.predicterror import PredictError
from covid_cxr.serve.predictinput import Item, collect


# --------------------------------------------------------------------------- model


def looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~")) or ":" not in spec


def resolve_model(spec: str | None, paths: Paths | None = None) -> tuple[Path, str]:
    """--model (a directory or a BentoML tag) or the production model -> (model dir, model id).

    The id is what the service reports as `model`: the store tag, or `dir:<sha of its files>` for a
    directory (modelmeta.model_id)."""
    from covid_cxr.model.modelmeta import model_id

    if spec:
        d = Path(spec).expanduser()
        if (d / "model.json").is_file():
            return d.resolve(), f"dir:{model_id(d)}"
        if d.is_dir():
            raise PredictError(f"--model {spec} is not a model directory (no model.json): give the folder "
                               "`covid-cxr train` writes, e.g. artifacts/model, or a model tag covid_cxr:<version>")
        if looks_like_path(spec):
            raise PredictError(f"--model {spec}: no such model directory (nor a model tag, which reads "
                               "covid_cxr:<version>)")
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
    except (NotFound, BentoMLException, ValueError):
        raise PredictError(f"model {tag} is not in the BentoML model store ({os.environ.get('BENTOML_HOME', '~/bentoml')})"
                           ": `covid-cxr pull-production` fetches production's; `bentoml models list` shows "
                           "what is there") from None
    return Path(m.path), str(m.tag)


# --------------------------------------------------------------------------- heat maps


def _heatmap_name(item: Item, sha256: str) -> str:
    stem = Path(item.path.split("::")[-1]).stem
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:80]}.{sha256[:10]}.png"


def write_heatmaps(model, films, labels: list[str], items: list[Item], out_dir: Path) -> list[str]:
    """Grad-CAM overlays for one batch (as /explain makes them). -> the files written."""
    import numpy as np

    from covid_cxr.model.gradcam import gradcam, overlay, to_png

    x = model.to_input(np.stack([f.small for f in films]))
    cams, _, _ = gradcam(model.net, x, [CLASSES.index(lab) for lab in labels], head=model.cam_head(x))
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
                workers: int | None = None, progress: bool = True, overlap: bool = True,
                predlog=None) -> dict[str, Any]:
    """Score `sources` into the CSV `out`. Pass a loaded `model` (+ its tag) or `model_spec`
    (resolve_model's argument); `predlog` (a predlog.PredictionLog) gets one record per scored film.
    -> the run's summary (see `format_summary`)."""
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
                    if predlog is not None:
                        f = b.films[k]
                        predlog.write({"model": model_tag, "bento": None, "label": labels[k],
                                       "probabilities": dict(zip(CLASSES, (float(v) for v in p.probs[k]))),
                                       "verdict": p.verdict[k], "reason": p.reason[k], "novelty": nov,
                                       "flagged": bool(p.novel[k]), **(f.info or {})})
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
        out: Path = typer.Option(None, "--out", "-o", help="CSV to write (default: stdout); an existing one "
                                 "is resumed (files scored before are skipped)."),
        heatmaps: Path = typer.Option(None, "--heatmaps", help="Write a Grad-CAM overlay PNG per film here."),
        model: str = typer.Option(None, "--model", help="Model directory or BentoML model tag "
                                  "(default: the production model)."),
        batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Films per forward pass."),
        workers: int = typer.Option(None, "--workers", min=1, help="Decoding threads (default: min(4, cores))."),
        threads: int = typer.Option(None, "--threads", min=1, help="torch intra-op threads (default: all cores "
                                    "but one, as the service: the decoding threads get the last one)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
        log: bool = typer.Option(True, "--log/--no-log", help="Append each scored film to the prediction log "
                                 "(where the service writes it; see `covid-cxr monitor`)."),
    ) -> None:
        """Score X-rays in-process (no server) with the service's forward pass and verdict, into a CSV."""
        import tempfile

        import torch

        from covid_cxr.console import fail
        from covid_cxr.serve.monitoring.predlog import NullPredictionLog, PredictionLog

        from covid_cxr.config import load_params
        from covid_cxr.release.bentoargs import serve_params

        torch.set_num_threads(threads or default_threads())
        settings = serve_params(load_params(Paths().root / "params.yaml"))
        plog = PredictionLog.configured({k[4:]: v for k, v in settings.items() if k.startswith("log_")}) \
            if log else NullPredictionLog()
        with tempfile.TemporaryDirectory(prefix="covid-cxr-predict-") as tmp:
            target = out or Path(tmp) / "predictions.csv"
            try:
                s = run_predict(paths, target, model_spec=model, heatmaps=heatmaps, batch_size=batch_size,
                                workers=workers, progress=progress, predlog=plog)
            except PredictError as e:
                fail(str(e))
            finally:
                plog.close()
            if out is None and target.exists():
                sys.stdout.write(target.read_text())
                sys.stdout.flush()
        if out is None:
            s["out"] = "stdout"
        typer.echo(format_summary(s), err=True)
        if not s["files"]:
            fail("no image files found in " + " ".join(paths))
        if not s["scored"] and not s["skipped"]:
            fail(f"none of the {s['files']} files could be scored ({_counts(s['errors'])})")
