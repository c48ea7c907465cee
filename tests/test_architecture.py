"""The house rules, checked on the code: packages meet only at their public faces, and the
recorder's wings import in one direction (tape <- serve, tape <- collect)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("recorder", "replay", "trainer_bridge")
#: Who may import whom (besides itself): data flows tape in, results out.
ALLOWED = {"recorder": set(), "trainer_bridge": {"recorder"}, "replay": {"recorder", "trainer_bridge"},
           "cli": {"recorder", "replay", "trainer_bridge"}}
WINGS = {"tape": set(), "serve": {"tape"}, "collect": {"tape"}}


def _sources() -> list[Path]:
    return [ROOT / "cli.py"] + sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _owner(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if rel.parts[0] in PACKAGES else rel.stem


def _absolute_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import, relative ones resolved against the file's package."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module, [a.name for a in node.names]))
    return out


def test_packages_import_each_other_only_through_their_public_faces() -> None:
    bad = []
    for path in _sources():
        owner = _owner(path)
        for line, module, names in _absolute_imports(path):
            top = module.split(".")[0]
            if top not in PACKAGES or top == owner:
                continue
            where = f"{path.relative_to(ROOT)}:{line}: {module}"
            if top not in ALLOWED[owner]:
                bad.append(f"{where} ({owner} may not import {top}: data flows tape in, results out)")
            elif module != top:
                bad.append(f"{where} (import from `{top}` itself, not from its modules)")
            else:
                public = set(importlib.import_module(top).__all__)
                bad += [f"{where} imports {n}, which is not in {top}.__all__" for n in names if n not in public]
    assert not bad, "imports past a package's public face:\n" + "\n".join(bad)


def test_recorder_wings_import_in_one_direction() -> None:
    bad = []
    for wing, allowed in WINGS.items():
        for path in sorted((ROOT / "recorder" / wing).rglob("*.py")):
            for line, module, _ in _absolute_imports(path):
                parts = module.split(".")
                if parts[0] == "recorder" and len(parts) > 1 and parts[1] in WINGS and parts[1] != wing \
                        and parts[1] not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not bad, "a wing of recorder imports one it must not:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_a_package_loads_no_server_or_model_code(package: str) -> None:
    import subprocess
    import sys

    code = (f"import sys, {package}; heavy = sorted(m for m in ('fastapi', 'uvicorn', 'transformers') "
            "if m in sys.modules); print(','.join(heavy))")
    got = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert got == "", f"importing {package} loaded {got}: keep those behind the first use of their names"
