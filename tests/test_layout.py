"""The project's layering (docs/design.md#layering), read from the source: imports go ground -> package ->
root scripts, with no cycle anywhere, and every root module but the ground ones is a command."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUND = {"errors", "sae", "wrappedmodels", "data"}
"""Modules every layer stands on (data is a package)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    files = [*ROOT.glob("*.py"), *(ROOT / "data").rglob("*.py"), *(ROOT / "saeshare").rglob("*.py")]
    return {_module_name(p): p for p in files}


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import mod` imports the submodule when there is one
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def _graph() -> dict[str, set[str]]:
    known = _project_modules()
    return {name: _imports(path, known) - {name} for name, path in known.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def _is_script(name: str) -> bool:
    return "." not in name and name not in GROUND and name != "saeshare"


def test_no_import_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_run_one_way():
    graph = _graph()
    for name, deps in graph.items():
        if _top(name) == "saeshare" or _top(name) in GROUND:
            scripts = sorted(d for d in deps if _is_script(d))
            assert not scripts, f"{name} imports the command(s) {scripts}: commands sit on top of the library"
        if _top(name) in GROUND:
            up = sorted(d for d in deps if _top(d) == "saeshare")
            assert not up, f"{name} is ground and imports the package: {up}"


def test_the_root_is_a_menu_of_commands():
    root_files = sorted(p.stem for p in ROOT.glob("*.py"))
    for stem in root_files:
        if stem in GROUND:
            continue
        tree = ast.parse((ROOT / f"{stem}.py").read_text())
        mains = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert mains, f"{stem}.py is at the root but is not a command: move it into saeshare/"


def test_the_checks_see_a_planted_violation(tmp_path):
    """The rules above read real imports: a package module importing a command is caught."""
    known = {**_project_modules(), "saeshare.fake": tmp_path / "fake.py"}
    (tmp_path / "fake.py").write_text("def f():\n    from wmppc import main\n")
    assert _imports(tmp_path / "fake.py", known) == {"wmppc"} and _is_script("wmppc")
