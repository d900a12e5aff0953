"""dvc.yaml's code deps are generated and current; its params are complete, derived from the code itself.

Code deps are written by `.ci/dvc_deps.py` from the code's imports (its docstring says how); this
test fails when they are stale, and its checker, on a copy of dvc.yaml, reports any one removed
dep. Nothing is hard-coded per stage except the reviewed `NOT_READ` waivers below, which are
themselves checked (a waiver the analysis no longer needs fails the suite).

Params
    An abstract interpretation of the AST, sound for the project's one convention: a
    params.yaml dict comes from `config.load_params(...)` and travels under the name `params`.
    * params-like values: a `load_params(...)` call, an argument named `params`, a name
      assigned one of those (through `x if c else y` / `a or b` too);
    * `P["s"]` / `P.get("s", ...)` on a params-like `P` is section `s`; names assigned a
      section are followed (`v = params["validate"]`, `v, pp = params["validate"],
      params["prepare"]`, `params.get("x", {}) or {}`);
    * `S["k"]` / `S.get("k")` on a section reads `s.k`; any other use of a section (passed to a
      function, iterated, returned) reads the whole section `s`;
    * a non-literal key is resolved when it is the target of a loop or comprehension over a
      literal tuple/list of names (`{k: p.get(k) for k in ("train", "gate")}`); otherwise, and
      whenever a params dict is handed to anything that is not a package function whose
      parameter is named `params` (so that its body is analysed too), the test fails and says
      where: the convention keeps the analysis sound.
    Reads are collected only from code a stage can reach: its root modules as a whole, the
    module-level code of every module in its closure, and the functions/classes those refer
    to by name (transitively, across modules). So `config.train_config` (which reads
    `train.*`) counts for `train` but not for `prepare`. Derived dicts such as `cfg =
    train_config(params)` need no tracking: their source keys are read, and reported, inside
    the helper. A read `s.k` is covered by a declared `s` or `s.k`; a whole-section read needs
    `s` (or every key of `s` declared). Classes are reached as a whole (all methods), which can
    over-report a field a stage never uses: such a read may be waived in `NOT_READ` with a reason.
"""
from __future__ import annotations

import ast
import copy
import sys
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dvc_deps", REPO / ".ci" / "dvc_deps.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dvc_deps"] = mod
    spec.loader.exec_module(mod)
    return mod


gen = _generator()
SRC, PKG, EXCLUDED = gen.SRC, gen.PKG, gen.EXCLUDED
Module, module_file, load_module, data_entries, closure = (gen.Module, gen.module_file, gen.load_module,
                                                          gen.data_entries, gen.closure)
command_modules, stage_command, bento_roots = gen.command_modules, gen.stage_command, gen.bento_roots
load_dvc, load_params_yaml = gen.load_dvc, gen.load_params_yaml

# (stage, param) reads the analysis reports that the stage provably does not depend on.
NOT_READ: dict[tuple[str, str], str] = {
    ("prepare", "validate.min_side"): "prepare builds rules.Limits but uses only max_pixels and near_dup_*",
    ("prepare", "validate.modes"): "prepare builds rules.Limits but uses only max_pixels and near_dup_*",
}


# --------------------------------------------------------------------------- name resolution


def _parent_map(nodes: list[ast.AST]) -> dict[ast.AST, ast.AST]:
    par: dict[ast.AST, ast.AST] = {}
    for top in nodes:
        for n in ast.walk(top):
            for c in ast.iter_child_nodes(n):
                par[c] = n
    return par


def resolve(m: Module, expr: ast.AST) -> tuple[str, str | None] | None:
    """A Name / Attribute chain -> (package module, top-level name or None for the module itself)."""
    if isinstance(expr, ast.Name):
        if expr.id in m.units and expr.id != "<module>":
            return (m.name, expr.id)
        return m.bindings.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = resolve(m, expr.value)
        if base is None or base[1] is not None:
            return None
        sub = f"{base[0]}.{expr.attr}"
        if module_file(sub):
            return (sub, None)
        return (base[0], expr.attr)
    return None


