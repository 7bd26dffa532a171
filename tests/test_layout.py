"""Dependency rules of ARCHITECTURE.md, checked by parsing imports with ast: an acyclic import graph, no private
names imported across modules, one home per heavy dependency, a model library without collectives, a fast CLI."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ptrain", "sharding", "ptrain_demo")

# third-party package -> the only modules allowed to import it
ONE_HOME = {
    "deepspeed": {"ptrain/engine.py"},
    "ray": {"sharding/job.py", "ptrain/cluster.py"},
    "decord": {"sharding/decode/decord.py"},
    "av": {"sharding/decode/pyav.py"},
    "webdataset": {"ptrain/data/shards.py"},
    "matplotlib": {"ptrain/report.py"},
}
# what the model library must never reach (directly or through the modules it imports)
COLLECTIVES = {"ptrain.distributed", "ptrain.loss", "ptrain.engine", "ptrain.loop"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")) if (ROOT / pkg).is_dir() else []:
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, [names]) of every absolute import in the file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _internal_edges(path: Path) -> set[str]:
    """The project modules a file imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    edges = set()
    for module, names in _imports(path):
        for name in names or [None]:
            full = f"{module}.{name}" if name else module
            if full in MODULES:
                edges.add(full)
            elif module in MODULES:
                edges.add(module)
    return edges


GRAPH = {name: _internal_edges(path) for name, path in MODULES.items()}


def _rel(name: str) -> str:
    return MODULES[name].relative_to(ROOT).as_posix()


def test_import_graph_is_acyclic():
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = "open"
        stack.append(u)
        for v in sorted(GRAPH[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_another_modules_private_names():
    bad = []
    for name, path in MODULES.items():
        for module, names in _imports(path):
            if module in MODULES and module != name:
                bad += [f"{_rel(name)}: from {module} import {n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_ptrain_never_imports_sharding_or_the_demo():
    for name in GRAPH:
        if name.startswith(("ptrain.", "sharding.")) or name in ("ptrain", "sharding"):
            bad = [m for m in GRAPH[name] if m.startswith("ptrain_demo")]
            if name.startswith("ptrain"):
                bad += [m for m in GRAPH[name] if m.startswith("sharding")]
            assert not bad, f"{_rel(name)} imports {bad}"


def test_heavy_dependencies_have_one_home():
    for name, path in MODULES.items():
        used = {m.split(".")[0] for m, _ in _imports(path)}
        for pkg, homes in ONE_HOME.items():
            if pkg in used:
                assert _rel(name) in homes, f"{_rel(name)} imports {pkg}; only {sorted(homes)} may"


def test_model_library_reaches_no_collectives():
    seen, todo = set(), [m for m in MODULES if m.startswith("ptrain.model")]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(GRAPH[m])
    assert not seen & COLLECTIVES, f"ptrain.model reaches {sorted(seen & COLLECTIVES)}"
    for m in seen:
        dist = [mod for mod, _ in _imports(MODULES[m]) if mod.startswith("torch.distributed")]
        assert not dist, f"{_rel(m)} (reached from ptrain.model) imports {dist}"


def test_cli_and_help_do_not_import_heavy_packages():
    code = (
        "import sys, contextlib, io\n"
        "from ptrain.cli import main, VERBS\n"
        "for verb in VERBS:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main([verb, '--help']) == 0, verb\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--version']) == 0 and main([]) == 0\n"
        "import ptrain, ptrain.configs, ptrain.model.config, ptrain.model.registry, ptrain.data.config\n"
        "import ptrain.data.format\n"
        "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'decord', 'av', 'transformers', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"importing ptrain / `ptrain VERB --help` imported {out.stdout.strip()}"
