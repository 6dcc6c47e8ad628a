"""The layout rules, checked on the source: no import cycles, one importer of the kernels."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folder -> package name as installed.
PACKAGES = {"ddim_fused": "ddim_fused", "bench": "bench"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and parts[0].startswith("test_") or path.name in ("conftest.py",):
                continue
            found[".".join([package] + parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that module `name` imports anywhere in its body (lazy imports too)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            if isinstance(node.args[0], ast.Constant):
                targets = [node.args[0].value]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph():
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _parent_packages(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_two_modules_import_each_other():
    graph = _graph()
    # Importing a submodule runs its package's __init__; that edge is not a cycle.
    cycles = sorted(
        (a, b) for a, deps in graph.items() for b in deps
        if a < b and a in graph.get(b, set()) and a not in _parent_packages(b) and b not in _parent_packages(a)
    )
    assert not cycles, f"modules importing each other: {cycles}"


def test_no_longer_import_cycles():
    graph = {a: {b for b in deps if b not in _parent_packages(a) and a not in _parent_packages(b)}
             for a, deps in _graph().items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_only_the_backend_module_imports_the_kernels():
    importers = sorted(name for name, deps in _graph().items()
                       if not name.startswith("ddim_fused.kernels") and any(d.startswith("ddim_fused.kernels") for d in deps))
    assert importers == ["ddim_fused.backend"]


def test_kernels_import_nothing_from_the_host_package():
    for name, deps in _graph().items():
        if name.startswith("ddim_fused.kernels"):
            host = sorted(d for d in deps if not d.startswith("ddim_fused.kernels") and d != "ddim_fused")
            assert not host, f"{name} imports host modules {host}"


def test_setup_installs_every_package_folder():
    """A non-editable install copies only the packages setup.py lists: every folder of the
    package with an __init__.py must be there (ddim_fused.cli once was not)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    listed = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for kw in node.keywords if kw.arg == "packages")
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ddim_fused").rglob("__init__.py")}
    assert set(ast.literal_eval(listed)) == folders
