"""The API's contract against a real `covid-cxr serve` of the packaged Bento (conftest `server`).

Schemathesis reads the served /docs.json and sends every operation a fixed number of generated
requests, checking that no answer is a 5xx, that every status and content type is declared for its
operation, and that every body matches its declared schema. BentoML's own SyncHTTPClient, built
from the same document, calls every endpoint.
"""
from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from svckit import TOKEN

pytestmark = pytest.mark.e2e

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 12    # generated requests per operation


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/docs.json", headers={"Authorization": f"Bearer {TOKEN}"})


OPERATIONS = ["POST /predict", "POST /predict_batch", "POST /explain", "POST /report", "GET /metadata",
              "GET /readyz", "GET /livez", "GET /healthz"]


@pytest.mark.parametrize("label", OPERATIONS)
def test_every_operation_keeps_its_contract(api_schema, label):
    ops = {r.ok().label: r.ok() for r in api_schema.get_all_operations()}
    assert label in ops, sorted(ops)
    seen: list[int] = []

    @given(case=ops[label].as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)
        seen.append(response.status_code)

    check()
    print(label, sorted(seen))
    assert len(seen) >= min(EXAMPLES, 1), label     # it ran, and every request passed the four checks


def test_the_document_declares_every_status_the_service_returns(server, api):
    doc = api.get("/docs.json").json()
    for route in ("/predict", "/predict_batch", "/explain", "/report"):
        responses = doc["paths"][route]["post"]["responses"]
        assert {"200", "400", "401", "413", "415", "422", "503"} <= set(responses), (route, sorted(responses))
        for status, r in responses.items():
            content = r["content"]
            assert content and all(v["schema"] for v in content.values()), (route, status)   # typed, not empty
    assert doc["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Answer"}
    answer = doc["components"]["schemas"]["Answer"]
    assert "not_a_chest_film" in answer["properties"]["reason"]["enum"]


def test_a_one_pixel_png_is_a_declared_422(server, api):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    r = api.post("/predict", files={"image": ("dot.png", buf.getvalue(), "image/png")})
    assert r.status_code == 422 and r.json()["error"] == "too_small"


def test_a_wrong_field_name_gets_the_error_shape(server, api, files):
    r = api.post("/predict", files={"file": ("x.png", files["xray"].read_bytes(), "image/png")})
    assert r.status_code == 400
    body = r.json()
    assert set(body) >= {"error", "detail"} and isinstance(body["detail"], str), body
    assert body["error"] == "missing_field" and "`image`" in body["detail"]


def test_bentoml_sync_client_calls_every_endpoint(server, files):
    import bentoml

    with bentoml.SyncHTTPClient(server.url, token=TOKEN) as client:
        one = client.predict(image=files["xray"])
        assert one["label"] in ("COVID", "Normal", "Viral Pneumonia") and one["verdict"] in ("ok", "refer")
        many = client.predict_batch(images=[files["xray"], files["jpeg"]])
        assert len(many) == 2 and all("probabilities" in m for m in many)
        ex = client.explain(image=files["xray"])
        assert ex["heatmap_png"] and ex["label"] == one["label"]
        rep = client.report(image=files["xray"], format="png")
        data = rep if isinstance(rep, bytes) else rep.read_bytes() if hasattr(rep, "read_bytes") else bytes(rep)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    md = json.loads(__import__("httpx").get(f"{server.url}/metadata",
                                           headers={"Authorization": f"Bearer {TOKEN}"}).text)
    assert md["model"] == server.model
