"""The BentoML internals the service relies on (serve/bentoml_private.py) are still there and
still used the way it assumes. A BentoML upgrade that changes them fails here, loudly,
before any server is started. Nothing else in covid_cxr may reach for them."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import bentoml
import pytest

from covid_cxr.serve import bentoml_private as bp

SRC = Path(__file__).resolve().parents[2] / "src" / "covid_cxr"
PRIVATE = re.compile(r"^\s*(from|import)\s+(_bentoml_impl|_bentoml_sdk|bentoml\._internal)\b", re.M)


def test_tested_version_is_the_installed_one():
    assert bentoml.__version__ == bp.TESTED_BENTOML == "1.4.40"


def test_another_version_refuses_to_import(monkeypatch):
    monkeypatch.setattr(bentoml, "__version__", "9.9.9")
    with pytest.raises(RuntimeError, match=r"bentoml==1\.4\.40.*bentoml==9\.9\.9"):
        importlib.reload(bp)
    monkeypatch.undo()
    importlib.reload(bp)


def test_only_bentoml_private_imports_bentoml_internals():
    users = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if PRIVATE.search(p.read_text()))
    assert users == ["serve/bentoml_private.py"]


def test_the_serde_table_is_what_the_request_path_reads():
    """The API endpoint picks its body parser from `_bentoml_impl.serde.ALL_SERDE` by media
    type, per request: replacing the entry is what puts multipart.py in charge."""
    from _bentoml_impl import serde
    from _bentoml_impl.server.app import ServiceAppFactory

    assert isinstance(serde.ALL_SERDE, dict)
    for media_type in ("multipart/form-data", "application/x-www-form-urlencoded", "application/json"):
        assert media_type in serde.ALL_SERDE
    src = inspect.getsource(ServiceAppFactory.api_endpoint)
    assert "ALL_SERDE.get(media_type" in src
    assert "input_spec.from_http_request(request, serde)" in src
    assert issubclass(bp.MultipartSerde, serde.Serde) and bp.MultipartSerde is serde.MultipartSerde
    params = list(inspect.signature(serde.MultipartSerde.parse_request).parameters)
    assert params == ["self", "request", "cls"]
    assert inspect.iscoroutinefunction(serde.MultipartSerde.parse_request)


def test_the_files_only_parser_is_installed_and_sees_file_fields():
    from bentoml._internal.configuration.containers import BentoMLContainer

    from covid_cxr.config import load_params, project_root
    from covid_cxr.serve import multipart
    from covid_cxr.release.bentoargs import serve_params

    # the arguments `bentoml serve --arg` would give it (the service refuses to start without them)
    BentoMLContainer.bento_arguments.set({k: str(v) for k, v in
                                          serve_params(load_params(project_root() / "params.yaml")).items()})
    from covid_cxr.serve.service import CovidCxr

    multipart.install()
    for media_type in multipart.FORM_TYPES:
        assert bp.serde_for(media_type) is multipart.FilesOnlyMultipartSerde
    # parse_request relies on the input model's `multipart_fields` and `model_fields`
    assert CovidCxr.apis["predict"].input_spec.multipart_fields == ["image"]
    assert CovidCxr.apis["predict_batch"].input_spec.multipart_fields == ["images"]
    assert CovidCxr.apis["report"].input_spec.multipart_fields == ["image"]
    assert set(CovidCxr.apis["report"].input_spec.model_fields) == {"image", "format"}
