"""The `covid-cxr` console script. Every pipeline stage is one sub-command.

dvc.yaml, the Prefect flow and people all call these same entry points.
Each stage module exposes `register(app, data_app)`; heavy imports (torch,
fastai, bentoml, great_expectations) stay inside the command bodies so that
`covid-cxr --help` is instant.

Help text is plain (no Rich markup), so `[default: ...]` in option help shows as written.
A command that does its work prints its wall time on stderr when it ends (`dvc repro` logs show
per-stage cost); `--help`, usage errors and failures print none. A usage error is one line, exit 2.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import time
from typing import Any

import typer
from typer.core import TyperCommand

try:  # typer >= 0.20 vendors click; its exceptions are what the parser raises
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as _cx

app = typer.Typer(
    name="covid-cxr",
    help="Chest X-ray triage: data checks, training, evaluation, gating and serving.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Bring data in and check it.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")

STAGE_MODULES = (  # each registers its commands; in pipeline order
    "data.archive",
    "data.imagecheck",
    "data.prepare",
    "data.validate",
    "model.train",
    "evaluation.negatives",
    "evaluation.external",
    "evaluation.evaluate",
    "release.gate",
    "release.package",
    "release.registry",
    "serve.serving",
    "serve.monitoring.monitor",
    "serve.predict",
    "orchestrate.automations",
)


def command_name(ctx: typer.Context) -> str:
    """'covid-cxr data import': the command path, whatever the program was started as."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["covid-cxr", *reversed(names)])


class TimedCommand(TyperCommand):
    """Prints the command's wall time once it has done its work (exit 0): not for --help, usage
    errors or a command that failed, whose last line stays its error."""

    def invoke(self, ctx: typer.Context) -> Any:
        t0 = time.perf_counter()
        try:
            rv = super().invoke(ctx)
        except typer.Exit as e:
            if e.exit_code == 0:
                _wall(ctx, t0)
            raise
        _wall(ctx, t0)
        return rv


def _wall(ctx: typer.Context, t0: float) -> None:
    typer.secho(f"⏱  {command_name(ctx)}: {time.perf_counter() - t0:.1f} s wall", fg=typer.colors.BRIGHT_BLACK,
                err=True)


def _train_profile(value: str | None) -> str | None:
    """--profile of `covid-cxr train` must name one of params.yaml's train.profiles."""
    if value is None:
        return value
    from covid_cxr.config import load_params, project_root

    profiles = list((load_params(project_root() / "params.yaml").get("train") or {}).get("profiles") or {})
    if value not in profiles:
        raise typer.BadParameter(f"{value!r} is not one of params.yaml's train.profiles ({', '.join(profiles)})")
    return value


# (command, option parameter) -> validator run while the arguments are parsed
VALIDATORS = {("train", "profile"): _train_profile}


def _install(typer_app: typer.Typer, prefix: str = "") -> None:
    for ci in typer_app.registered_commands:
        if ci.cls in (None, TyperCommand):  # the decorator default
            ci.cls = TimedCommand
        name = prefix + (ci.name or ci.callback.__name__.replace("_", "-"))
        for param in inspect.signature(ci.callback).parameters.values():
            check = VALIDATORS.get((name, param.name))
            if check is not None:
                opt = param.default
                assert isinstance(opt, typer.models.ParameterInfo) and opt.callback is None, (name, param.name)
                opt.callback = check
    for g in typer_app.registered_groups:
        _install(g.typer_instance, f"{prefix}{g.name} ")


for _name in STAGE_MODULES:
    importlib.import_module(f"covid_cxr.{_name}").register(app, data_app)
_install(app)


def main() -> None:
    """Console entry point: a usage error or a missing input is one line on stderr, not a traceback."""
    from covid_cxr.progress import throttle_tqdm_env

    throttle_tqdm_env()  # before any stage imports tqdm: a log gets a bar line now and then
    try:
        rv = app(standalone_mode=False)
    except _cx.NoArgsIsHelpError as e:  # bare `covid-cxr` / `covid-cxr data`: the help
        e.show()
        sys.exit(e.exit_code)
    except _cx.UsageError as e:
        where = command_name(e.ctx) if e.ctx is not None else "covid-cxr"
        typer.secho(f"error: {where}: {e.format_message()} (see '{where} --help')", fg=typer.colors.RED, err=True)
        sys.exit(e.exit_code)
    except _cx.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    except FileNotFoundError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
