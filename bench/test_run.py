"""Imports of the runner: no cycle among bench modules, no Triton kernel defined before TRITON_INTERPRET is set.

Plain tests (no benchmark fixture): run with `pytest bench/test_run.py`.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A fresh interpreter, so that nothing this test session imported counts.
PROBE = """
import sys
import bench.run
assert "ddim_fused.kernels" not in sys.modules, "importing bench.run defines the Triton kernels"
print("ok")
"""


def _bench_imports(path: Path) -> set[str]:
    """bench modules that `path` imports anywhere (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith("bench."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bench.")}
    return found


def test_bench_modules_import_no_cycle():
    modules = {p.stem: p for p in (ROOT / "bench").glob("*.py")
               if not p.stem.startswith("test_") and p.stem not in ("conftest", "__main__", "__init__")}
    graph = {name: _bench_imports(path) & set(modules) for name, path in modules.items()}
    assert "step" in graph and "run" in graph

    def cycle_from(name, trail):
        if name in trail:
            return trail[trail.index(name):] + [name]
        for dep in graph[name]:
            found = cycle_from(dep, trail + [name])
            if found:
                return found
        return None

    for name in graph:
        cycle = cycle_from(name, [])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_runner_does_not_import_the_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
