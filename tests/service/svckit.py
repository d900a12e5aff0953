"""Helpers shared by the service tests (a uniquely named module: `conftest` is ambiguous
when several test folders have one)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
TOKEN = "s3cret-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(bentoml_home: Path, root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVID_CXR_")}
    env.update({
        "BENTOML_HOME": str(bentoml_home),
        "BENTOML_DO_NOT_TRACK": "true",
        "XDG_STATE_HOME": str(bentoml_home.parent / "state"),   # the prediction log's default home
        "COVID_CXR_ROOT": str(root),
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    return env


def run_cli(args: list[str], root: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "covid-cxr"), *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def prediction_log(env: dict[str, str]) -> Path:
    """Where a service started with `env` writes its prediction log by default."""
    return Path(env["XDG_STATE_HOME"]) / "covid-cxr" / "predictions.jsonl"
