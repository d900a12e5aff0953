"""DVC remotes and git commits for the release commands and the retraining steps.

A remote is given as a configured name (`team`), as a path or as a URL. A path or URL is used for
that one command only: `dvc` runs with a temporary system-level config that defines it as the
remote `covid-cxr` (the system config in force, if any, is kept inside it). Nothing is ever
written to `.dvc/config` or `.dvc/config.local`, so a clone's configuration stays what git gave it.
`remote_url` turns any of them into the location a production record can carry to another clone.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from covid_cxr.runner import Log, StepError, run

LOCATION_NAME = "covid-cxr"   # what a remote given as a path or URL is called while a command runs


def is_location(remote: str) -> bool:
    """A path or URL, as opposed to the name of a configured DVC remote."""
    return "://" in remote or os.sep in remote or remote.startswith((".", "~")) or Path(remote).exists()


def absolute(remote: str | None) -> str | None:
    """A remote given on a command line: a local path becomes absolute (a flow run or a served
    deployment starts in another folder); a remote name (`team`) or a URL is kept as is."""
    if not remote or "://" in remote or not is_location(remote):
        return remote or None
    return str(Path(remote).expanduser().resolve())


def configured(root: Path) -> tuple[str | None, dict[str, str]]:
    """(the default remote's name, {name: url}) from the repository's DVC config, every level
    merged; relative paths come back absolute, as DVC resolves them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        conf = repo.config
        return conf["core"].get("remote"), {k: str(v.get("url")) for k, v in conf["remote"].items()}


def remote_url(root: Path, remote: str | None) -> str:
    """Where `remote` (a name, a path, a URL, or None for the default) points. StepError if no
    such remote is configured."""
    if remote and is_location(remote):
        return str(absolute(remote))
    default, urls = configured(root)
    name = remote or default
    if not name:
        raise StepError("no DVC remote given and none is the default: pass --remote NAME|PATH|URL, or set one "
                        "with `dvc remote add -d NAME URL`")
    if name not in urls:
        raise StepError(f"no DVC remote named {name!r} (configured: {', '.join(sorted(urls)) or 'none'}); "
                        "pass a path or URL instead, or `dvc remote add NAME URL`")
    return urls[name]


@contextlib.contextmanager
def remote_args(remote: str | None) -> Iterator[tuple[list[str], dict[str, str]]]:
    """-> (the `-r NAME` arguments, extra environment) for a `dvc push/pull` to `remote`.
    None: the default remote; a name: as is; a path or URL: a temporary system config defines it."""
    if not remote:
        yield [], {}
        return
    if not is_location(remote):
        yield ["-r", remote], {}
        return
    url = str(absolute(remote))
    from dvc.dirs import system_config_dir

    current = Path(system_config_dir()) / "config"
    with tempfile.TemporaryDirectory(prefix="covid-cxr-dvc-") as d:
        text = current.read_text() if current.is_file() else ""
        (Path(d) / "config").write_text(f'{text}\n[\'remote "{LOCATION_NAME}"\']\n    url = {url}\n')
        yield ["-r", LOCATION_NAME], {"DVC_SYSTEM_CONFIG_DIR": d}


def dvc(root: Path, verb: str, targets: list[str], remote: str | None = None, log: Log | None = None,
        timeout: float | None = None) -> list[str]:
    """`dvc push|pull [-r R] TARGETS` in `root`, R as `remote_args` reads it. -> the output's last lines."""
    with remote_args(remote) as (args, env):
        return run(["dvc", verb, *args, *targets], root, log=log, timeout=timeout, env=env)[1]


def git_commit_files(root: Path, files: list[Path | str], message: str, log: Log | None = None) -> str | None:
    """Commit exactly `files` (relative to root or absolute; whatever else is staged stays staged)
    when any of them changed; returns the new commit sha or None."""
    root = Path(root)
    rels = [(Path(f).resolve().relative_to(root.resolve()) if Path(f).is_absolute() else Path(f)).as_posix()
            for f in files]
    rels = [r for r in rels if (root / r).exists()
            or run(["git", "ls-files", "--error-unmatch", r], root, check=False)[0] == 0]  # a deletion
    if not rels:
        return None
    run(["git", "add", "--", *rels], root, log=log)
    if run(["git", "diff", "--cached", "--quiet", "--", *rels], root, check=False)[0] == 0:
        if log:
            log(f"{', '.join(rels) or 'nothing'} unchanged: nothing to commit")
        return None
    run(["git", "commit", "-q", "-m", message, "--", *rels], root, log=log)
    _, lines = run(["git", "rev-parse", "HEAD"], root)
    return lines[-1].strip()
