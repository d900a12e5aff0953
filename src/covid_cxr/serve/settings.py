"""The service's settings: one source each.

- What the service is (limits, batching, precision, the prediction log's rotation): params.yaml
  `serve:`. `covid-cxr package` builds them into the Bento as its arguments (`bentoml build --arg`,
  release/bentoargs.py),
  so a Bento carries the settings it was built and tested with; `covid-cxr serve --model-dir`
  passes the project's. The service reads them with `bentoml.use_arguments` (ServeArgs).
- What an operator sets per machine: environment variables, three of them:
      COVID_CXR_API_TOKEN       if set, every endpoint but /, /static/*, /healthz, /livez and /readyz
                                needs `Authorization: Bearer <token>` (401)
      COVID_CXR_PREDICTION_LOG  where the prediction log goes (default ~/.local/state/covid-cxr/
                                predictions.jsonl; `off` switches it off): serve/monitoring/predlog.py
      COVID_CXR_TORCH_THREADS   torch threads of the worker (default: every core)
`covid-cxr serve --help` and /metadata show the values in force.
"""
from __future__ import annotations

import os
from pydantic import BaseModel

from covid_cxr.release.bentoargs import SERVE_KEYS

class ServeArgs(BaseModel):
    """The Bento's arguments: which model (modelsource.py) and params.yaml `serve:`."""

    model: str | None = None                 # a model in the BentoML store (a built Bento names its own)
    model_dir: str | None = None             # a model directory (development)
    max_upload_mb: float | None = None       # None: not given (a Bento built without them cannot serve)
    max_pixels: int | None = None
    max_batch_files: int | None = None
    batch_max_size: int | None = None
    batch_max_latency_ms: int | None = None
    model_passes: int | None = None
    precision: str | None = None
    log_max_mb: float | None = None
    log_backups: int | None = None
    log_queue: int | None = None


class ServeSettings:
    """The settings in force: the service's from its arguments, the machine's from the environment."""

    def __init__(self, args: ServeArgs) -> None:
        missing = [k for k in SERVE_KEYS if getattr(args, k) is None]
        if missing:
            raise RuntimeError(f"the service was started without its settings ({', '.join(missing)}): start it with "
                               "`covid-cxr serve`, or serve a Bento `covid-cxr package` built (params.yaml serve:)")
        self.max_upload_bytes = int(float(args.max_upload_mb) * 1024 * 1024)
        self.max_pixels = int(args.max_pixels)
        self.max_files = int(args.max_batch_files)
        self.batch_max_size = max(2, int(args.batch_max_size))
        self.batch_max_latency_ms = int(args.batch_max_latency_ms)
        self.model_passes = max(1, int(args.model_passes))
        self.precision = str(args.precision)
        self.log = {"max_mb": float(args.log_max_mb), "backups": int(args.log_backups), "queue": int(args.log_queue)}
        self.token = os.environ.get("COVID_CXR_API_TOKEN") or None
        self.torch_threads = torch_threads()


def torch_threads() -> int:
    """COVID_CXR_TORCH_THREADS, else every core (bench/bench_service.py measured the split)."""
    raw = os.environ.get("COVID_CXR_TORCH_THREADS", "").strip()
    if not raw:
        return max(1, os.cpu_count() or 1)
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"COVID_CXR_TORCH_THREADS={raw!r} is not a whole number") from None
    if n < 1:
        raise ValueError(f"COVID_CXR_TORCH_THREADS must be >= 1, got {raw}")
    return n
