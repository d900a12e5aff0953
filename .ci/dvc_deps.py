#!/usr/bin/env python3
"""Generate the code deps of every `covid-cxr` stage in dvc.yaml from the code's own imports.

    .venv/bin/python .ci/dvc_deps.py           # rewrite dvc.yaml's code deps (comments and order kept)
    .venv/bin/python .ci/dvc_deps.py --check   # exit 1 and list the differences when they are stale

A stage whose `cmd` is `covid-cxr <command> ...` depends on the module that registers `<command>`
(the typer callback's module) and on every package module that module imports, transitively: at
module level or inside a function (`from covid_cxr.x import`, `import covid_cxr.x`, relative
imports, literal `importlib.import_module("covid_cxr.x")`), with the `__init__.py` of every package
on the way. A yaml dep with a BentoML `service: "covid_cxr.x:Svc"` key (bentofile.yaml) adds that
module as a root. A string literal naming a non-Python entry of a module's package folder
(`"web"`) is data the code reads: that entry is a dep too. `cli.py` is left out on purpose: it only
dispatches, and it imports every stage module.

Every dep under `src/` is generated; every other dep (data, artifacts, bentofile.yaml) is kept as
written. tests/code/test_dvc_deps.py fails when the generated deps are stale, and checks the
params each stage reads.
"""
from __future__ import annotations

import argparse
import ast
import shlex
import sys
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PKG = "covid_cxr"
EXCLUDED = {f"{PKG}.cli"}  # the dispatcher: see the module docstring


# --------------------------------------------------------------------------- the package's modules


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: dict[str, int] = field(default_factory=dict)  # package module -> line of the import
    bindings: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # local name -> (module, attr)
    units: dict[str, list[ast.AST]] = field(default_factory=dict)  # top-level def/class name (or <module>)
    problems: list[str] = field(default_factory=list)

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    def rel(self, node: ast.AST) -> str:
        return f"{self.path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"


def _in_pkg(name: str | None) -> bool:
    return bool(name) and (name == PKG or name.startswith(PKG + "."))