@lru_cache(maxsize=None)
def unit_refs(mod: str, unit: str) -> frozenset[tuple[str, str]]:
    """The (module, unit) pairs a unit refers to by name; a bare module reference means all of it."""
    m = load_module(mod)
    nodes = m.units[unit]
    par = _parent_map(nodes)
    out: set[tuple[str, str]] = set()
    for top in nodes:
        for n in ast.walk(top):
            if not isinstance(n, (ast.Name, ast.Attribute)) or isinstance(par.get(n), ast.Attribute):
                continue  # resolve the longest chain only
            r = resolve(m, n)
            while r is None and isinstance(n, ast.Attribute):
                n = n.value
                r = resolve(m, n)
            if r is None:
                continue
            mod, name = r
            if mod in EXCLUDED:
                continue
            target = load_module(mod)
            if name is None:
                out |= {(mod, u) for u in target.units}
            elif name in target.units:
                out.add((mod, name))
            elif name in target.bindings:  # re-exported name
                src = target.bindings[name]
                if src[1] is not None and src[1] in load_module(src[0]).units:
                    out.add((src[0], src[1]))
    return frozenset(out)


def reachable_units(roots: list[str], mods: list[str]) -> set[tuple[str, str]]:
    seen = {(r, u) for r in roots for u in load_module(r).units}
    seen |= {(mod, "<module>") for mod in mods if "<module>" in load_module(mod).units}
    todo = deque(seen)
    while todo:
        mod, u = todo.popleft()
        for ref in unit_refs(mod, u):
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return seen


def _callee(m: Module, call: ast.Call) -> tuple[ast.FunctionDef | None, bool]:
    """The package function a call runs, and whether its first parameter is self/cls."""
    fn = call.func
    mod = lambda name: m if name == m.name else load_module(name)  # noqa: E731
    r = resolve(m, fn)
    if r is not None and r[1] is not None:
        tm = mod(r[0])
        node = tm.units.get(r[1], [None])[0]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node, False
        if isinstance(node, ast.ClassDef):
            init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
            return init, True
    if isinstance(fn, ast.Attribute):  # Class.method(...)
        r = resolve(m, fn.value)
        if r is not None and r[1] is not None:
            node = mod(r[0]).units.get(r[1], [None])[0]
            if isinstance(node, ast.ClassDef):
                for s in node.body:
                    if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == fn.attr:
                        static = any(getattr(d, "id", None) == "staticmethod" for d in s.decorator_list)
                        return s, not static
    return None, False


# --------------------------------------------------------------------------- params reads


def _is_get(par: dict, node: ast.AST) -> ast.Call | None:
    """node.get(...) -> the Call, else None."""
    a = par.get(node)
    if isinstance(a, ast.Attribute) and a.value is node and a.attr == "get":
        c = par.get(a)
        if isinstance(c, ast.Call) and c.func is a:
            return c
    return None


def _const(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _loop_values(par: dict, node: ast.AST, name: str) -> list[str] | None:
    """Literal values a loop/comprehension variable `name` enclosing `node` takes, if literal."""
    cur = node
    while cur in par:
        cur = par[cur]
        gens = cur.generators if isinstance(cur, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)) else []
        if isinstance(cur, ast.For):
            gens = [cur]
        for g in gens:
            if isinstance(g.target, ast.Name) and g.target.id == name and isinstance(g.iter, (ast.Tuple, ast.List)):
                vals = [_const(e) for e in g.iter.elts]
                if all(vals):
                    return vals  # type: ignore[return-value]
    return None


