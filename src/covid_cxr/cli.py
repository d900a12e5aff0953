"""The `covid-cxr` console script. Every pipeline stage is one sub-command.

dvc.yaml, the Prefect flow and people all call these same entry points.
Each stage module exposes `register(app, data_app)`; heavy imports (torch,
fastai, bentoml, great_expectations) stay inside the command bodies so that
`covid-cxr --help` is instant.
"""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="covid-cxr",
    help="Chest X-ray triage: data checks, training, evaluation, gating and serving.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Bring data in and check it.", no_args_is_help=True)
app.add_typer(data_app, name="data")

STAGE_MODULES = (
    "dataimport",
    "imagecheck",
    "prepare",
    "validate",
    "train",
    "external",
    "evaluate",
    "gate",
    "package",
    "serving",
    "monitor",
    "predict",
)

@app.callback()
def _main(ctx: typer.Context) -> None:
    """Print each command's wall time when it ends, so `dvc repro` logs show per-stage cost."""
    import time

    t0 = time.perf_counter()
    name = ctx.invoked_subcommand or ""
    ctx.call_on_close(lambda: typer.secho(f"⏱  covid-cxr {name}: {time.perf_counter() - t0:.1f} s wall",
                                          fg=typer.colors.BRIGHT_BLACK, err=True))


for _name in STAGE_MODULES:
    try:
        _mod = importlib.import_module(f"covid_cxr.{_name}")
    except ModuleNotFoundError as e:  # only while a stage is being written
        if e.name != f"covid_cxr.{_name}":
            raise
        continue
    _mod.register(app, data_app)


def main() -> None:
    """Console entry point: a missing input is a one-line error, not a traceback."""
    import sys

    try:
        app()
    except FileNotFoundError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
