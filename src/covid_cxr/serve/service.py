"""The prediction service: BentoML HTTP API + the analysis web page.

    bentoml serve covid_cxr.serve.service:CovidCxr          # dev, model from the store or COVID_CXR_MODEL_DIR
    bentoml serve covid_cxr:<version>                 # a built Bento
    covid-cxr serve                                   # the Bento in production (registry/production.json)

Which model
    COVID_CXR_MODEL_DIR  a model directory (model.json + model.safetensors), for local dev;
    otherwise the BentoML model COVID_CXR_MODEL (default `covid_cxr:latest`). A built
    Bento carries exactly the model version it was built with.

Endpoints
    POST /predict        multipart `image`             -> {label, probabilities, verdict, reason, message,
                                                            novelty, in_distribution, model}
    POST /predict_batch  multipart `images` (repeated) -> [same, ...] in upload order
    POST /explain        multipart `image`             -> same + Grad-CAM overlay (base64 PNG)
    POST /report         multipart `image` [+ `format` pdf|png] -> the analysis report as a download (report.py)
    GET  /healthz /livez (liveness), /readyz (model loaded and warm), /metadata, /metrics
    GET  /               the web page (static files in covid_cxr/web, no build step, no CDN)

Bad input never yields a 500: every rejection is 4xx with JSON {"error": code, "detail": text}.

Every answer carries `verdict`: `ok`, or `refer` with a `reason` (verdict.py): `not_an_xray`
(the colour / blank rules of `data check`), `outside_training_data` (novelty over threshold)
or `low_confidence`. `label` is always the most probable class; with `refer` it is not the answer.

Adaptive batching: /predict, /predict_batch and /explain decode and validate each upload
first (so one bad file cannot fail anybody else's batch), then hand the (N,S,S) uint8 array
to BentoML's adaptive batching dispatcher (`CorkDispatcher`, the same one behind
`@bentoml.api(batchable=True)`), configured by COVID_CXR_BATCH_MAX_SIZE and
COVID_CXR_BATCH_MAX_LATENCY_MS. Concurrent requests are merged into one forward pass.

Limits and auth (env vars, read at start-up)
    COVID_CXR_MAX_UPLOAD_MB (20)       request bodies / single files above this -> 413
    COVID_CXR_MAX_PIXELS (100000000)   decoded image area above this -> 413 (checked before decoding)
    COVID_CXR_MIN_SIDE (16)            smaller images -> 422
    COVID_CXR_MAX_BATCH_FILES (32)     files per /predict_batch request
    COVID_CXR_API_TOKEN                if set, every endpoint but /, /static/*, /healthz, /livez
                                       and /readyz needs `Authorization: Bearer <token>` (401)
    COVID_CXR_TORCH_THREADS            torch intra-op threads (default: all cores but one)
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from fastapi import FastAPI
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from covid_cxr.config import CLASSES
from covid_cxr.data.xrayrule import xray_rule
from covid_cxr.serve.predlog import PredictionLog
from covid_cxr.data.preprocess import MAX_PIXELS, ImageError, open_image, resize_gray, to_gray
from covid_cxr.model.verdict import REASONS, Policy, decide

log = logging.getLogger("covid_cxr.serve.service")

MODEL_NAME = "covid_cxr"
WEB_DIR = Path(__file__).parent / "web"
DISCLAIMER = (
    "Research prototype. Not a medical device and not for diagnostic use: "
    "a clinician must read every image."
)

# HTTP status per preprocess.ImageError code (anything else: 422).
STATUS = {
    "empty": 400,
    "not_an_image": 415,
    "unsupported_format": 415,
    "animated": 415,
    "corrupt": 422,
    "too_small": 422,
    "too_large": 413,
    "upload_too_large": 413,
    "too_many_files": 413,
}
PUBLIC_PATHS = {"/", "/index.html", "/favicon.ico", "/healthz", "/livez", "/readyz"}
PUBLIC_PREFIXES = ("/static/",)
IMAGE_ROUTES = {"/predict", "/predict_batch", "/explain", "/report"}
ACCEPTED_TYPES = {"multipart/form-data", "application/x-www-form-urlencoded", "application/json"}


def _env_num(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {raw}")
    return v


class Limits:
    """Request limits, from the environment (see module docstring)."""

    def __init__(self) -> None:
        self.max_upload_bytes = int(_env_num("COVID_CXR_MAX_UPLOAD_MB", 20) * 1024 * 1024)
        self.max_pixels = int(_env_num("COVID_CXR_MAX_PIXELS", MAX_PIXELS))
        self.min_side = int(_env_num("COVID_CXR_MIN_SIDE", 16))
        self.max_files = int(_env_num("COVID_CXR_MAX_BATCH_FILES", 32))
        self.batch_max_size = max(2, int(_env_num("COVID_CXR_BATCH_MAX_SIZE", 16)))
        self.batch_max_latency_ms = int(_env_num("COVID_CXR_BATCH_MAX_LATENCY_MS", 1000))
        self.token = os.environ.get("COVID_CXR_API_TOKEN") or None


def default_torch_threads() -> int:
    """All cores but one: the event loop, multipart parsing and decoding need a core of their
    own, or they stall the forward pass they feed (and vice versa)."""
    return max(1, (os.cpu_count() or 1) - 1)


def error_response(code: str, detail: str, status: int | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status or STATUS.get(code, 422))


class GuardMiddleware:
    """Pure ASGI middleware: bearer token and request-size limit, before any parsing.

    A body over the limit is refused from its Content-Length; a chunked body is
    counted as it streams and the app's answer is replaced by the 413.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        limits = Limits()
        self.token = limits.token
        self.max_bytes = limits.max_upload_bytes
        # multipart framing around a max-size file
        self.max_body = self.max_bytes + 64 * 1024

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.token and not (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)):
            if not self._authorised(scope):
                resp = error_response("unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)",
                                      401)
                resp.headers["WWW-Authenticate"] = 'Bearer realm="covid-cxr"'
                return await resp(scope, receive, send)
        if scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if path in IMAGE_ROUTES:
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype not in ACCEPTED_TYPES:
                return await error_response(
                    "unsupported_media_type",
                    f"send multipart/form-data with the image file in the field "
                    f"`{'images' if path == '/predict_batch' else 'image'}` (got {ctype or 'no Content-Type'})",
                    415)(scope, receive, send)
        clen = headers.get(b"content-length")
        if clen is not None:
            try:
                n = int(clen)
            except ValueError:
                return await error_response("bad_request", "invalid Content-Length", 400)(scope, receive, send)
            if n > self.max_body:
                return await self._too_large(n)(scope, receive, send)
            return await self.app(scope, receive, send)
        return await self._streamed(scope, receive, send)

    def _authorised(self, scope: dict) -> bool:
        for k, v in scope.get("headers") or []:
            if k == b"authorization":
                scheme, _, cred = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(cred.strip().encode(), self.token.encode())
        return False

    def _too_large(self, n: int | None) -> JSONResponse:
        size = f"{n / 1e6:.1f} MB" if n is not None else "the request"
        return error_response("upload_too_large",
                              f"{size} is over the {self.max_bytes / 1024 / 1024:g} MB upload limit", 413)

    async def _streamed(self, scope: dict, receive: Any, send: Any) -> None:
        seen = 0
        over = False
        started = False

        async def counting_receive() -> dict:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    over = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: dict) -> None:
            nonlocal started
            if over:
                if not started and msg["type"] == "http.response.start":
                    started = True
                    await self._too_large(None)(scope, _drained, send)
                return
            await send(msg)

        async def _drained() -> dict:
            return {"type": "http.disconnect"}

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._too_large(None)(scope, _drained, send)


