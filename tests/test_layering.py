"""The layering contract: what the edges (web/, scp/) may import.

``web`` and ``scp`` reach the index and the file store only through the domain
(``iepnode``): they never import ``storage`` or ``peewee``, and never each other.
Every module is read with :mod:`ast` (imports inside functions count too, and so do
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name).
Nor do they reach for the file store (an attribute named ``store``, e.g.
``node.store.path``): stored files are read by the domain, which hands out bytes.

Inside ``iepnode`` the queries belong to ``storage/queries``: a module that imports
peewee or calls a query verb on a model class (``Study.select``, ``Recipient.update``
...) or ``.save()`` on a row must be on :data:`QUERYING_MODULES`, the list of modules
not moved yet, and that list only shrinks. Transaction boundaries
(``write_transaction``) stay in the domain: they say what commits together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The edges: they reach the index and the file store only through the domain.
EDGES = ("scp", "web")
#: Third-party packages an edge must not import (the database stays behind storage/).
EDGE_FORBIDDEN = {"peewee", "playhouse"}


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


def store_attributes(package: str) -> list[str]:
    """Every ``<something>.store`` in the modules of ``package`` (``file:line``)."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "store":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .store")
    return found


@pytest.mark.parametrize("package", EDGES)
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


# -- the whole contract: every layer, not only the edges ------------------------------------

#: The project's packages, innermost first.
LAYERS = ("config", "storage", "iepnode", "web", "scp")
#: Layer -> the project packages it may import (besides itself).
MAY_IMPORT = {
    "config": set(),
    "storage": {"config"},
    "iepnode": {"config", "storage"},
    "web": {"config", "iepnode"},
    "scp": {"config", "iepnode"},
}
#: The composition root: the only modules that import web/ and scp/ (and build things).
COMPOSITION_ROOT = ("iepnode.cli", "iepnode.serve", "iepnode.wiring")


def _in_root(module: str) -> bool:
    return any(module == root or module.startswith(root + ".") for root in COMPOSITION_ROOT)


def layer_violations(layer: str) -> list[str]:
    """Imports of ``layer``'s modules that break :data:`MAY_IMPORT` (``file:line: name``).

    The composition root may also import web and scp; web and scp may not import the
    composition root (they are handed what they need), nor peewee.
    """
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        allowed = MAY_IMPORT[layer] | {layer}
        if _in_root(module):
            allowed |= {"web", "scp"}
        source = path.read_text(encoding="utf-8")
        for line, name in imported_modules(source, module) + _names_imported_from(source):
            top = name.split(".")[0]
            if (top in LAYERS and top not in allowed) or (
                    layer in EDGES and (_in_root(name) or top in EDGE_FORBIDDEN)):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
    return sorted(set(bad))


def _names_imported_from(source: str) -> list[tuple[int, str]]:
    """``(line, "package.name")`` of each ``from package import name`` (a submodule?)."""
    return [(node.lineno, f"{node.module}.{alias.name}")
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom) and node.module and not node.level
            for alias in node.names]


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    assert list((ROOT / layer).rglob("*.py")), f"no modules found under {layer}/"
    assert layer_violations(layer) == []


