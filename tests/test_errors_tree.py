"""The exception tree drawn in ``iepnode/errors.py`` is the whole tree, and true.

Every subclass of :class:`iepnode.errors.NodeError` defined anywhere in the project's
packages must be drawn in the module docstring, under its real parent, and nothing
drawn may be missing from the code: the drawing cannot go stale.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

import iepnode
import scp
import web
from iepnode import errors
from iepnode.errors import NodeError

#: A drawn class: tree characters, then the name (the root has none).
_DRAWN = re.compile(r"^(?P<lead>[ │├└─]*)(?P<name>[A-Z]\w+)\b")


def drawn_tree() -> dict[str, str | None]:
    """Map each class drawn in the ``errors`` docstring to its drawn parent."""
    doc = errors.__doc__ or ""
    body = doc.split("::", 1)[1]
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for line in body.splitlines():
        match = _DRAWN.match(line)
        if match is None:
            continue
        lead = match["lead"]
        if not stack:
            if match["name"] != "NodeError":
                continue
            depth = 0
        elif "├── " in lead or "└── " in lead:
            # four columns a level ("│   ", "├── "), after the root's indent
            depth = len(lead) // 4 - 1
        else:
            continue  # a continuation line of a description
        del stack[depth:]
        parents[match["name"]] = stack[-1] if stack else None
        stack.append(match["name"])
    return parents


def project_subclasses() -> set[type[NodeError]]:
    """Every ``NodeError`` subclass defined in ``iepnode``, ``web`` or ``scp``."""
    for package in (iepnode, web, scp):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    found: set[type[NodeError]] = set()
    todo = [NodeError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.split(".")[0] in ("iepnode", "web", "scp"):
                found.add(sub)
            todo.append(sub)
    return found


def test_the_drawing_parses() -> None:
    tree = drawn_tree()
    assert tree["NodeError"] is None
    assert tree["DatasetMismatch"] == "BadDataset"
    assert tree["PasscodeRejected"] == "LoginRefused"
    assert len(tree) > 20


def test_every_node_error_is_drawn_under_its_parent() -> None:
    tree = drawn_tree()
    classes = project_subclasses()
    missing = sorted(f"{c.__module__}.{c.__name__}" for c in classes if c.__name__ not in tree)
    assert missing == [], f"draw these in iepnode/errors.py: {missing}"
    for cls in classes:
        (parent,) = [b for b in cls.__bases__ if issubclass(b, NodeError)]
        assert tree[cls.__name__] == parent.__name__, cls


def test_nothing_drawn_is_missing_from_the_code() -> None:
    names = {c.__name__ for c in project_subclasses()} | {"NodeError"}
    assert sorted(set(drawn_tree()) - names) == []


def test_classes_drawn_without_a_module_live_in_errors() -> None:
    doc = (errors.__doc__ or "").split("::", 1)[1]
    for cls in project_subclasses():
        if cls.__module__ != "iepnode.errors":
            assert cls.__module__ in doc, f"name {cls.__module__} beside {cls.__name__}"
