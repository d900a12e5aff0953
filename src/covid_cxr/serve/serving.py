"""`covid-cxr serve`: run the production Bento (registry/production.json) with `bentoml serve`.

    covid-cxr serve                          # production Bento on http://127.0.0.1:3000
    covid-cxr serve --host 0.0.0.0 --port 8080
    covid-cxr serve --model-dir artifacts/model   # local dev: the service code + a model directory

The process is replaced by `python -m bentoml serve ...`, so Ctrl-C and signals reach the
server directly. The service's settings are params.yaml `serve:`, passed as its arguments; the
token, the log's place and the threads are environment variables (settings.py).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from covid_cxr.console import fail
from covid_cxr.config import Paths


def serve_command(host: str, port: int, model_dir: Path | None = None, paths: Paths | None = None
                  ) -> tuple[list[str], dict[str, str]]:
    """The `bentoml serve` command line and environment; typer.Exit(1) with a message if
    there is nothing to serve."""
    paths = paths or Paths()
    env = dict(os.environ)
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env["COVID_CXR_ROOT"] = str(paths.root)   # the server says whether it serves production (/metadata)
    base = [sys.executable, "-m", "bentoml", "serve"]
    opts = ["--host", host, "--port", str(port)]
    if model_dir is not None:
        from covid_cxr.config import load_params
        from covid_cxr.release.bentoargs import bento_args

        check_model_dir(model_dir)
        return base + ["covid_cxr.serve.service:CovidCxr", "--arg", f"model_dir={model_dir.resolve()}",
                       *bento_args(load_params(paths.root / "params.yaml"))] + opts, env

    from covid_cxr.release.promotion import PromotionError, production

    try:
        rec = production(paths)
    except PromotionError as e:
        fail(str(e))
    if rec is None:
        fail(f"nothing is in production yet ({paths.production} names no Bento). Build one "
              "(`dvc repro`) and promote it (`covid-cxr promote`); or serve a model "
              "directory for development: `covid-cxr serve --model-dir artifacts/model`.")
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.get(rec["bento"])
    except NotFound:
        fail(f"production names Bento {rec['bento']}, but it is not in the BentoML store "
              f"({os.environ.get('BENTOML_HOME', '~/bentoml')}): fetch it with `covid-cxr pull-production` "
              "(or check BENTOML_HOME)")
    return base + [rec["bento"]] + opts, env


def check_model_dir(model_dir: Path) -> None:
    """A clear error (exit 1) unless `model_dir` is a model directory."""
    if not model_dir.exists():
        fail(f"--model-dir {model_dir}: no such directory")
    if not (model_dir / "model.json").is_file():
        fail(f"--model-dir {model_dir} is not a model directory (no model.json): give the folder "
             "`covid-cxr train` writes, e.g. artifacts/model")



def register(app: typer.Typer, data_app: typer.Typer) -> None:  # noqa: ARG001
    @app.command("serve")
    def serve_cmd(
        port: int = typer.Option(3000, "--port", "-p", help="TCP port."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 for all)."),
        model_dir: Path = typer.Option(None, "--model-dir",
                                       help="Serve this model directory instead of the production Bento."),
    ) -> None:
        """Serve the production Bento: API, /healthz, /metadata and the web page at /."""
        cmd, env = serve_command(host, port, model_dir)
        what = cmd[4]
        typer.echo(f"serving {what} on http://{host}:{port}  (web page: /, API docs: /docs.json)", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, cmd, env)
