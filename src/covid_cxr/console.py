"""How a command ends when it cannot do its work: one red `error: ...` line on stderr, a non-zero exit."""
from __future__ import annotations

from typing import NoReturn

import typer


def fail(msg: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
