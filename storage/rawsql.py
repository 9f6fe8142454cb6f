"""Hand-written SQL for hot paths, in the bound database's parameter style.

peewee builds a statement's SQL anew from its expression tree on every call
(~0.1-0.3 ms each); pages and C-STOREs that run the same few statements many
times a second use fixed SQL text instead. Statements are written with ``?``
placeholders and double-quoted identifiers, valid on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, TypeVar

import peewee

from storage.models import database_proxy

M = TypeVar("M", bound=peewee.Model)


@lru_cache(maxsize=512)
def _converted(sql: str, param: str) -> str:
    return sql if param == "?" else sql.replace("?", param)


def statement(sql: str) -> str:
    """Return ``sql`` (written with ``?`` placeholders) in the database's parameter style."""
    return _converted(sql, database_proxy.obj.param)


def placeholders(count: int) -> str:
    """``?, ?, ...`` for an ``IN (...)`` list of ``count`` values (at least one)."""
    return ", ".join("?" * max(count, 1))


def select_models(model: type[M], sql: str, params: Sequence[Any]) -> list[M]:
    """Run a ``SELECT`` of ``model``'s columns and return model instances."""
    return list(model.raw(statement(sql), *params))


def row_type(model: type[peewee.Model]) -> type[tuple[Any, ...]]:
    """A read-only named tuple with ``model``'s columns, by column name.

    Building a peewee model instance per row costs ~50 us for a wide table; a
    named tuple costs ~1 us. Foreign keys appear as their column (``recipient_id``),
    booleans as stored (0/1 on SQLite).
    """
    names = [f.column_name for f in model._meta.sorted_fields]
    return namedtuple(f"{model.__name__}Row", names)  # type: ignore[misc]


def columns(model: type[peewee.Model]) -> str:
    """``"col1", "col2", ...``: ``model``'s columns in :func:`row_type` order."""
    return ", ".join(f'"{f.column_name}"' for f in model._meta.sorted_fields)


def select_rows(kind: type[tuple[Any, ...]], sql: str, params: Sequence[Any]) -> list[Any]:
    """Run a ``SELECT`` of :func:`columns` and return ``kind`` (a :func:`row_type`) rows."""
    make = kind._make  # type: ignore[attr-defined]
    return [make(row) for row in execute(sql, params).fetchall()]


def execute(sql: str, params: Sequence[Any] = ()) -> Any:
    """Run one statement; return the cursor."""
    return database_proxy.obj.execute_sql(statement(sql), params)


def execute_many(sql: str, rows: Iterable[Sequence[Any]]) -> None:
    """Run one statement for each row of parameters (one ``executemany``)."""
    cursor = database_proxy.obj.cursor()
    cursor.executemany(statement(sql), list(rows))
