"""The layering and one-mechanism-per-concept rules of the code base, checked on its source.

* ``analysis/`` imports neither torch nor ``extract`` (it runs where torch is not installed);
* ``extract/`` imports only ``analysis.core`` outside its command line (``extract/cli``);
* module hooks are registered only in ``extract/engine/hooks.py`` (every intervention is a rule on its points);
* files are renamed into place only in ``analysis/core/io.py`` (one atomic-write implementation);
* every command of ``dormant`` is in the README.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def _imports(path: Path, top_level: bool = False) -> list[str]:
    """Every module a file imports, at any depth (function-local imports included) or at its top level only."""
    out = []
    tree = ast.parse(path.read_text(), str(path))
    for node in (tree.body if top_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def _calls(path: Path, names: set[str]) -> list[str]:
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in names:
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return hits


def test_analysis_imports_neither_torch_nor_extract():
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in _modules("analysis") for m in _imports(p)
           if m.split(".")[0] in ("torch", "transformers", "extract")]
    assert not bad, "analysis/ must not import torch, transformers or extract:\n" + "\n".join(bad)


def test_extract_imports_only_analysis_core_outside_its_cli():
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in _modules("extract") if "cli" not in p.relative_to(ROOT).parts
           for m in _imports(p) if m.split(".")[0] == "analysis" and not m.startswith("analysis.core")]
    assert not bad, "extract/ may import only analysis.core outside extract/cli:\n" + "\n".join(bad)


def test_analysis_core_is_standard_library_only_where_promised():
    for name in ("io.py", "names.py", "settings.py", "tables.py", "score_functions.py"):  # third-party: lazily
        path = ROOT / "analysis" / "core" / name
        third_party = [m for m in _imports(path, top_level=True) if m.split(".")[0] not in sys.stdlib_module_names
                       and m.split(".")[0] not in ("analysis", "__future__")]
        assert not third_party, f"analysis/core/{name} imports {third_party}"


def test_hooks_are_registered_only_in_engine_hooks():
    names = {"register_forward_pre_hook", "register_forward_hook", "register_full_backward_hook"}
    bad = [h for pkg in ("extract", "analysis") for p in _modules(pkg)
           if p != ROOT / "extract" / "engine" / "hooks.py" for h in _calls(p, names)]
    assert not bad, "register module hooks through extract.engine.hooks:\n" + "\n".join(bad)


def test_one_atomic_write_implementation():
    bad = [h for pkg in ("extract", "analysis") for p in _modules(pkg)
           if p != ROOT / "analysis" / "core" / "io.py" for h in _calls(p, {"replace", "rename"})
           if re.search(r"os\.(replace|rename)\(", p.read_text())]
    assert not bad, "write files through analysis.core.io (atomic_path, write_*):\n" + "\n".join(bad)


def test_decoder_layers_are_found_in_one_place():
    pattern = re.compile(r"(base_model|get_decoder\(\)|model\.model)\.layers")
    bad = [f"{p.relative_to(ROOT)}:{i + 1}" for pkg in ("extract", "analysis") for p in _modules(pkg)
           if p != ROOT / "extract" / "engine" / "hooks.py"
           for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not bad, "use extract.engine.hooks.decoder_layers(model):\n" + "\n".join(bad)


def test_analysis_modules_load_without_torch():
    code = ("import importlib, pkgutil, sys, analysis\n"
            "for m in pkgutil.walk_packages(analysis.__path__, 'analysis.'):\n"
            "    importlib.import_module(m.name)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_every_command_is_in_the_readme():
    from extract.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "group")
    readme = (ROOT / "README.md").read_text()
    missing = []
    for name, p in sub.choices.items():
        subsub = [a for a in p._actions if getattr(a, "choices", None) and a.dest == "command"]
        commands = [f"{name} {c}" for c in subsub[0].choices] if subsub else [name]
        missing += [c for c in commands if f"dormant {c}" not in readme]
    assert not missing, f"commands missing from the README's command list: {missing}"


def test_maps_operations_are_package_data():
    """Every file of extract/maps/operations_data is matched by pyproject's package-data globs (so a
    non-editable install carries the MAPS operations), and the loader reads them from the package."""
    import tomllib

    from extract.maps import operations

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["extract.maps"]
    pkg = ROOT / "extract" / "maps"
    files = {p.relative_to(pkg) for p in (pkg / "operations_data").rglob("*") if p.is_file()}
    matched = {p.relative_to(pkg) for g in globs for p in pkg.glob(g) if p.is_file()}
    assert files and files == matched, f"not package data: {sorted(map(str, files - matched))}"
    assert operations.DATA_DIR == pkg / "operations_data"
