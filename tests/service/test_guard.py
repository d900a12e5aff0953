"""Unit tests of the request guard (token + size limit) and the env-configured limits.

The middleware runs in-process around a tiny ASGI app that reads the whole body, the
way the multipart parser does; no BentoML server is built here.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from covid_cxr.config import load_params
from covid_cxr.serve import guard
from covid_cxr.release.bentoargs import bento_args, serve_params
from covid_cxr.serve.settings import ServeArgs, ServeSettings
from covid_cxr.serve.uploads import decode_upload

REPO = Path(__file__).resolve().parents[2]


def settings(**serve) -> ServeSettings:
    """The settings a Bento built from params.yaml gets, with `serve` changed."""
    return ServeSettings(ServeArgs(**{**serve_params(load_params(REPO / "params.yaml")), **serve}))


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


def call(env: dict, monkeypatch, method="POST", path="/predict", headers=None, content=None, form=True, **serve):
    monkeypatch.delenv("COVID_CXR_API_TOKEN", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    app = guard.GuardMiddleware(echo_app, settings=settings(**serve))
    headers = {**(FORM if form else {}), **(headers or {})}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, headers=headers, content=content)

    return asyncio.run(go())


def test_the_service_settings_are_params_yaml_serve_and_the_machine_sets_the_token(monkeypatch):
    serve = serve_params(load_params(REPO / "params.yaml"))
    monkeypatch.setenv("COVID_CXR_API_TOKEN", "abc")
    monkeypatch.delenv("COVID_CXR_TORCH_THREADS", raising=False)
    lim = ServeSettings(ServeArgs(**serve))
    assert lim.max_upload_bytes == int(float(serve["max_upload_mb"]) * 1024 * 1024)
    assert lim.max_pixels == serve["max_pixels"] and lim.max_files == serve["max_batch_files"]
    assert lim.token == "abc" and lim.torch_threads == os.cpu_count()      # every core, unless the machine says
    # the same settings travel as the Bento's arguments, and come back the same
    args = bento_args(load_params(REPO / "params.yaml"))
    pairs = dict(a.split("=", 1) for a in args[1::2])
    assert ServeSettings(ServeArgs(**pairs)).__dict__ == lim.__dict__
    monkeypatch.setenv("COVID_CXR_TORCH_THREADS", "1")
    assert ServeSettings(ServeArgs(**serve)).torch_threads == 1


def test_a_service_started_without_its_settings_says_how_to_start_it():
    with pytest.raises(RuntimeError, match="covid-cxr serve"):
        ServeSettings(ServeArgs(model_dir="/x"))


@pytest.mark.parametrize("bad", ["abc", "-1", "0"])
def test_bad_thread_counts_fail_loudly(monkeypatch, bad):
    monkeypatch.setenv("COVID_CXR_TORCH_THREADS", bad)
    with pytest.raises(ValueError, match="COVID_CXR_TORCH_THREADS"):
        settings()


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
    ok = call({}, monkeypatch, content=b"x" * (1024 * 1024), max_upload_mb=1)
    assert ok.status_code == 200
    r = call({}, monkeypatch, content=b"x" * (1024 * 1024 + 70 * 1024), max_upload_mb=1)
    assert r.status_code == 413 and r.json()["error"] == "upload_too_large"


def test_size_limit_when_streamed_without_length(monkeypatch):

    async def chunks(n):
        for _ in range(n):
            yield b"y" * 65536

    r = call({}, monkeypatch, content=chunks(8), max_upload_mb=1)  # 512 KiB
    assert r.status_code == 200 and r.text == str(8 * 65536)
    r = call({}, monkeypatch, content=chunks(40), max_upload_mb=1)  # 2.5 MiB
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
    """The service's decode step uses ServeSettings for pixels, and the model's minimum side."""
    import numpy as np
    from PIL import Image

    from covid_cxr.data.preprocess import ImageError

    settings_ = settings(max_pixels=10000)
    ok = tmp_path / "ok.png"
    Image.fromarray(np.full((90, 100), 7, np.uint8)).save(ok)            # 9000 px
    up = decode_upload(ok, settings_, 20)
    assert up.gray.shape == (90, 100)
    assert up.rule == "not_xray_blank"  # a constant frame: decoded, but not an X-ray
    assert up.info["width"] == 100 and up.info["format"] == "PNG" and len(up.info["sha256"]) == 64
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((101, 100), np.uint8)).save(big)             # 10100 px
    with pytest.raises(ImageError) as e:
        decode_upload(big, settings_, 20)
    assert e.value.code == "too_large"
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((19, 50), np.uint8)).save(small)
    with pytest.raises(ImageError) as e:
        decode_upload(small, settings_, 20)
    assert e.value.code == "too_small"
