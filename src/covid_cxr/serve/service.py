"""The prediction service: BentoML HTTP API + the analysis web page.

    bentoml serve covid_cxr.serve.service:CovidCxr    # dev, model from the store or COVID_CXR_MODEL_DIR
    bentoml serve covid_cxr:<version>                 # a built Bento
    covid-cxr serve                                   # the Bento in production (registry/production.json)

Which model: modelsource.py. Limits, batching, precision: params.yaml `serve:`, built into the Bento
as its arguments; the token, the log's place and the threads: environment variables (settings.py).

Endpoints
    POST /predict        multipart `image`             -> {label, probabilities, verdict, reason, message,
                                                            novelty, in_distribution, model}
    POST /predict_batch  multipart `images` (repeated) -> [same, ...] in upload order
    POST /explain        multipart `image`             -> same + Grad-CAM overlay (base64 PNG)
    POST /report         multipart `image` [+ `format` pdf|png] -> the analysis report as a download (report.py)
    GET  /healthz /livez (liveness), /readyz (model loaded and warm), /metadata, /metrics
    GET  /               the web page (static files in covid_cxr/serve/web, no build step, no CDN)

Bad input never yields a 500: every rejection is 4xx with JSON {"error": code, "detail": text}
(guard.py: token, size and media type before parsing; multipart.py: the body; uploads.py: the image).

Every answer carries `verdict`: `ok`, or `refer` with a `reason` (model/verdict.py):
`not_a_chest_film` (the input gate), `not_an_xray`, `outside_training_data`, `low_confidence` or
`covid_not_excluded`. `label` is always the most probable class; with `refer` it is not the answer.

Batching (batching.py): /predict, /predict_batch and /explain decode and validate each upload
first (so one bad file cannot fail anybody else's batch), then queue the model-size films;
whenever the model is free, everything queued goes into one forward pass.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from covid_cxr.config import CLASSES
from covid_cxr.data.preprocess import ImageError, resize_gray
from covid_cxr.serve import multipart
from covid_cxr.serve.answers import answer, b64png, cam_images, refused, timing_headers
from covid_cxr.serve.batching import Batcher, Overloaded
from covid_cxr.serve.contract import ContractMiddleware
from covid_cxr.serve.guard import GuardMiddleware, error_response
from covid_cxr.serve.metadata import DISCLAIMER, describe
from covid_cxr.serve.modelsource import bento_tag, locate_model, serve_args, store_model_ref
from covid_cxr.serve.monitoring.predlog import PredictionLog
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.data.checkfilm import CheckedFilm
from covid_cxr.serve.uploads import decode_upload

log = logging.getLogger("covid_cxr.serve.service")

WEB_DIR = Path(__file__).parent / "web"

multipart.install()
ARGS = serve_args()                 # which model and params.yaml serve: (settings.py), as bento arguments
SETTINGS = ServeSettings(ARGS)

web = FastAPI(title="covid-cxr web", docs_url=None, redoc_url=None, openapi_url=None)
web.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


@bentoml.service(
    name="covid_cxr",
    workers=1,
    traffic={"timeout": 120},
    labels={"project": "covid-cxr"},
)
@bentoml.asgi_app(web, path="/")
class CovidCxr:
    """Chest X-ray triage: COVID / Normal / Viral Pneumonia, with calibrated probabilities."""

    if not ARGS.model_dir:
        bento_model = store_model_ref(ARGS)

    def __init__(self) -> None:
        import torch

        self.settings = SETTINGS
        torch.set_num_threads(SETTINGS.torch_threads)
        self.model_dir, self.model_tag, self.store_info = locate_model(CovidCxr, ARGS,
                                                                        getattr(self, "bento_model", None))
        self.bento = bento_tag(CovidCxr)
        self.model: Any = None
        self.load_error: str | None = None
        self.ready = False
        self.batcher: Batcher | None = None
        self._explain_lock = threading.Lock()
        self._decode_limiter: anyio.CapacityLimiter | None = None
        self.predlog = PredictionLog.configured(SETTINGS.log)
        log.info("covid-cxr: model %s from %s", self.model_tag, self.model_dir)

    # ---------- lifecycle ----------
    def _load(self) -> None:
        from covid_cxr.model.checkpoint import load_meta, load_model
        from covid_cxr.model.precision import serve_precision

        t0 = time.perf_counter()
        precision = serve_precision(load_meta(self.model_dir)["inference"], self.settings.precision)
        model = load_model(self.model_dir, precision=precision)
        model.predict(np.zeros((1, model.size, model.size), np.uint8))  # first-call allocations
        self.model = model
        log.info("covid-cxr: model loaded in %.1fs (image_size=%d, %s, %d threads)", time.perf_counter() - t0,
                 model.size, model.precision, self.settings.torch_threads)

    @bentoml.on_startup
    async def _startup(self) -> None:
        # keep a reference: the event loop holds tasks only weakly
        self._load_task = asyncio.get_running_loop().create_task(self._load_and_warm())

    async def _load_and_warm(self) -> None:
        try:
            import torch

            s = self.settings
            # the model is loaded, warmed and answers on the batcher's threads (batching.py: slot 0)
            self.batcher = Batcher(lambda grays, rules: self.model.predict(grays, rules), s.batch_max_size,
                                   s.batch_max_latency_ms, s.model_passes, s.torch_threads, torch.set_num_threads)
            await self.batcher.on_model_thread(self._load)
            # one pass through the batcher before /readyz says yes
            await self.batcher([np.zeros((self.model.size, self.model.size), np.uint8)], [None])
            self.batcher.sizes.clear()
            self.ready = True
        except Exception as e:  # keep serving /healthz and say why in /readyz and every API
            log.exception("covid-cxr: model failed to load")
            self.load_error = f"{type(e).__name__}: {e}"

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.shutdown()
        self.predlog.close()

    def __is_ready__(self) -> bool:
        return self.ready

    def _not_ready(self) -> JSONResponse:
        if self.load_error:
            return error_response("model_unavailable", f"the model failed to load: {self.load_error}", 503)
        return error_response("model_loading", "the model is still loading; retry in a few seconds", 503)

    # ---------- decode, classify ----------
    def _decode_resized(self, path: Path) -> CheckedFilm:
        up = decode_upload(path, self.settings, self.model.min_side)
        return replace(up, gray=resize_gray(up.gray, self.model.size))

    async def _decode(self, path: Path, full: bool = False) -> CheckedFilm:
        """Decode (and, unless `full`, resize to the model's input size) in a worker thread:
        a 100 MP upload must not stall the event loop."""
        if self._decode_limiter is None:
            self._decode_limiter = anyio.CapacityLimiter(max(1, min(4, os.cpu_count() or 1)))
        if full:
            return await anyio.to_thread.run_sync(decode_upload, path, self.settings, self.model.min_side,
                                                  limiter=self._decode_limiter)
        return await anyio.to_thread.run_sync(self._decode_resized, path, limiter=self._decode_limiter)

    async def _classify(self, items: Sequence[CheckedFilm], timing: dict[str, float] | None = None
                        ) -> tuple[list[dict[str, Any]], int]:
        """Model-size uploads -> (one result per image, the largest forward batch they were part of).
        Each result is also appended to the prediction log (never blocks, never fails the request)."""
        t0 = time.perf_counter()
        scored = await self.batcher([u.gray for u in items], [u.rule for u in items])
        if timing is not None:
            timing["model"] = scored.forward_ms
            timing["queue"] = max(0.0, 1000 * (time.perf_counter() - t0) - scored.forward_ms)
        results = [answer(scored.pred, i, self.model_tag) for i in range(len(items))]
        for res, u in zip(results, items):
            self.predlog.write({"request_id": uuid.uuid4().hex, "model": res["model"], "bento": self.bento,
                                "label": res["label"],
                                "probabilities": res["probabilities"], "verdict": res["verdict"],
                                "reason": res["reason"], "novelty": res["novelty"],
                                "flagged": not res["in_distribution"], **u.info})
        return results, scored.batch_size

    async def _explained(self, image: Path) -> tuple[CheckedFilm, dict[str, Any], tuple[np.ndarray, np.ndarray, str]]:
        """-> (the full-size upload, its /predict answer, (shown image, Grad-CAM overlay, CAM method))."""
        up = await self._decode(image, full=True)
        small = await anyio.to_thread.run_sync(resize_gray, up.gray, self.model.size)
        (res,), _ = await self._classify([replace(up, gray=small)])
        cam = await self.batcher.on_model_thread(cam_images, self.model, self._explain_lock, up.gray, small,
                                                 CLASSES.index(res["label"]))
        return up, res, cam

    # ---------- API ----------
    @bentoml.api(route="/predict")
    async def predict(self, image: Path) -> dict:
        """Classify one chest X-ray (multipart field `image`: PNG, JPEG, BMP, TIFF, WebP; any size)."""
        if not self.ready:
            return self._not_ready()
        t0 = time.perf_counter()
        try:
            up = await self._decode(image)
            timing = {"decode": 1000 * (time.perf_counter() - t0)}
            (res,), n = await self._classify([up], timing)
        except (ImageError, Overloaded) as e:
            return refused(e)
        return JSONResponse(res, headers=timing_headers(n, timing))

    @bentoml.api(route="/predict_batch")
    async def predict_batch(self, images: list[Path]) -> list[dict]:
        """Classify several X-rays sent in one request (repeat the multipart field `images`)."""
        if not self.ready:
            return self._not_ready()
        if not images:
            return error_response("no_images", "send one or more files in the multipart field `images`", 400)
        if len(images) > self.settings.max_files:
            return error_response("too_many_files",
                                  f"{len(images)} files; at most {self.settings.max_files} per request")
        t0 = time.perf_counter()
        ups = []
        for i, p in enumerate(images):
            try:
                ups.append(await self._decode(p))
            except ImageError as e:
                return error_response(e.code, f"file #{i + 1}: {e.message}", index=i)
        timing = {"decode": 1000 * (time.perf_counter() - t0)}
        try:
            res, n = await self._classify(ups, timing)
        except Overloaded as e:
            return refused(e)
        return JSONResponse(res, headers=timing_headers(n, timing))

    @bentoml.api(route="/explain")
    async def explain(self, image: Path) -> dict:
        """Prediction plus a Grad-CAM heat map of what drove the predicted class.

        Returns the /predict fields and `image_png` (the image as the report shows it),
        `heatmap_png` (Grad-CAM overlay, same size), base64-encoded PNGs, and `disclaimer`.
        """
        if not self.ready:
            return self._not_ready()
        try:
            _, res, (shown, heat, method) = await self._explained(image)
        except (ImageError, Overloaded) as e:
            return refused(e)
        res.update({"explained_class": res["label"], "cam_method": method, "image_png": b64png(shown),
                    "heatmap_png": b64png(heat), "disclaimer": DISCLAIMER})
        return JSONResponse(res)

    @bentoml.api(route="/report")
    async def report(self, image: Path, format: str = "pdf") -> bytes:  # noqa: A002 (the form field's name)
        """The analysis report of one film as a download: `format` pdf (default) or png (report.py).

        The same decode, forward, verdict and Grad-CAM as /explain; only the pixels reach the report.
        """
        from covid_cxr.serve.report import MEDIA_TYPES, build_report, filename

        if not self.ready:
            return self._not_ready()
        fmt = str(format or "pdf").strip().lower()
        if fmt not in MEDIA_TYPES:
            return error_response("bad_format", f"format must be one of {', '.join(MEDIA_TYPES)}", 400)
        try:
            up, res, (shown, heat, method) = await self._explained(image)
        except (ImageError, Overloaded) as e:
            return refused(e)
        sha = up.info.get("sha256")
        body = await anyio.to_thread.run_sync(lambda: build_report(
            shown, heat, res, fmt=fmt, data_version=self.model.meta.get("data_md5"), image_sha256=sha,
            cam_method=method, disclaimer=DISCLAIMER))
        return Response(body, media_type=MEDIA_TYPES[fmt], headers={
            "Content-Disposition": f'attachment; filename="{filename(sha, fmt)}"',
            "X-Verdict": res["verdict"], "Cache-Control": "no-store"})

    # ---------- web page and metadata (GET, FastAPI routes bound to this instance) ----------
    @web.get("/", include_in_schema=False)
    def index(self) -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @web.get("/metadata")
    def metadata(self) -> JSONResponse:
        return JSONResponse(self.describe())

    def describe(self) -> dict[str, Any]:
        """Model card fields for /metadata (metadata.py)."""
        return describe(self.model_dir, self.model_tag, self.bento, self.store_info, self.ready, self.settings,
                        self.batcher.sizes if self.batcher else {}, self.model.precision if self.model else None)


CovidCxr.add_asgi_middleware(GuardMiddleware, settings=SETTINGS)
CovidCxr.add_asgi_middleware(ContractMiddleware)
