"""What a Bento is built with: params.yaml `serve:`, checked, as `bentoml build` / `bentoml serve`
arguments. The service reads them back with `bentoml.use_arguments` (serve/settings.py ServeArgs)."""
from __future__ import annotations

from typing import Any

from covid_cxr.model.precision import SERVE_PRECISIONS

SERVE_KEYS = ("max_upload_mb", "max_pixels", "max_batch_files", "batch_max_size", "batch_max_latency_ms",
              "model_passes", "precision", "log_max_mb", "log_backups", "log_queue")


def serve_params(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml `serve:`, checked: every key, nothing else."""
    s = dict(params["serve"])
    missing, extra = [k for k in SERVE_KEYS if k not in s], [k for k in s if k not in SERVE_KEYS]
    if missing or extra:
        raise KeyError(f"params.yaml serve: missing {missing or '-'}, unknown {extra or '-'}")
    if s["precision"] not in SERVE_PRECISIONS:
        raise ValueError(f"params.yaml serve.precision must be one of {SERVE_PRECISIONS}, not {s['precision']!r}")
    return s


def bento_args(params: dict[str, Any]) -> list[str]:
    """`--arg key=value` for each setting of params.yaml `serve:` (bentoml build / bentoml serve)."""
    return [a for k, v in serve_params(params).items() for a in ("--arg", f"{k}={v}")]