class ParamsReads:
    """Params sections/keys read by one unit (see the module docstring)."""

    def __init__(self, m: Module, unit: str):
        self.m = m
        self.nodes = m.units[unit]
        self.par = _parent_map(self.nodes)
        self.reads: dict[str, str] = {}  # "s" or "s.k" -> where
        self.problems: list[str] = []
        self.pnames: set[str] = set()
        self.snames: dict[str, set[str]] = {}
        for top in self.nodes:
            for n in ast.walk(top):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    a = n.args
                    if any(x.arg == "params" for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)):
                        self.pnames.add("params")
        self._bind_names()
        self._scan()

    # params-like / section-like expressions
    def is_params(self, e: ast.AST) -> bool:
        if isinstance(e, ast.Name):
            return e.id in self.pnames
        if isinstance(e, ast.Call):
            f = e.func
            return (getattr(f, "id", None) or getattr(f, "attr", None)) == "load_params"
        if isinstance(e, ast.IfExp):
            return self.is_params(e.body) or self.is_params(e.orelse)
        if isinstance(e, ast.BoolOp):
            return any(self.is_params(v) for v in e.values)
        return False

    def sections(self, e: ast.AST) -> set[str]:
        if isinstance(e, ast.Name):
            return self.snames.get(e.id, set())
        if isinstance(e, ast.Subscript) and self.is_params(e.value):
            s = _const(e.slice)
            return {s} if s else set()
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and e.func.attr == "get" \
                and self.is_params(e.func.value) and e.args:
            s = _const(e.args[0])
            return {s} if s else set()
        if isinstance(e, ast.IfExp):
            return self.sections(e.body) | self.sections(e.orelse)
        if isinstance(e, ast.BoolOp):
            return set().union(*(self.sections(v) for v in e.values))
        return set()

    def _bind_names(self) -> None:
        changed = True
        while changed:
            changed = False
            for top in self.nodes:
                for n in ast.walk(top):
                    pairs = []
                    if isinstance(n, ast.Assign):
                        for t in n.targets:
                            if isinstance(t, ast.Tuple) and isinstance(n.value, ast.Tuple) \
                                    and len(t.elts) == len(n.value.elts):
                                pairs += list(zip(t.elts, n.value.elts))
                            else:
                                pairs.append((t, n.value))
                    elif isinstance(n, (ast.AnnAssign, ast.NamedExpr)) and n.value is not None:
                        pairs.append((n.target, n.value))
                    for t, v in pairs:
                        if not isinstance(t, ast.Name):
                            continue
                        if self.is_params(v) and t.id not in self.pnames:
                            self.pnames.add(t.id)
                            changed = True
                        s = self.sections(v)
                        if s - self.snames.get(t.id, set()):
                            self.snames.setdefault(t.id, set()).update(s)
                            changed = True

    def _read(self, key: str, node: ast.AST) -> None:
        self.reads.setdefault(key, self.m.rel(node))

    def _maximal(self, n: ast.AST, pred) -> bool:
        p = self.par.get(n)
        return not (isinstance(p, (ast.IfExp, ast.BoolOp)) and pred(p))

    def _scan(self) -> None:
        for top in self.nodes:
            for n in ast.walk(top):
                if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
                    continue
                secs = self.sections(n)
                if secs and self._maximal(n, self.sections):
                    self._use_section(n, secs)
                elif self.is_params(n) and self._maximal(n, self.is_params):
                    self._use_params(n)

    def _use_section(self, n: ast.AST, secs: set[str]) -> None:
        p = self.par.get(n)
        get = _is_get(self.par, n)
        key = None
        if isinstance(p, ast.Subscript) and p.value is n:
            key = _const(p.slice)
        elif get is not None and get.args:
            key = _const(get.args[0])
        if key:
            for s in secs:
                self._read(f"{s}.{key}", n)
        elif self._assigned_to_name(n):
            pass  # followed through the name
        else:
            for s in secs:
                self._read(s, n)

    def _assigned_to_name(self, n: ast.AST) -> bool:
        p = self.par.get(n)
        if isinstance(p, ast.Tuple) and isinstance(self.par.get(p), ast.Assign):
            a = self.par[p]
            return a.value is p and all(isinstance(t, ast.Tuple) for t in a.targets)
        return isinstance(p, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and p.value is n \
            and all(isinstance(t, ast.Name) for t in getattr(p, "targets", [getattr(p, "target", None)]))

    def _use_params(self, n: ast.AST) -> None:
        p = self.par.get(n)
        get = _is_get(self.par, n)
        if (isinstance(p, ast.Subscript) and p.value is n) or get is not None:
            keynode = p.slice if isinstance(p, ast.Subscript) and p.value is n else (get.args[0] if get.args else None)
            if _const(keynode):
                return  # a section: handled by _use_section on the parent
            vals = _loop_values(self.par, n, keynode.id) if isinstance(keynode, ast.Name) else None
            if vals is None:
                self.problems.append(f"{self.m.rel(n)}: params read with a non-literal key")
            for s in vals or []:
                self._read(s, n)
            return
        if self._assigned_to_name(n) or isinstance(p, (ast.Compare, ast.If, ast.IfExp, ast.BoolOp, ast.UnaryOp)):
            return  # followed through the name / a test, not a read
        call, kw = p, None
        if isinstance(p, ast.keyword):
            call, kw = self.par.get(p), p.arg
        if isinstance(call, ast.Call) and call.func is not n:
            fn, skip = _callee(self.m, call)
            if fn is None:
                self.problems.append(f"{self.m.rel(n)}: params handed to {ast.unparse(call.func)}(), "
                                     "not a package function: its reads cannot be traced")
                return
            args = [*fn.args.posonlyargs, *fn.args.args][1 if skip else 0:]
            if kw is None:
                i = call.args.index(n) if n in call.args else -1
                name = args[i].arg if 0 <= i < len(args) and not any(
                    isinstance(a, ast.Starred) for a in call.args[:i]) else None
            else:
                name = kw
            if name != "params":
                self.problems.append(f"{self.m.rel(n)}: params handed to {ast.unparse(call.func)}() as "
                                     f"{name!r}; name the parameter `params` so its reads are traced")
            return
        self.problems.append(f"{self.m.rel(n)}: params used whole ({ast.unparse(p)[:60]}): reads cannot be traced")


# --------------------------------------------------------------------------- stages


@dataclass
class Needs:
    files: dict[str, str]  # repo-relative path -> why
    params: dict[str, str]  # "s" / "s.k" -> where it is read
    problems: list[str]


@lru_cache(maxsize=None)
def unit_params(mod: str, unit: str) -> ParamsReads:
    return ParamsReads(load_module(mod), unit)


def stage_needs(name: str, stage: dict) -> Needs:
    base = REPO / stage.get("wdir", ".")
    command = stage_command(stage)
    cmds = command_modules()
    if command not in cmds:
        return Needs({}, {}, [f"stage {name!r}: `covid-cxr {command}` is not a registered command"])
    return _needs(tuple([cmds[command], *bento_roots(stage, base)]), base)


@lru_cache(maxsize=None)
def _needs(roots: tuple[str, ...], base: Path) -> Needs:
    chains, problems = closure(list(roots))
    files: dict[str, str] = {}
    for mod, chain in chains.items():
        m = load_module(mod)
        rel = Path(m.path).relative_to(base).as_posix()
        files[rel] = " -> ".join(chain)
        for entry in data_entries(m):
            files[(m.path.parent / entry).relative_to(base).as_posix()] = f"named in {m.path.name}"
    reads: dict[str, str] = {}
    for mod, unit in sorted(reachable_units(list(roots), list(chains))):
        pr = unit_params(mod, unit)
        problems += pr.problems
        for k, where in pr.reads.items():
            reads.setdefault(k, where)
    return Needs(files, reads, problems)


def declared_params(stage: dict) -> set[str]:
    out: set[str] = set()
    for p in stage.get("params", []) or []:
        if isinstance(p, str):
            out.add(p)
        elif isinstance(p, dict):
            for f, keys in p.items():
                if Path(f).name == "params.yaml":
                    out |= set(keys or [])
    return out


def param_covered(read: str, declared: set[str], params: dict) -> bool:
    sec, _, key = read.partition(".")
    if sec in declared or read in declared:
        return True
    if not key:  # a whole-section read: every key of it declared will do
        keys = params.get(sec)
        return isinstance(keys, dict) and bool(keys) and all(f"{sec}.{k}" in declared for k in keys)
    return False


def covered(path: str, deps: list[str]) -> bool:
    p = Path(path)
    return any(p == Path(d) or Path(d) in p.parents for d in deps if isinstance(d, str))


def check_stage(name: str, stage: dict, params: dict) -> list[str]:
    """Everything wrong with one stage's deps/params, one line each (empty: correct)."""
    if stage_command(stage) is None:
        return []
    needs = stage_needs(name, stage)
    out = list(needs.problems)
    deps = stage.get("deps", []) or []
    for f, why in sorted(needs.files.items()):
        if not covered(f, deps):
            out.append(f"stage {name!r}: {f} is missing from deps ({why})")
    declared = declared_params(stage)
    for r, where in sorted(needs.params.items()):
        if (name, r) in NOT_READ:
            continue
        if not param_covered(r, declared, params):
            out.append(f"stage {name!r}: params.yaml {r} is read ({where}) but not in the stage's params")
    return out


def checked_stages() -> dict[str, dict]:
    return {n: s for n, s in load_dvc()["stages"].items() if stage_command(s) is not None}


# --------------------------------------------------------------------------- the tests


def test_generated_code_deps_are_current():
    """dvc.yaml's src/ deps are exactly what .ci/dvc_deps.py generates from the imports."""
    _, changes = gen.generate((REPO / "dvc.yaml").read_text())
    assert not changes, "stale code deps (run .venv/bin/python .ci/dvc_deps.py):\n" + "\n".join(changes)


def test_some_stages_are_checked():
    st = checked_stages()
    assert {"prepare", "validate", "train", "evaluate", "gate", "package"} <= set(st), sorted(st)


@pytest.mark.parametrize("stage", sorted(checked_stages()))
def test_stage_deps_and_params_are_complete(stage):
    problems = check_stage(stage, load_dvc()["stages"][stage], load_params_yaml())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("stage", sorted(checked_stages()))
def test_no_stale_code_deps(stage):
    """A package source file listed in deps that the stage never imports is a stale dep (spurious reruns)."""
    s = load_dvc()["stages"][stage]
    needs = stage_needs(stage, s)
    pkg_dir = (SRC / PKG).relative_to(REPO)
    stale = [d for d in s.get("deps", []) if isinstance(d, str) and Path(d).suffix == ".py"
             and pkg_dir in Path(d).parents and d not in needs.files]
    assert not stale, f"stage {stage!r} lists code it does not import: {stale}"


@pytest.mark.parametrize("stage", sorted(checked_stages()))
def test_declared_params_exist(stage):
    params = load_params_yaml()
    for p in declared_params(load_dvc()["stages"][stage]):
        node = params
        for part in p.split("."):
            assert isinstance(node, dict) and part in node, f"stage {stage!r}: params.yaml has no {p}"
            node = node[part]


def test_waivers_are_still_needed():
    params = load_params_yaml()
    stages = load_dvc()["stages"]
    for (stage, read), why in NOT_READ.items():
        assert stage in stages, f"waiver for unknown stage {stage!r}"
        needs = stage_needs(stage, stages[stage])
        assert read in needs.params, f"waiver ({stage}, {read}) is stale: the analysis no longer reports it"
        assert not param_covered(read, declared_params(stages[stage]), params), \
            f"waiver ({stage}, {read}) is moot: the stage declares it"


# --------------------------------------------------------------------------- the checker checks itself


def _dep_cases():
    cases = []
    for name, s in checked_stages().items():
        needs = stage_needs(name, s)
        for d in s.get("deps", []):
            if any(covered(f, [d]) for f in needs.files):
                cases.append(pytest.param(name, d, id=f"{name}-{d}"))
    return cases


def _param_cases():
    cases = []
    params = load_params_yaml()
    for name, s in checked_stages().items():
        needs = stage_needs(name, s)
        for p in declared_params(s):
            if any(param_covered(r, {p}, params) and (name, r) not in NOT_READ for r in needs.params):
                cases.append(pytest.param(name, p, id=f"{name}-{p}"))
    return cases


@pytest.mark.parametrize("stage, dep", _dep_cases())
def test_checker_reports_each_removed_code_dep(stage, dep):
    """Deleting any one dep that covers closure files from (a copy of) dvc.yaml is reported, and only that."""
    dvc = copy.deepcopy(load_dvc())
    before = set(check_stage(stage, dvc["stages"][stage], load_params_yaml()))
    dvc["stages"][stage]["deps"].remove(dep)
    new = set(check_stage(stage, dvc["stages"][stage], load_params_yaml())) - before
    assert new, f"removing {dep} from stage {stage!r} went unnoticed"
    for p in new:
        assert p.startswith(f"stage {stage!r}: ") and "missing from deps" in p, p
        assert covered(p.split(": ", 1)[1].split(" ")[0], [dep]), p


@pytest.mark.parametrize("stage, param", _param_cases())
def test_checker_reports_each_removed_param(stage, param):
    """Deleting any one params entry the stage reads from (a copy of) dvc.yaml is reported, and only that."""
    dvc = copy.deepcopy(load_dvc())
    st = dvc["stages"][stage]
    before = set(check_stage(stage, st, load_params_yaml()))
    st["params"] = [p for p in st["params"] if p != param]
    new = set(check_stage(stage, st, load_params_yaml())) - before
    assert new, f"removing params {param} from stage {stage!r} went unnoticed"
    for p in new:
        assert "but not in the stage's params" in p, p
        read = p.split("params.yaml ", 1)[1].split(" ")[0]
        assert param_covered(read, {param}, load_params_yaml()), p


# --------------------------------------------------------------------------- the analysis on small cases


def _reads_of(src: str) -> tuple[dict[str, str], list[str]]:
    m = Module(f"{PKG}._probe", REPO / "probe.py", ast.parse(src))
    for stmt in m.tree.body:
        key = stmt.name if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)) else "<module>"
        m.units.setdefault(key, []).append(stmt)
    reads, probs = {}, []
    for u in m.units:
        pr = ParamsReads(m, u)
        reads.update(pr.reads)
        probs += pr.problems
    return reads, probs


