"""Bad input: always a 4xx with a JSON reason, never a 500, and the server keeps serving."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def assert_rejected(r, status: int | tuple[int, ...], code: str | None = None) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, f"{r.status_code}: {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body, dict) and body.get("error") and body.get("detail"), body
    if code is not None:
        assert body["error"] == code, body
    return body


@pytest.fixture
def still_serving(server, api, files):
    """After each bad request: liveness OK and a real X-ray is still predicted."""
    yield
    assert server.alive(), server.log_tail()
    with server.client(token=None) as c:
        assert c.get("/healthz").status_code == 200
    r = api.post("/predict", files={"image": ("x.png", files["xray"].read_bytes(), "image/png")})
    assert r.status_code == 200, r.text


CASES = [  # file key, expected status, error code, text expected in the reason
    ("truncated", 422, "corrupt", "truncated"),
    ("truncated_jpeg", 422, "corrupt", "truncated"),
    ("corrupt", 422, "corrupt", "corrupt"),
    ("zero", 400, "empty", "empty"),
    ("text", 415, "not_an_image", "not a readable image"),
    ("text_as_png", 415, "not_an_image", "not a readable image"),
    ("svg", 415, "not_an_image", "not a readable image"),
    ("pdf", 415, "not_an_image", "not a readable image"),
    ("gif", 415, "animated", "animated"),
    ("bomb", 413, "too_large", "MP"),
    ("bomb_header", 413, "too_large", "too large"),
    ("oversized", 413, "upload_too_large", "limit"),
]


@pytest.mark.parametrize("route", ["/predict", "/explain"])
@pytest.mark.parametrize("key,status,code,text", CASES, ids=[c[0] for c in CASES])
def test_bad_file_is_rejected_with_reason(api, files, still_serving, route, key, status, code, text):
    p = files[key]
    r = api.post(route, files={"image": (p.name, p.read_bytes(), "application/octet-stream")})
    body = assert_rejected(r, status, code)
    assert text.lower() in body["detail"].lower()


def test_bomb_is_refused_before_decoding(api, files, still_serving):
    """144 MP of zeros decodes to 144 MB; the header check answers without touching the pixels."""
    import time

    p = files["bomb"]
    assert p.stat().st_size < 1_000_000
    t = time.perf_counter()
    r = api.post("/predict", files={"image": (p.name, p.read_bytes(), "image/png")})
    assert_rejected(r, 413, "too_large")
    assert time.perf_counter() - t < 5


def test_oversized_chunked_upload_is_refused(api, files, still_serving):
    """No Content-Length (chunked transfer): the body is counted as it streams."""
    p = files["oversized"]
    boundary = "covidcxrboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield head
        data = p.read_bytes()
        for i in range(0, len(data), 1 << 20):
            yield data[i:i + (1 << 20)]
        yield tail

    r = api.post("/predict", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_rejected(r, 413, "upload_too_large")


def test_text_value_instead_of_file_is_not_fetched(api, still_serving, server):
    for value in ("hello", f"{server.url}/healthz", "http://example.com/x.png"):
        r = api.post("/predict", files={"image": (None, value)})
        body = assert_rejected(r, 400)
        assert "file" in str(body["detail"]).lower()


@pytest.mark.parametrize("kwargs", [
    {"files": {"other": ("a.png", b"123", "image/png")}},          # wrong field name
    {"content": b"{}", "headers": {"Content-Type": "application/json"}},
    {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
    {"content": b"raw bytes", "headers": {"Content-Type": "text/plain"}},
    {"content": b"", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
    {"content": b"--x\r\ngarbage", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
    {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}},
    {"content": b"\x80\x04K\x01.", "headers": {"Content-Type": "application/vnd.bentoml+pickle"}},
    {"content": b"\x89PNG", "headers": {}},
], ids=["missing-field", "json-empty", "json-broken", "text-plain", "empty-multipart", "broken-multipart",
        "no-boundary", "pickle", "no-content-type"])
@pytest.mark.parametrize("route", ["/predict", "/predict_batch", "/explain"])
def test_malformed_requests(api, still_serving, kwargs, route):
    r = api.post(route, **kwargs)
    assert_rejected(r, (400, 415, 422))


@pytest.mark.parametrize("route", ["/predict", "/predict_batch"])
def test_binary_file_under_an_unknown_field(api, files, still_serving, route):
    r = api.post(route, files={"other": ("a.png", files["xray"].read_bytes(), "image/png")})
    assert_rejected(r, 400)


def test_batch_with_one_bad_file_names_it(api, files, still_serving):
    good = files["xray"].read_bytes()
    r = api.post("/predict_batch", files=[("images", ("a.png", good, "image/png")),
                                          ("images", ("b.txt", files["text"].read_bytes(), "text/plain")),
                                          ("images", ("c.png", good, "image/png"))])
    body = assert_rejected(r, 415, "not_an_image")
    assert body["index"] == 1 and "#2" in body["detail"]


def test_batch_limits(api, files, still_serving):
    r = api.post("/predict_batch", files=[("images", ("a.png", b"x", "image/png"))] * 33)
    assert_rejected(r, 413, "too_many_files")


def test_unknown_route_and_wrong_method_are_4xx(api):
    assert api.get("/predict").status_code in (404, 405)
    assert api.post("/nope").status_code in (404, 405)
