"""Bookkeeping never imports torch: tandem/scheduler and tandem/kv_cache, and every tandem
module they import (followed transitively), are scanned with `ast`, without importing them.

Parent packages' `__init__.py` files are not followed: importing `tandem.request` runs
`tandem/__init__.py` at runtime, but that is the top package's choice, not a dependency of
the bookkeeping code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCH_FREE_PACKAGES = ["tandem/scheduler", "tandem/kv_cache"]
FORBIDDEN = {"torch", "triton"}


def module_file(name: str) -> Path | None:
    """The file of a tandem module, or None if `name` is not one (e.g. a class name)."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (anywhere in the file)."""
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # maybe submodules
    return names


def torch_free_files() -> list[Path]:
    files = [p for pkg in TORCH_FREE_PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))]
    assert files, "nothing to scan"
    return files


@pytest.mark.parametrize("start", torch_free_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_bookkeeping_never_imports_torch(start: Path):
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.relative_to(ROOT)} imports {name}"
            if top == "tandem" and (f := module_file(name)) is not None:
                todo.append(f)


def test_the_scanner_sees_nested_and_relative_imports():
    source = "import os\ndef f():\n    from torch import nn\nfrom .block_pool import BlockPool\n"
    names = imports_in(source, "tandem.kv_cache")
    assert {"os", "torch", "tandem.kv_cache.block_pool"} <= names
    assert imports_in("from .. import request\n", "tandem.kv_cache") >= {"tandem.request"}