@pytest.mark.parametrize("src, reads", [
    ("def f(params):\n    return params['gate']['min_accuracy']", {"gate.min_accuracy"}),
    ("def f(params):\n    v = params.get('validate', {}) or {}\n    return v.get('min_side', 1)", {"validate.min_side"}),
    ("def f(params):\n    v, pp = params['validate'], params['prepare']\n    return v['a'], pp['b']",
     {"validate.a", "prepare.b"}),
    ("def f():\n    p = load_params('x')\n    return {k: p.get(k) for k in ('train', 'gate')}", {"train", "gate"}),
    ("def f():\n    return load_params().get('gate', {}).get('tol', 0)", {"gate.tol"}),
    ("def f(params):\n    return decide(params['gate'])", {"gate"}),
    ("def f(x=None):\n    params = x if x is not None else load_params()\n    return params['evaluate']['ece_bins']",
     {"evaluate.ece_bins"}),
])
def test_analysis_finds_reads(src, reads):
    got, probs = _reads_of(src)
    assert set(got) == reads and not probs, (got, probs)


@pytest.mark.parametrize("src, problem", [
    ("def f(params, k):\n    return params[k]", "non-literal key"),
    ("import json\ndef f(params):\n    return json.dumps(params)", "not a package function"),
    ("def g(cfg):\n    return cfg\ndef f(params):\n    return g(params)", "name the parameter `params`"),
    ("def f(params):\n    return list(params.items())", "used whole"),
])
def test_analysis_refuses_what_it_cannot_trace(src, problem):
    _, probs = _reads_of(src)
    assert any(problem in p for p in probs), probs


def test_closure_follows_function_level_and_transitive_imports():
    chains, problems = closure([f"{PKG}.release.gate"])
    assert not problems
    # gate imports evaluate inside a function; evaluate -> checkpoint -> nets; every package on the way
    assert chains[f"{PKG}.evaluation.evaluate"] == [f"{PKG}.release.gate", f"{PKG}.evaluation.evaluate"]
    assert chains[f"{PKG}.model.nets"][-2:] == [f"{PKG}.model.checkpoint", f"{PKG}.model.nets"]
    assert f"{PKG}.model" in chains and f"{PKG}.data" in chains
    assert PKG in chains and f"{PKG}.cli" not in chains
    assert len(_dep_cases()) > len(checked_stages()) and len(_param_cases()) >= len(checked_stages())