def test_the_layer_check_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A domain module importing the web app, web importing the root, peewee or storage."""
    for layer in ("iepnode", "web"):
        (tmp_path / layer).mkdir()
    (tmp_path / "iepnode" / "sharing.py").write_text("from web.app import create_app\n")
    (tmp_path / "iepnode" / "wiring.py").write_text("import web.app\nimport scp.server\n")
    (tmp_path / "web" / "views.py").write_text(
        "def f():\n    from iepnode import wiring\nimport peewee\nfrom storage import db\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert layer_violations("iepnode") == ["iepnode/sharing.py:1: imports web.app",
                                           "iepnode/sharing.py:1: imports web.app.create_app"]
    assert layer_violations("web") == ["web/views.py:2: imports iepnode.wiring",
                                       "web/views.py:3: imports peewee",
                                       "web/views.py:4: imports storage",
                                       "web/views.py:4: imports storage.db"]


#: A domain module past this many lines holds more than one job: split it.
MAX_DOMAIN_MODULE_LINES = 500


def test_no_domain_module_is_over_the_size_budget() -> None:
    """Every module of iepnode/ is small enough to read in one sitting (issue 14)."""
    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in (ROOT / "iepnode").rglob("*.py")}
    assert len(sizes) > 60
    assert {name: n for name, n in sizes.items() if n > MAX_DOMAIN_MODULE_LINES} == {}

# -- the storage boundary: queries live in storage/ -------------------------------------

#: Query verbs of a peewee model class (``Model.select(...)``) and of an instance.
MODEL_VERBS = {"select", "get", "get_or_none", "get_by_id", "get_or_create", "update",
               "insert", "insert_many", "insert_from", "replace", "replace_many", "delete",
               "delete_by_id", "create", "bulk_create", "bulk_update", "raw"}
INSTANCE_VERBS = {"save", "delete_instance"}

#: Modules of ``iepnode`` that still run queries themselves (issue 14: not yet moved
#: into ``storage/queries``). This list may only shrink: a module that no longer
#: queries must leave it, and a module not on it must not start.
QUERYING_MODULES = {
    "iepnode.cli.archive", "iepnode.cli.people", "iepnode.services",
    "iepnode.outbound.sending", "iepnode.outbound.send_runner",
    "iepnode.outbound.transaction_sends",
    "iepnode.sharing.package", "iepnode.sharing.package_plan",
    "iepnode.uploads.review", "iepnode.uploads.release", "iepnode.uploads.listing",
    "iepnode.uploads.housekeeping", "iepnode.uploads.staging",
    "iepnode.viewing.attachments", "iepnode.viewing.attaching",
    "iepnode.viewing.attachment_filing", "iepnode.viewing.dicomweb",
}


def model_names(tree: ast.AST) -> set[str]:
    """Names the module binds by importing from ``storage.models`` (its model classes)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "storage.models":
            names |= {alias.asname or alias.name for alias in node.names}
    return names


def queries_in(source: str, module: str) -> list[str]:
    """Every peewee import and model query of a module's source (``line: what``).

    A query is ``<model>.<verb>(...)`` on a class imported from ``storage.models``
    (``<verb>`` in :data:`MODEL_VERBS`), or ``<anything>.save()`` /
    ``.delete_instance()`` on an instance.
    """
    tree = ast.parse(source)
    models = model_names(tree)
    found = [f"{line}: imports {name}" for line, name in imported_modules(source, module)
             if name.split(".")[0] == "peewee"]
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner, verb = node.func.value, node.func.attr
        if isinstance(owner, ast.Name) and owner.id in models and verb in MODEL_VERBS:
            found.append(f"{node.lineno}: {owner.id}.{verb}")
        elif verb in INSTANCE_VERBS and not node.args and not node.keywords:
            found.append(f"{node.lineno}: .{verb}()")
    return sorted(found)


def querying_modules() -> dict[str, list[str]]:
    """Module of ``iepnode`` -> the queries it runs itself (modules with none left out)."""
    found = {}
    for path in sorted((ROOT / "iepnode").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if hits := queries_in(path.read_text(encoding="utf-8"), module):
            found[module] = hits
    return found


def test_new_queries_go_into_storage() -> None:
    found = querying_modules()
    new = {module: hits for module, hits in found.items() if module not in QUERYING_MODULES}
    assert new == {}, "queries belong in storage/queries (or add a storage function)"


def test_the_allow_list_of_querying_modules_only_shrinks() -> None:
    done = sorted(QUERYING_MODULES - set(querying_modules()))
    assert done == [], "these modules run no queries any more: take them off QUERYING_MODULES"


def test_the_query_check_sees_model_verbs_and_peewee() -> None:
    source = """
import peewee
from storage.models import Recipient as R, Study
from storage import queries
def f(row, image):
    R.update(locked_at=None).where(R.id == 1).execute()
    Study.get_or_none(Study.study_uid == "1")
    row.save()
    image.save("out.png")
    queries.recipient_by_id(1)
"""
    assert queries_in(source, "iepnode.x") == sorted(
        ["2: imports peewee", "6: R.update", "7: Study.get_or_none", "8: .save()"])
