"""Fixtures for the retraining-flow tests (helpers live in flowkit.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flowkit import Project, api, free_port, make_project, stop_group, wait_for


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
    from covid_cxr.release import registry as release

    import fake_stages

    describe, export_bento = fake_stages.release_fakes(proj.root)
    monkeypatch.setattr(release, "describe", describe)
    monkeypatch.setattr(release, "export_bento", export_bento)
    return proj


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start --host 127.0.0.1 --port <free>` with its own PREFECT_HOME; its env."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        def healthy():
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                return api(url, "GET", "/health") is True
            except Exception:
                return False

        wait_for(healthy, 150, "the Prefect server to answer /api/health", interval=1)
        yield {**env, "PREFECT_API_URL": url}
    finally:
        stop_group(proc, signal.SIGTERM, 20)
        log.close()
