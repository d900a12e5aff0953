"""The optional bearer token (COVID_CXR_API_TOKEN): the session server runs with one."""
from __future__ import annotations

import pytest

from svckit import TOKEN

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", ""])
@pytest.mark.parametrize("method,route", [("POST", "/predict"), ("POST", "/predict_batch"),
                                          ("POST", "/explain"), ("GET", "/metadata"), ("GET", "/metrics")])
def test_api_refuses_missing_or_wrong_token(server, files, token, method, route):
    with server.client(token=token or None) as c:
        if method == "POST":
            field = "images" if route == "/predict_batch" else "image"
            r = c.post(route, files={field: ("x.png", files["xray"].read_bytes(), "image/png")})
        else:
            r = c.get(route)
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "unauthorized"
    assert r.headers["www-authenticate"].lower().startswith("bearer")


def test_other_schemes_are_refused(server):
    import httpx

    r = httpx.get(f"{server.url}/metadata", headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401


def test_right_token_is_accepted(server, files):
    with server.client(token=TOKEN) as c:
        assert c.get("/metadata").status_code == 200
        r = c.post("/predict", files={"image": ("x.png", files["xray"].read_bytes(), "image/png")})
        assert r.status_code == 200
        assert r.json()["label"]


def test_probes_and_page_stay_public(server):
    with server.client(token=None) as c:
        for route in ("/healthz", "/livez", "/readyz", "/", "/static/app.js", "/static/style.css"):
            assert c.get(route).status_code == 200, route
