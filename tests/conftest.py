"""Suite-wide settings. Sub-folders (code, data, model, service, flows) hold their own fixtures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# The team's shared folder sits beside the checkout (CI clones elsewhere, with ../shared beside it).
SHARED = Path(os.environ.get("COVID_CXR_SHARED", REPO.parent / "shared")).resolve()
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "incoming" / "batch-001").exists():
        pytest.skip(f"{SHARED} (the team's shared folder) is not beside the checkout")
    return SHARED
