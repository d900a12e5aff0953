"""Unit tests of the request guard (token + size limit) and the env-configured limits.

The middleware runs in-process around a tiny ASGI app that reads the whole body, the
way the multipart parser does; no BentoML server is built here.
"""
from __future__ import annotations

import asyncio

import httpx
import pytest

from covid_cxr.serve import guard
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.uploads import decode_upload


async def echo_app(scope, receive, send):
    """Reads the body to the end, answers 200 with its length."""
    n = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise RuntimeError("client went away")  # what a parser does on a cut-off body
        n += len(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    body = str(n).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


FORM = {"Content-Type": "multipart/form-data; boundary=x"}


def call(env: dict, monkeypatch, method="POST", path="/predict", headers=None, content=None, form=True):
    for k in ("COVID_CXR_API_TOKEN", "COVID_CXR_MAX_UPLOAD_MB"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    app = guard.GuardMiddleware(echo_app)
    headers = {**(FORM if form else {}), **(headers or {})}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, headers=headers, content=content)

    return asyncio.run(go())


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("COVID_CXR_MAX_UPLOAD_MB", "2.5")
    monkeypatch.setenv("COVID_CXR_MAX_PIXELS", "1000000")
    monkeypatch.setenv("COVID_CXR_MAX_BATCH_FILES", "4")
    monkeypatch.setenv("COVID_CXR_API_TOKEN", "abc")
    lim = ServeSettings()
    assert lim.max_upload_bytes == int(2.5 * 1024 * 1024)
    assert lim.max_pixels == 1_000_000 and lim.max_files == 4 and lim.token == "abc"
    for k in ("COVID_CXR_MAX_UPLOAD_MB", "COVID_CXR_MAX_PIXELS", "COVID_CXR_MAX_BATCH_FILES", "COVID_CXR_API_TOKEN"):
        monkeypatch.delenv(k)
    lim = ServeSettings()
    assert lim.max_upload_bytes == 20 * 1024 * 1024 and lim.max_pixels == 100_000_000 and lim.token is None


@pytest.mark.parametrize("bad", ["abc", "-1", "0"])
def test_bad_limit_values_fail_loudly(monkeypatch, bad):
    monkeypatch.setenv("COVID_CXR_MAX_UPLOAD_MB", bad)
    with pytest.raises(ValueError, match="COVID_CXR_MAX_UPLOAD_MB"):
        ServeSettings()


def test_no_token_configured_means_open(monkeypatch):
    r = call({}, monkeypatch, content=b"x" * 10)
    assert r.status_code == 200 and r.text == "10"


def test_token(monkeypatch):
    env = {"COVID_CXR_API_TOKEN": "tok"}
    assert call(env, monkeypatch, content=b"1").status_code == 401
    assert call(env, monkeypatch, headers={"Authorization": "Bearer nope"}, content=b"1").status_code == 401
    assert call(env, monkeypatch, headers={"Authorization": "Bearer tok"}, content=b"1").status_code == 200
    assert call(env, monkeypatch, headers={"Authorization": "bearer tok"}, content=b"1").status_code == 200
    for public in ("/", "/healthz", "/readyz", "/livez", "/static/app.js"):
        assert call(env, monkeypatch, method="GET", path=public).status_code == 200, public
    for private in ("/metadata", "/metrics", "/docs.json", "/static_content/x", "/staticfoo"):
        assert call(env, monkeypatch, method="GET", path=private).status_code == 401, private


def test_size_limit_by_content_length(monkeypatch):
    env = {"COVID_CXR_MAX_UPLOAD_MB": "1"}
    ok = call(env, monkeypatch, content=b"x" * (1024 * 1024))
    assert ok.status_code == 200
    r = call(env, monkeypatch, content=b"x" * (1024 * 1024 + 70 * 1024))
    assert r.status_code == 413 and r.json()["error"] == "upload_too_large"


def test_size_limit_when_streamed_without_length(monkeypatch):
    env = {"COVID_CXR_MAX_UPLOAD_MB": "1"}

    async def chunks(n):
        for _ in range(n):
            yield b"y" * 65536

    r = call(env, monkeypatch, content=chunks(8))  # 512 KiB
    assert r.status_code == 200 and r.text == str(8 * 65536)
    r = call(env, monkeypatch, content=chunks(40))  # 2.5 MiB
    assert r.status_code == 413 and r.json()["error"] == "upload_too_large"


def test_error_statuses_are_all_4xx():
    assert all(400 <= s < 500 for s in guard.STATUS.values())


def test_image_routes_take_form_or_json_only(monkeypatch):
    r = call({}, monkeypatch, headers={"Content-Type": "application/vnd.bentoml+pickle"}, content=b"x")
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    assert call({}, monkeypatch, content=b"x", form=False).status_code == 415  # no Content-Type at all
    for ok in ("multipart/form-data; boundary=x", "application/json"):
        assert call({}, monkeypatch, headers={"Content-Type": ok}, content=b"x").status_code == 200


def test_decode_applies_the_configured_limits(monkeypatch, tmp_path):
    """The service's decode step uses ServeSettings (env) for pixels and minimum side."""
    import numpy as np
    from PIL import Image

    from covid_cxr.data.preprocess import ImageError

    monkeypatch.setenv("COVID_CXR_MAX_PIXELS", "10000")
    monkeypatch.setenv("COVID_CXR_MIN_SIDE", "20")

    settings = ServeSettings()
    ok = tmp_path / "ok.png"
    Image.fromarray(np.full((90, 100), 7, np.uint8)).save(ok)            # 9000 px
    up = decode_upload(ok, settings)
    assert up.gray.shape == (90, 100)
    assert up.rule == "not_xray_blank"  # a constant frame: decoded, but not an X-ray
    assert up.info["width"] == 100 and up.info["format"] == "PNG" and len(up.info["sha256"]) == 64
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((101, 100), np.uint8)).save(big)             # 10100 px
    with pytest.raises(ImageError) as e:
        decode_upload(big, settings)
    assert e.value.code == "too_large"
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((19, 50), np.uint8)).save(small)
    with pytest.raises(ImageError) as e:
        decode_upload(small, settings)
    assert e.value.code == "too_small"
