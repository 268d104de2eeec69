"""A one-way package graph: `evaluation` builds on `pixsig_distill`, never the reverse, and no module of
`pixsig_distill` takes part in an import cycle (imports inside functions count too)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: dict) -> set[str]:
    """Every module `name` imports, anywhere in the file, resolved to the known modules where possible."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def test_pixsig_distill_never_imports_evaluation():
    modules = _modules("pixsig_distill")
    offenders = {name: sorted(i for i in _imports(name, path, modules) if i.split(".")[0] == "evaluation")
                 for name, path in modules.items()}
    assert not {k: v for k, v in offenders.items() if v}, "evaluation plugs in through config (_target_) instead"


def test_no_import_cycles_inside_pixsig_distill():
    modules = _modules("pixsig_distill")
    graph = {name: {i for i in _imports(name, path, modules) if i in modules and i != name and i != "pixsig_distill"}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return path + [name, dep]
            if dep not in state and (cycle := visit(dep, path + [name])):
                return cycle
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, " → ".join(cycle[cycle.index(cycle[-1]):])
