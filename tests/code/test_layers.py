"""The package's layers run in pipeline order, data -> model -> evaluation -> release -> serve ->
orchestrate, over a floor of shared helpers; `cli` stands on top. No module imports from a layer
above its own (a function-level import counts too), and no modules import each other in a loop."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "src" / "covid_cxr"
LAYERS = ["data", "model", "evaluation", "release", "serve", "orchestrate"]
TOP = {"cli", "__init__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every covid_cxr module the file imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("covid_cxr")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("covid_cxr") and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}   # `from pkg import module`
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}
    return {m: {i for i in imports(p) if i in files and i != m} for m, p in files.items()}


def floor(module: str) -> int:
    """0: the shared helpers (config, hashing, ...); 1..6: the layers; 7: the console script."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in TOP:
        return 7 if len(parts) > 1 and parts[1] == "cli" else 0
    if parts[1] in LAYERS:
        return 1 + LAYERS.index(parts[1])
    return 0


def test_no_import_runs_back_up_the_layers():
    g = graph()
    assert len(g) > 50 and all(floor(m) in range(8) for m in g)
    up = sorted(f"{m} -> {i}" for m, deps in g.items() for i in deps if floor(i) > floor(m))
    assert up == [], "imports that run back up the layers:\n" + "\n".join(up)


def test_the_layer_check_sees_an_import_that_runs_back_up(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from covid_cxr.serve.settings import ServeArgs\n")
    assert imports(f) == {"covid_cxr.serve.settings", "covid_cxr.serve.settings.ServeArgs"}
    assert floor("covid_cxr.serve.settings") > floor("covid_cxr.release.package") > floor("covid_cxr.config")


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for i in sorted(g[m]):
            if state.get(i) == 1:
                cycles.append(stack[stack.index(i):] + [i])
            elif i not in state:
                visit(i, stack + [i])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)
