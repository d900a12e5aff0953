"""Fixtures for the retraining-flow tests (helpers live in flowkit.py)."""
from __future__ import annotations

import pytest

from flowkit import Project, make_project


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server (subprocess, temp SQLite) for in-process flow runs; its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def fake_project(tmp_path, monkeypatch) -> Project:
    proj = make_project(tmp_path, kind="fake")
    monkeypatch.setenv("PATH", proj.env["PATH"])
    for k in ("COVID_CXR_ROOT", "BENTOML_HOME", "BENTOML_DO_NOT_TRACK"):
        monkeypatch.setenv(k, proj.env[k])
    from covid_cxr import release

    import fake_stages

    describe, export_bento = fake_stages.release_fakes(proj.root)
    monkeypatch.setattr(release, "describe", describe)
    monkeypatch.setattr(release, "export_bento", export_bento)
    return proj