@dataclass
class Upload:
    """One decoded upload: pixels, the not-an-X-ray rule it fails (or None), and what the
    prediction log may know of it (size, mode, format, sha256; never pixels or names)."""

    gray: np.ndarray
    rule: str | None
    info: dict[str, Any]


class Overloaded(RuntimeError):
    """The batching queue gave up on a request (503)."""


class Batcher:
    """Adaptive batching of (N,S,S) uint8 arrays through BentoML's CorkDispatcher.

    Each job is one request's images. The dispatcher merges queued jobs (splitting one
    across two batches when needed) and hands back, per job, a float array with one row
    per image: [p(class) x C, novelty score (nan if no novelty model), novel (0/1),
    forward ms, batch size].
    """

    def __init__(self, fn: Any, max_batch_size: int, max_latency_ms: int) -> None:
        from bentoml._internal.marshal.dispatcher import CorkDispatcher

        def overloaded() -> None:
            raise ServiceUnavailable("the model queue is full; retry shortly")

        self.fn = fn
        self.sizes: Counter[int] = Counter()
        self._cork = CorkDispatcher(
            max_latency_in_ms=max_latency_ms,
            max_batch_size=max_batch_size,
            fallback=overloaded,
            get_batch_size=len,
            batch_dim=(0, 0),
        )
        self._call = self._cork(self._run)

    def _run(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        x = np.concatenate(batches) if len(batches) > 1 else batches[0]
        t0 = time.perf_counter()
        out = self.fn(x)
        ms = 1000 * (time.perf_counter() - t0)
        n = len(x)
        self.sizes[n] += 1
        rows = np.concatenate([
            out.probs.astype(np.float64),
            (out.novelty if out.novelty is not None else np.full(n, np.nan)).astype(np.float64)[:, None],
            out.novel.astype(np.float64)[:, None],
            np.full((n, 1), ms, np.float64),
            np.full((n, 1), n, np.float64),
        ], axis=1)
        res, i = [], 0
        for b in batches:
            res.append(rows[i:i + len(b)])
            i += len(b)
        return res

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        return await self._call(x)

    def shutdown(self) -> None:
        self._cork.shutdown()


def _b64png(arr: np.ndarray) -> str:
    from covid_cxr.model.gradcam import to_png

    return base64.b64encode(to_png(arr)).decode("ascii")


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _files_only_multipart() -> None:
    """A stricter multipart/form parser for the API (registered in place of BentoML's).

    BentoML's own parser treats a *text* value in a file field as a URL and downloads it
    (an SSRF surface, and a 500 for anything that is not a URL), runs json.loads on the bytes
    of a file sent under an unknown field name (a 500 on any binary file), and lets a
    malformed body escape as a 500. Here all of those are 400s with a reason, and the
    service never fetches anything.
    """
    import json as _json

    from _bentoml_impl import serde
    from _bentoml_sdk.typing_utils import is_list_type, is_union_type
    from pydantic_core import PydanticCustomError, ValidationError
    from starlette.datastructures import UploadFile
    from typing_extensions import get_args

    if getattr(serde.ALL_SERDE.get("multipart/form-data"), "files_only", False):
        return

    def bad(kind: str, msg: str, field: str = "body") -> ValidationError:
        return ValidationError.from_exception_data(
            "Input", [{"type": PydanticCustomError(kind, msg), "loc": (field,), "input": ""}])

    class FilesOnlyMultipartSerde(serde.MultipartSerde):
        files_only = True

        async def parse_request(self, request: Any, cls: Any) -> Any:
            try:
                form = await request.form()
            except Exception as e:
                raise bad("malformed_body", f"cannot parse the multipart/form body: {e}") from None
            data: dict[str, Any] = {}
            for k in form:
                values = form.getlist(k)
                if k in cls.multipart_fields:
                    files = [v for v in values if isinstance(v, UploadFile)]
                    if len(files) != len(values):
                        raise bad("file_required", "send the image as a file part (multipart/form-data with a "
                                  "filename), not as text; URLs are not fetched", k)
                    ann = cls.model_fields[k].annotation
                    if is_union_type(ann):
                        ann = get_args(ann)[0]
                    data[k] = files if is_list_type(ann) else files[0]
                elif k in cls.model_fields:
                    v = values[0]
                    if isinstance(v, UploadFile):
                        raise bad("unexpected_file", f"field {k!r} takes a value, not a file", k)
                    try:
                        data[k] = _json.loads(v)
                    except ValueError:
                        data[k] = v
                # any other field is ignored (a missing required one is reported by validation)
            return cls.model_validate(data)

    serde.ALL_SERDE["multipart/form-data"] = FilesOnlyMultipartSerde  # type: ignore[index]
    serde.ALL_SERDE["application/x-www-form-urlencoded"] = FilesOnlyMultipartSerde  # type: ignore[index]


_files_only_multipart()

web = FastAPI(title="covid-cxr web", docs_url=None, redoc_url=None, openapi_url=None)
web.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

_MODEL_DIR = os.environ.get("COVID_CXR_MODEL_DIR") or None


@bentoml.service(
    name="covid_cxr",
    workers=1,
    traffic={"timeout": 120},
    labels={"project": "covid-cxr"},
)
@bentoml.asgi_app(web, path="/")
class CovidCxr:
    """Chest X-ray triage: COVID / Normal / Viral Pneumonia, with calibrated probabilities."""

    if not _MODEL_DIR:
        bento_model = bentoml.models.BentoModel(os.environ.get("COVID_CXR_MODEL") or f"{MODEL_NAME}:latest")

    def __init__(self) -> None:
        import torch

        self.limits = Limits()
        threads = int(_env_num("COVID_CXR_TORCH_THREADS", default_torch_threads()))
        torch.set_num_threads(threads)
        self.model_dir, self.model_tag, self.store_info = self._locate_model()
        self.model: Any = None
        self.load_error: str | None = None
        self.ready = False
        self.batcher: Batcher | None = None
        self._explain_lock = threading.Lock()
        self._decode_limiter: Any = None
        self.predlog = PredictionLog.from_env()
        log.info("covid-cxr: model %s from %s", self.model_tag, self.model_dir)

    # ---------- model ----------
    def _locate_model(self) -> tuple[Path, str, dict]:
        if _MODEL_DIR:
            d = Path(_MODEL_DIR).resolve()
            if not (d / "model.json").is_file():
                raise RuntimeError(f"COVID_CXR_MODEL_DIR={_MODEL_DIR}: no model.json there")
            return d, f"dir:{d}", {}
        ref = type(self).bento_model
        pinned = self._bento_pinned_model()
        if pinned is not None:
            # Serving a built Bento: its model version, not whatever `latest` is in the store
            # now (BentoML re-pins only Hugging Face models when it loads a Bento).
            ref = bentoml.models.BentoModel(pinned)
        stored = ref.stored  # local store only: never reaches for a remote registry
        if stored is None:
            raise RuntimeError(
                f"BentoML model {ref.tag} is not in the model store "
                f"({os.environ.get('BENTOML_HOME', '~/bentoml')}): run `covid-cxr package`, "
                "or set COVID_CXR_MODEL_DIR=artifacts/model for local development"
            )
        info = {"labels": dict(stored.info.labels), "metadata": dict(stored.info.metadata),
                "created": stored.info.creation_time.isoformat()}
        return Path(stored.path), str(stored.tag), info

    @staticmethod
    def _bento_pinned_model() -> str | None:
        """The model version recorded in the Bento this service was loaded from, if any."""
        svc = globals().get("CovidCxr")  # the bentoml.Service wrapping this class
        bento = getattr(svc, "bento", None)
        if bento is None:
            return None
        for info in bento.info.services:
            if info.name == svc.name:
                for m in info.models:
                    if m.tag.name == MODEL_NAME:
                        return str(m.tag)
        return None

    def _load(self) -> None:
        from covid_cxr.model.checkpoint import load_model

        t0 = time.perf_counter()
        model = load_model(self.model_dir)
        model.predict(np.zeros((1, model.size, model.size), np.uint8))  # first-call allocations
        self.model = model
        self.policy = Policy.from_meta(model.meta)
        log.info("covid-cxr: model loaded in %.1fs (image_size=%d)", time.perf_counter() - t0, model.size)

    @bentoml.on_startup
    async def _startup(self) -> None:
        # keep a reference: the event loop holds tasks only weakly
        self._load_task = asyncio.get_running_loop().create_task(self._load_and_warm())

    async def _load_and_warm(self) -> None:
        import anyio

        try:
            await anyio.to_thread.run_sync(self._load)
            lim = self.limits
            self.batcher = Batcher(self.model.predict, lim.batch_max_size, lim.batch_max_latency_ms)
            # The dispatcher learns its latency model from its first calls: make them here.
            z = np.zeros((1, self.model.size, self.model.size), np.uint8)
            for _ in range(4):
                await asyncio.gather(*(self.batcher(z) for _ in range(4)))
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

    # ---------- inputs ----------
    def _decode(self, path: Path) -> Upload:
        """An uploaded file -> Upload (full-resolution 2-D uint8 grey), or ImageError."""
        size = path.stat().st_size
        if size > self.limits.max_upload_bytes:
            raise ImageError("upload_too_large", f"the file is {size / 1e6:.1f} MB, over the "
                             f"{self.limits.max_upload_bytes / 1024 / 1024:g} MB limit")
        data = path.read_bytes()
        im = open_image(data, max_pixels=self.limits.max_pixels)
        if min(im.size) < self.limits.min_side:
            raise ImageError("too_small", f"the image is {im.size[0]}x{im.size[1]} px; "
                             f"both sides must be at least {self.limits.min_side} px")
        try:
            gray = to_gray(im)
        except Exception as e:  # an exotic mode Pillow cannot convert is still the input's fault
            raise ImageError("corrupt", f"cannot convert the {im.mode} image to greyscale: {e}") from None
        info = {"width": im.size[0], "height": im.size[1], "mode": im.mode, "format": im.format,
                "sha256": hashlib.sha256(data).hexdigest()}
        return Upload(gray, xray_rule(im, gray), info)

    def _decode_resized(self, path: Path) -> Upload:
        up = self._decode(path)
        return replace(up, gray=resize_gray(up.gray, self.model.size))

    async def _grays(self, paths: Sequence[Path], full: bool = False) -> list[Upload]:
        """Decode (and, unless `full`, resize to the model's input size) in worker threads:
        a 100 MP upload must not stall the event loop."""
        import anyio

        if self._decode_limiter is None:
            self._decode_limiter = anyio.CapacityLimiter(max(1, min(4, os.cpu_count() or 1)))
        fn = self._decode if full else self._decode_resized
        return [await anyio.to_thread.run_sync(fn, p, limiter=self._decode_limiter) for p in paths]

    def _result(self, row: np.ndarray, rule: str | None) -> dict[str, Any]:
        c = len(CLASSES)
        probs, nov, novel = row[:c], row[c], bool(row[c + 1])
        (verdict,), (reason,) = decide(probs[None], np.array([novel]), self.policy, [rule])
        return {
            "label": CLASSES[int(np.argmax(probs))],
            "probabilities": {k: round(float(p), 6) for k, p in zip(CLASSES, probs)},
            "verdict": verdict,
            "reason": reason,
            "message": REASONS[reason] if reason else None,
            "novelty": None if np.isnan(nov) else round(float(nov), 4),
            "in_distribution": not novel,
            "model": self.model_tag,
        }

    async def _classify(self, items: Sequence[Upload], timing: dict[str, float] | None = None
                        ) -> tuple[list[dict[str, Any]], int]:
        """Model-size uploads -> (one result per image, the largest forward batch they were part of).
        Each result is also appended to the prediction log (never blocks, never fails the request)."""
        x = np.stack([u.gray for u in items])
        t0 = time.perf_counter()
        try:
            rows = await self.batcher(x)
        except ServiceUnavailable as e:
            raise Overloaded(str(e)) from None
        if timing is not None:
            fwd = float(rows[:, -2].max())
            timing["model"] = fwd
            timing["queue"] = max(0.0, 1000 * (time.perf_counter() - t0) - fwd)
        results = [self._result(r, u.rule) for r, u in zip(rows, items)]
        for res, u in zip(results, items):
            self.predlog.write({"request_id": uuid.uuid4().hex, "model": res["model"], "label": res["label"],
                                "probabilities": res["probabilities"], "verdict": res["verdict"],
                                "reason": res["reason"], "novelty": res["novelty"],
                                "flagged": not res["in_distribution"], **u.info})
        return results, int(rows[:, -1].max())

    async def _decode_all(self, paths: Sequence[Path], timing: dict[str, float]) -> list[Upload]:
        t0 = time.perf_counter()
        grays = await self._grays(paths)
        timing["decode"] = 1000 * (time.perf_counter() - t0)
        return grays

    @staticmethod
    def _headers(n: int, timing: dict[str, float]) -> dict[str, str]:
        """X-Batch-Size, and Server-Timing (decode / queue / model, ms) for operators and benchmarks."""
        return {"X-Batch-Size": str(n),
                "Server-Timing": ", ".join(f"{k};dur={v:.2f}" for k, v in timing.items())}

    # ---------- API ----------
    @bentoml.api(route="/predict")
    async def predict(self, image: Path) -> dict:
        """Classify one chest X-ray (multipart field `image`: PNG, JPEG, BMP, TIFF, WebP; any size)."""
        if not self.ready:
            return self._not_ready()
        timing: dict[str, float] = {}
        try:
            items = await self._decode_all([image], timing)
            (res,), n = await self._classify(items, timing)
        except ImageError as e:
            return error_response(e.code, e.message)
        except Overloaded as e:
            return error_response("overloaded", str(e), 503)
        return JSONResponse(res, headers=self._headers(n, timing))

    @bentoml.api(route="/predict_batch")
    async def predict_batch(self, images: list[Path]) -> list[dict]:
        """Classify several X-rays sent in one request (repeat the multipart field `images`)."""
        if not self.ready:
            return self._not_ready()
        if not images:
            return error_response("no_images", "send one or more files in the multipart field `images`", 400)
        if len(images) > self.limits.max_files:
            return error_response("too_many_files",
                                  f"{len(images)} files; at most {self.limits.max_files} per request")
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        grays = []
        for i, p in enumerate(images):
            try:
                grays += await self._grays([p])
            except ImageError as e:
                return error_response(e.code, f"file #{i + 1}: {e.message}", index=i)
        timing["decode"] = 1000 * (time.perf_counter() - t0)
        try:
            res, n = await self._classify(grays, timing)
        except Overloaded as e:
            return error_response("overloaded", str(e), 503)
        return JSONResponse(res, headers=self._headers(n, timing))

    @bentoml.api(route="/explain")
    async def explain(self, image: Path) -> dict:
        """Prediction plus a Grad-CAM heat map of what drove the predicted class.

        Returns the /predict fields and `image_png` (the image as the report shows it),
        `heatmap_png` (Grad-CAM overlay, same size), base64-encoded PNGs, and `disclaimer`.
        """
        import anyio

        if not self.ready:
            return self._not_ready()
        try:
            (up,) = await self._grays([image], full=True)
            gray = up.gray
            small = await anyio.to_thread.run_sync(resize_gray, gray, self.model.size)
            (res,), _ = await self._classify([replace(up, gray=small)])
        except ImageError as e:
            return error_response(e.code, e.message)
        except Overloaded as e:
            return error_response("overloaded", str(e), 503)
        target = CLASSES.index(res["label"])
        shown, heat, method = await anyio.to_thread.run_sync(self._gradcam, gray, small, target)
        res.update({
            "explained_class": res["label"],
            "cam_method": method,
            "image_png": _b64png(shown),
            "heatmap_png": _b64png(heat),
            "disclaimer": DISCLAIMER,
        })
        return JSONResponse(res)

    @bentoml.api(route="/report")
    async def report(self, image: Path, format: str = "pdf") -> bytes:  # noqa: A002 (the form field's name)
        """The analysis report of one film as a download: `format` pdf (default) or png (report.py).

        The same decode, forward, verdict and Grad-CAM as /explain; only the pixels reach the report.
        """
        import anyio

        from covid_cxr.serve.report import MEDIA_TYPES, build_report, filename

        if not self.ready:
            return self._not_ready()
        fmt = str(format or "pdf").strip().lower()
        if fmt not in MEDIA_TYPES:
            return error_response("bad_format", f"format must be one of {', '.join(MEDIA_TYPES)}", 400)
        try:
            (up,) = await self._grays([image], full=True)
            small = await anyio.to_thread.run_sync(resize_gray, up.gray, self.model.size)
            (res,), _ = await self._classify([replace(up, gray=small)])
        except ImageError as e:
            return error_response(e.code, e.message)
        except Overloaded as e:
            return error_response("overloaded", str(e), 503)
        shown, heat, method = await anyio.to_thread.run_sync(self._gradcam, up.gray, small,
                                                             CLASSES.index(res["label"]))
        sha = up.info.get("sha256")
        body = await anyio.to_thread.run_sync(lambda: build_report(
            shown, heat, res, fmt=fmt, data_version=self.model.meta.get("data_md5"), image_sha256=sha,
            cam_method=method, disclaimer=DISCLAIMER))
        return Response(body, media_type=MEDIA_TYPES[fmt], headers={
            "Content-Disposition": f'attachment; filename="{filename(sha, fmt)}"',
            "X-Verdict": res["verdict"], "Cache-Control": "no-store"})

    def _gradcam(self, gray: np.ndarray, small: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray, str]:
        from PIL import Image

        from covid_cxr.model.gradcam import gradcam, overlay

        m = self.model
        x = m.to_input(small[None])
        with self._explain_lock:
            cams, _, methods = gradcam(m.net, x, target)
        h, w = gray.shape
        scale = min(1.0, 512 / max(h, w))
        shown = gray
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            shown = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR))
        return shown, overlay(shown, cams[0]), methods[0]

    # ---------- web page and metadata (GET, FastAPI routes bound to this instance) ----------
    @web.get("/", include_in_schema=False)
    def index(self) -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @web.get("/metadata")
    def metadata(self) -> JSONResponse:
        return JSONResponse(self.describe())

    def describe(self) -> dict[str, Any]:
        """Model card fields for /metadata: model.json + the evaluation stored with the model."""
        meta = _read_json(self.model_dir / "model.json") or {}
        md = self.store_info.get("metadata", {})
        # the store copy (packaged model) first; a dev directory's project files next
        metrics = _read_json(self.model_dir / "metrics.json") or md.get("metrics") \
            or _read_json(self.model_dir.parent / "eval" / "metrics.json")
        gate = _read_json(self.model_dir / "gate.json") or md.get("gate") \
            or _read_json(self.model_dir.parent / "gate.json")
        return {
            "name": MODEL_NAME,
            "model": self.model_tag,
            "ready": self.ready,
            "classes": list(CLASSES),
            "arch": meta.get("arch"),
            "image_size": meta.get("image_size"),
            "temperature": meta.get("temperature"),
            "data_version": meta.get("data_md5"),
            "git_sha": meta.get("git_sha"),
            "params": meta.get("params"),
            "params_hash": self.store_info.get("labels", {}).get("params_hash"),
            "trained_at": meta.get("trained_at") or meta.get("created_at"),
            "packaged_at": self.store_info.get("created"),
            "ood": meta.get("ood"),
            "verdict_policy": meta.get("verdict"),
            "metrics": metrics,
            "gate": {"passed": gate.get("passed"), "reasons": gate.get("reasons", [])} if gate else None,
            "intended_use": ("Research and teaching demo of chest X-ray triage into COVID / Normal / "
                             "Viral Pneumonia. " + DISCLAIMER),
            "limitations": [
                "Trained on the Kaggle COVID-19 Radiography Database only; other hospitals, scanners "
                "and populations are untested.",
                "Viral Pneumonia images (and part of Normal) come from a paediatric set: the model "
                "can partly tell that class by the patient's age.",
                "Films from hospitals outside the training sources are often misjudged: the model refers "
                "(verdict=refer) the ones it recognises as unlike its training films, not all of them.",
                "It knows only three classes: other diseases (e.g. tuberculosis) get one of the three labels "
                "or a refer verdict, never a diagnosis of their own.",
            ],
            "limits": {
                "max_upload_mb": self.limits.max_upload_bytes / 1024 / 1024,
                "max_pixels": self.limits.max_pixels,
                "min_side": self.limits.min_side,
                "max_batch_files": self.limits.max_files,
            },
            "batching": {"max_batch_size": self.limits.batch_max_size,
                         "max_latency_ms": self.limits.batch_max_latency_ms,
                         "batch_sizes_seen": dict(self.batcher.sizes) if self.batcher else {}},
            "auth": bool(self.limits.token),
        }


CovidCxr.add_asgi_middleware(GuardMiddleware)