@lru_cache(maxsize=None)
def load_module(name: str) -> Module:
    path = module_file(name)
    assert path is not None, name
    tree = ast.parse(path.read_text(), str(path))
    m = Module(name, path, tree)

    def add_import(target: str, node: ast.AST) -> None:
        for t in (*_parents(target), target):
            if module_file(t):
                m.imports.setdefault(t, node.lineno)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name if m.is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{node.module}" if node.module else pkg
            else:
                base = node.module or ""
            if not _in_pkg(base):
                continue
            add_import(base, node)
            for a in node.names:
                full = f"{base}.{a.name}"
                if a.name != "*" and module_file(full):
                    add_import(full, node)
                    m.bindings[a.asname or a.name] = (full, None)
                elif a.name != "*":
                    m.bindings[a.asname or a.name] = (base, a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if _in_pkg(a.name):
                    add_import(a.name, node)
                    if a.asname:
                        m.bindings[a.asname] = (a.name, None)
                    else:
                        m.bindings[a.name.split(".")[0]] = (PKG, None)
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if fname in ("import_module", "__import__"):
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if _in_pkg(arg.value):
                        add_import(arg.value, node)
                else:
                    m.problems.append(f"{m.rel(node)}: dynamic import; the dependency closure cannot be computed")

    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            m.units[stmt.name] = [stmt]
        else:
            m.units.setdefault("<module>", []).append(stmt)
    return m


def data_entries(m: Module) -> dict[str, int]:
    """Non-Python entries of the module's package folder that the module names in a string literal."""
    folder = m.path.parent
    entries = {p.name for p in folder.iterdir()
               if p.suffix != ".py" and p.name != "__pycache__" and not p.name.endswith(".egg-info")
               and not (p / "__init__.py").exists()}  # a subpackage is reached by its imports
    found: dict[str, int] = {}
    for node in ast.walk(m.tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in entries:
            found.setdefault(node.value, node.lineno)
    return found


def closure(roots: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Every package module the roots import, transitively -> its import chain from a root."""
    chains: dict[str, list[str]] = {}
    todo = deque()
    for r in roots:
        for t in (r, *_parents(r)):
            if t not in chains:
                chains[t] = [r] if t == r else [r, t]
                todo.append(t)
    problems: list[str] = []
    while todo:
        cur = todo.popleft()
        m = load_module(cur)
        problems += m.problems
        for dep in m.imports:
            if dep not in chains and dep not in EXCLUDED:
                chains[dep] = chains[cur] + [dep]
                todo.append(dep)
    return chains, problems


# --------------------------------------------------------------------------- stages


@lru_cache(maxsize=1)
def command_modules() -> dict[str, str]:
    """'prepare' / 'data import' -> the module whose register() defines the command."""
    from covid_cxr import cli

    out: dict[str, str] = {}

    def walk(app, prefix: str) -> None:
        for ci in app.registered_commands:
            name = ci.name or ci.callback.__name__.replace("_", "-")
            out[f"{prefix}{name}"] = ci.callback.__module__
        for g in app.registered_groups:
            walk(g.typer_instance, f"{prefix}{g.name} ")

    walk(cli.app, "")
    assert set(out.values()) <= {f"{PKG}.{n}" for n in cli.STAGE_MODULES}, out
    return out


def load_dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def load_params_yaml() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def stage_command(stage: dict) -> str | None:
    """`covid-cxr data import x --y` -> 'data import' (the longest registered command prefix)."""
    cmd = stage.get("cmd")
    cmd = cmd[0] if isinstance(cmd, list) else cmd
    if not isinstance(cmd, str):
        return None
    words = shlex.split(cmd)
    if not words or words[0] != "covid-cxr":
        return None
    words = [w for w in words[1:3] if not w.startswith("-")]
    cmds = command_modules()
    for n in (2, 1):
        if len(words) >= n and " ".join(words[:n]) in cmds:
            return " ".join(words[:n])
    return " ".join(words[:1]) or "<none>"


def bento_roots(stage: dict, base: Path) -> list[str]:
    roots = []
    for d in stage.get("deps", []):
        p = base / d
        if p.suffix in (".yaml", ".yml") and p.is_file():
            svc = (yaml.safe_load(p.read_text()) or {}).get("service")
            if isinstance(svc, str) and _in_pkg(svc.split(":")[0]) and module_file(svc.split(":")[0]):
                roots.append(svc.split(":")[0])
    return roots




# --------------------------------------------------------------------------- generated deps


def stage_code_deps(stage: dict) -> list[str] | None:
    """The sorted src/ deps a `covid-cxr` stage needs (None: not a covid-cxr stage)."""
    command = stage_command(stage)
    if command is None:
        return None
    cmds = command_modules()
    if command not in cmds:
        raise SystemExit(f"`covid-cxr {command}` is not a registered command")
    chains, problems = closure([cmds[command], *bento_roots(stage, REPO / stage.get("wdir", "."))])
    if problems:
        raise SystemExit("\n".join(problems))
    files = set()
    for mod in chains:
        m = load_module(mod)
        files.add(m.path.relative_to(REPO).as_posix())
        files |= {(m.path.parent / e).relative_to(REPO).as_posix() for e in data_entries(m)}
    return sorted(files)


def _is_code(dep) -> bool:
    return isinstance(dep, str) and Path(dep).parts[:1] == ("src",)


def generate(text: str) -> tuple[str, list[str]]:
    """dvc.yaml's text with every covid-cxr stage's src/ deps regenerated -> (new text, one line per change)."""
    import io

    from ruamel.yaml import YAML

    ry = YAML()
    ry.preserve_quotes = True
    ry.width = 4096
    ry.indent(mapping=2, sequence=4, offset=2)
    doc = ry.load(text)
    changes = []
    for name, stage in doc["stages"].items():
        want = stage_code_deps(stage)
        if want is None:
            continue
        deps = stage.get("deps")
        have = [d for d in deps if _is_code(d)] if deps else []
        for d in sorted(set(have) - set(want)):
            changes.append(f"{name}: - {d}")
        for d in sorted(set(want) - set(have)):
            changes.append(f"{name}: + {d}")
        if have == want:
            continue
        if deps is None:
            from ruamel.yaml.comments import CommentedSeq

            stage["deps"] = deps = CommentedSeq()
        for d in have:
            deps.remove(d)
        deps.extend(want)
    out = io.StringIO()
    ry.dump(doc, out)
    return out.getvalue(), changes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="report stale deps and exit 1; change nothing")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(SRC))
    path = REPO / "dvc.yaml"
    text = path.read_text()
    new, changes = generate(text)
    for c in changes:
        print(c)
    if a.check:
        if changes:
            print(f"dvc.yaml's code deps are stale ({len(changes)} changes): run .venv/bin/python .ci/dvc_deps.py")
            return 1
        print("dvc.yaml's code deps are current")
        return 0
    if new != text:
        path.write_text(new)
        print(f"dvc.yaml: {len(changes)} code deps changed")
    else:
        print("dvc.yaml: code deps already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
