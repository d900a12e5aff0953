"""The request guard in front of every route: bearer token, body-size limit and the media
types the image routes take, checked before any parsing; and the one shape of an error answer,
JSON {"error": code, "detail": text}, always 4xx (or 503)."""
from __future__ import annotations

import hmac
from typing import Any

from starlette.responses import JSONResponse

from covid_cxr.serve.settings import ServeSettings

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


def error_response(code: str, detail: str, status: int | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status or STATUS.get(code, 422))


class GuardMiddleware:
    """Pure ASGI middleware: bearer token and request-size limit, before any parsing.

    A body over the limit is refused from its Content-Length; a chunked body is
    counted as it streams and the app's answer is replaced by the 413.
    """

    def __init__(self, app: Any, settings: ServeSettings) -> None:
        self.app = app
        self.token = settings.token
        self.max_bytes = settings.max_upload_bytes
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
