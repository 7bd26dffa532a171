"""Dependency rules of ARCHITECTURE.md, checked by parsing imports with ast."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# third-party package -> the only module allowed to import it
ONE_HOME = {
    "deepspeed": {"ptrain/engine.py"},
    "ray": {"sharding/job.py"},
    "decord": {"sharding/decode/decord.py"},
    "av": {"sharding/decode/pyav.py"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_files():
    for pkg in ("ptrain", "sharding"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), imports_of(path)


def test_ptrain_never_imports_sharding():
    bad = [(f, m) for f, mods in package_files() if f.startswith("ptrain/")
           for m in mods if m == "sharding" or m.startswith("sharding.")]
    assert not bad, f"ptrain must not depend on sharding: {bad}"


def test_heavy_dependencies_have_one_home():
    for f, mods in package_files():
        for pkg, homes in ONE_HOME.items():
            if any(m == pkg or m.startswith(pkg + ".") for m in mods):
                assert f in homes, f"{f} imports {pkg}; only {sorted(homes)} may"


def test_cli_and_help_do_not_import_heavy_packages():
    code = (
        "import sys, contextlib, io\n"
        "from ptrain.cli import main, VERBS\n"
        "for verb in VERBS:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main([verb, '--help']) == 0, verb\n"
        "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'decord', 'av', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"`ptrain VERB --help` imported {out.stdout.strip()}"
