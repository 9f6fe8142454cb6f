"""The layering contract: what the edges (web/, scp/) may import.

``web`` and ``scp`` reach the index and the file store only through the domain
(``iepnode``): they never import ``storage`` or ``peewee``, and never each other.
Every module is read with :mod:`ast` (imports inside functions count too, and so do
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name).
Nor do they reach for the file store (an attribute named ``store``, e.g.
``node.store.path``): stored files are read by the domain, which hands out bytes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Edge package -> top-level packages it must not import.
FORBIDDEN = {
    "web": {"storage", "peewee", "scp"},
    "scp": {"storage", "peewee", "web"},
}


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every module the source of ``module`` imports.

    Relative imports are resolved against ``module``'s package.
    """
    found: list[tuple[int, str]] = []
    package = module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id == "__import__"))):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(package: str) -> list[str]:
    """Forbidden imports of every module of ``package`` (``file:line: name``)."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for line, name in imported_modules(path.read_text(encoding="utf-8"), module):
            if name.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_edges_import_neither_storage_nor_peewee_nor_each_other(package: str) -> None:
    assert list((ROOT / package).rglob("*.py")), f"no modules found under {package}/"
    assert violations(package) == []


def store_attributes(package: str) -> list[str]:
    """Every ``<something>.store`` in the modules of ``package`` (``file:line``)."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "store":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .store")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_edges_never_reach_for_the_file_store(package: str) -> None:
    assert store_attributes(package) == []


def test_the_check_sees_every_form_of_import() -> None:
    source = """
import peewee
import storage.models as m
from storage import db
from scp.handlers import event_handlers
from . import common
from ..storage import models
def late():
    from storage.filestore import FileStore
    importlib.import_module("storage.index")
    __import__("peewee")
"""
    names = sorted(name for _, name in imported_modules(source, "web.download"))
    assert names == sorted(["peewee", "storage.models", "storage", "scp.handlers", "web",
                            "storage", "storage.filestore", "storage.index", "peewee"])
