"""What the API answers: one image's result, the refusals, the timing headers, and the
Grad-CAM images of /explain and /report."""
from __future__ import annotations

import base64
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.responses import JSONResponse

from covid_cxr.config import CLASSES
from covid_cxr.data.preprocess import SHOWN_MAX, ImageError
from covid_cxr.model.verdict import REASONS
from covid_cxr.serve.batching import Overloaded
from covid_cxr.serve.guard import error_response

if TYPE_CHECKING:   # torch is the worker's, never the supervising process's (service.py imports this)
    from covid_cxr.model.checkpoint import LoadedModel, Predictions



def answer(pred: "Predictions", i: int, model_tag: str) -> dict[str, Any]:
    """Image i of a forward pass as the API returns it."""
    nov = None if pred.novelty is None else float(pred.novelty[i])
    reason = pred.reason[i]
    return {
        "label": pred.labels[i],
        "probabilities": {k: round(float(p), 6) for k, p in zip(CLASSES, pred.probs[i])},
        "verdict": pred.verdict[i],
        "reason": reason,
        "message": REASONS[reason] if reason else None,
        "novelty": None if nov is None or np.isnan(nov) else round(nov, 4),
        "in_distribution": not bool(pred.novel[i]),
        "model": model_tag,
    }


def refused(e: ImageError | Overloaded) -> JSONResponse:
    """A bad upload (4xx by its code, guard.STATUS) or a full model queue (503)."""
    if isinstance(e, Overloaded):
        return error_response("overloaded", str(e), 503)
    return error_response(e.code, e.message)


def timing_headers(n: int, timing: dict[str, float]) -> dict[str, str]:
    """X-Batch-Size, and Server-Timing (decode / queue / model, ms) for operators and benchmarks."""
    return {"X-Batch-Size": str(n), "Server-Timing": ", ".join(f"{k};dur={v:.2f}" for k, v in timing.items())}


def b64png(arr: np.ndarray) -> str:
    from covid_cxr.model.gradcam import to_png

    return base64.b64encode(to_png(arr)).decode("ascii")


def cam_images(model: "LoadedModel", lock: threading.Lock, gray: np.ndarray, small: np.ndarray,
               target: int) -> tuple[np.ndarray, np.ndarray, str]:
    """-> (the film as shown, longest side <= SHOWN_MAX; its Grad-CAM overlay for class `target`;
    the CAM method). `small` is the model-size film; `lock` serialises the backward passes."""
    from PIL import Image

    from covid_cxr.model.gradcam import gradcam, overlay

    x = model.to_input(small[None])
    with lock:
        cams, _, methods = gradcam(model.net, x, target, head=model.cam_head(x))
    h, w = gray.shape
    scale = min(1.0, SHOWN_MAX / max(h, w))
    shown = gray
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        shown = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR))
    return shown, overlay(shown, cams[0]), methods[0]
