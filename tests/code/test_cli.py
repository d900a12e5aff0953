"""The `covid-cxr` CLI's own text: help defaults, the wall-time line, usage errors, --profile."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from covid_cxr import cli

REPO = Path(__file__).resolve().parents[2]


def _flat(s: str) -> str:
    return " ".join(s.split())


def _commands():
    """(['data', 'import'], callback) for every registered command."""
    def walk(app, prefix):
        for ci in app.registered_commands:
            yield [*prefix, ci.name or ci.callback.__name__.replace("_", "-")], ci.callback
        for g in app.registered_groups:
            yield from walk(g.typer_instance, [*prefix, g.name])
    return list(walk(cli.app, []))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root with the real params.yaml (and a `probe` train profile of its own)."""
    root = tmp_path / "proj"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["profiles"]["probe"] = dict(params["train"]["profiles"]["smoke"])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("COVID_CXR_ROOT", str(root))
    monkeypatch.chdir(root)
    return root


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """cli.main() as the console script runs it: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["covid-cxr", *args])
    for k in ("TQDM_MININTERVAL", "TQDM_MAXINTERVAL"):  # main() sets these in a log: keep them test-local
        monkeypatch.setenv(k, os.environ.get(k, "10"))
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# --------------------------------------------------------------------------- help


def test_option_help_shows_bracketed_text_as_written():
    """No Rich markup: '[default: <root>/data]' in an option's help is printed, not eaten."""
    checked = 0
    for path, cb in _commands():
        helps = [p.default.help for p in inspect.signature(cb).parameters.values()
                 if getattr(p.default, "help", None) and "[" in p.default.help]
        if not helps:
            continue
        r = CliRunner().invoke(cli.app, [*path, "--help"], terminal_width=100)
        assert r.exit_code == 0, r.output
        for h in helps:
            assert _flat(h) in _flat(r.output), f"covid-cxr {' '.join(path)} --help lost text of: {h}"
            checked += 1
    assert checked >= 3  # data import --data, data check --report/--data, prepare --workers


def test_data_import_help_names_its_default():
    r = CliRunner().invoke(cli.app, ["data", "import", "--help"], terminal_width=200)
    assert "The project's data folder [default: <root>/data]." in r.output
    assert "folder ." not in r.output


# --------------------------------------------------------------------------- wall time


@pytest.mark.parametrize("args", [
    ["--help"], ["data", "--help"], ["data", "import", "--help"], ["train", "--help"], ["gate", "--help"],
])
def test_no_wall_time_after_help(monkeypatch, capsys, project, args):
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 0 and "Usage:" in out
    assert "⏱" not in out + err


@pytest.mark.parametrize("args, where", [
    (["gate", "--bogus"], "covid-cxr gate"),
    (["data", "import"], "covid-cxr data import"),  # missing argument
    (["data", "import", "/no/such/zip"], "covid-cxr data import"),
    (["nosuch"], "covid-cxr"),
    (["train", "--profile", "nope"], "covid-cxr train"),
])
def test_usage_errors_are_one_line_exit_2_without_wall_time(monkeypatch, capsys, project, args, where):
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    lines = (out + err).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {where}: ") and "Traceback" not in lines[0]
    assert "⏱" not in out + err


def test_wall_time_names_the_sub_command(monkeypatch, capsys, project, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_main(monkeypatch, capsys, "data", "import", str(empty))
    assert code == 0 and "Nothing new to add." in out
    assert re.search(r"^⏱  covid-cxr data import: \d+\.\d s wall$", err, re.M), err
    assert "covid-cxr data:" not in err


def test_a_failed_run_ends_on_its_error_not_a_wall_time(monkeypatch, capsys, project):
    code, out, err = run_main(monkeypatch, capsys, "gate")  # no metrics.json in the project
    assert code == 2 and "error: " in err and "metrics.json is missing" in err
    assert "⏱" not in out + err and err.strip().splitlines()[-1].startswith("error: ")


def test_bare_group_prints_its_help(monkeypatch, capsys, project):
    code, out, err = run_main(monkeypatch, capsys, "data")
    assert code == 2 and "import" in out + err and "check" in out + err and "error:" not in out + err


# --------------------------------------------------------------------------- --profile


def test_profile_must_be_one_of_params_profiles(monkeypatch, capsys, project):
    code, out, err = run_main(monkeypatch, capsys, "train", "--profile", "nope")
    assert code == 2
    msg = (out + err).strip()
    import yaml

    names = ", ".join(sorted(yaml.safe_load((project / "params.yaml").read_text())["train"]["profiles"]))
    assert "probe" in names  # the fixture's own profile is listed: the list is read, not hard-coded
    assert f"'nope' is not one of params.yaml's train.profiles ({names})" in msg


def test_profile_list_comes_from_params_yaml(monkeypatch, project):
    """`probe` exists only in this project's params.yaml: it is accepted, and `full` is not once removed."""
    import covid_cxr.model.train as train_mod

    seen = {}
    monkeypatch.setattr(train_mod, "train", lambda paths, params: seen.setdefault("profile", params["train"]["profile"]))
    r = CliRunner().invoke(cli.app, ["train", "--profile", "probe"])
    assert r.exit_code == 0, r.output
    assert seen == {"profile": "probe"}

    params = yaml.safe_load((project / "params.yaml").read_text())
    del params["train"]["profiles"]["full"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    r = CliRunner().invoke(cli.app, ["train", "--profile", "full"])
    assert r.exit_code == 2 and "'full' is not one of" in r.output


# --------------------------------------------------------------------------- stage imports


def test_a_missing_stage_module_is_an_error_not_skipped():
    """cli no longer swallows ModuleNotFoundError: a stage that cannot be imported breaks the CLI loudly."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['covid_cxr.release.gate'] = None; import covid_cxr.cli"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr and "covid_cxr.release.gate" in r.stderr


def test_console_script_runs_as_a_subprocess(project):
    """The real entry point end to end: a usage error exits 2 with one line on stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "COVID_CXR_ROOT": str(project)}
    r = subprocess.run([sys.executable, "-m", "covid_cxr.cli", "train", "--profile", "nope"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: covid-cxr train: ")
