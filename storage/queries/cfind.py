"""Index queries of C-FIND / C-MOVE / C-GET and QIDO-RS: match conditions and SELECTs.

:mod:`iepnode.archive.query` decides what an identifier means (which keys, which
matching, what is refused); this module says how that is asked of the database:
the wildcard condition of each backend, the modalities sub-query, and the SELECT
joined up from the query level's table.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import peewee

from storage.db import is_sqlite
from storage.models import Instance, Patient, Series, Study, database_proxy

#: A column of the index, a match condition, and a SELECT (for annotations).
Column = peewee.Field
Condition = peewee.Expression
RowSelect = peewee.ModelSelect

#: The tables of the levels PATIENT, STUDY, SERIES, IMAGE (by level number).
TABLES = (Patient, Study, Series, Instance)
_ESCAPE = "!"
_HIGHEST = "\U0010ffff"


def _like_pattern(value: str) -> str:
    out = []
    for ch in value:
        if ch in (_ESCAPE, "%", "_"):
            out.append(_ESCAPE + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def wildcard_condition(column: Column, value: str) -> Condition:
    """``column`` matches the DICOM wildcard ``value`` (``*``, ``?``), case-sensitively.

    On SQLite: ``GLOB``, with a range on the literal prefix so that the index is
    used. On PostgreSQL: ``LIKE`` with an escape character.
    """
    prefix = value[: min((value.find(c) for c in "*?" if c in value), default=len(value))]
    if not is_sqlite(database_proxy.obj):
        # No prefix range on PostgreSQL: under most collations (en_US...) string order is
        # not code-point order and ``prefix + U+10FFFF`` is no upper bound; under "C" the
        # planner derives the same range from the LIKE itself.
        return peewee.NodeList(
            (column, peewee.SQL("LIKE"), _like_pattern(value), peewee.SQL(f"ESCAPE '{_ESCAPE}'"))
        )
    # SQLite's LIKE ignores ASCII case; GLOB is case-sensitive, as LIKE is elsewhere.
    # DICOM's "*" and "?" are GLOB's own; "[" is the only other metacharacter.
    condition = peewee.NodeList((column, peewee.SQL("GLOB"), value.replace("[", "[[]")))
    if prefix:
        condition = (column >= prefix) & (column < prefix + _HIGHEST) & condition
    return condition


def modalities_condition(modalities: list[str]) -> Condition:
    """The study has a series of one of ``modalities``."""
    return Study.id.in_(Series.select(Series.study).where(Series.modality.in_(modalities)))


def select_rows(level: int, conditions: Sequence[Condition], *,
                columns: list[Any] | None = None) -> RowSelect:
    """The SELECT of ``columns`` (default: every table's) over the tables down to ``level``.

    Joined upwards from the level's table (Instance -> Series -> Study -> Patient),
    with every one of ``conditions``.
    """
    tables = TABLES[: level + 1]
    target = tables[-1]
    selected = columns if columns is not None else list(tables)
    select = target.select(*selected)
    for child, parent in zip(reversed(tables[1:]), reversed(tables[:-1]), strict=True):
        select = select.join(parent, on=(getattr(child, parent.__name__.lower()) == parent.id))
    for condition in conditions:
        select = select.where(condition)
    return select


def iter_rows(level: int, conditions: Sequence[Condition],
              columns: list[Any]) -> Iterator[tuple]:
    """The matching rows' ``columns`` as tuples (default: the level table's id), streamed."""
    select = select_rows(level, conditions, columns=columns or [TABLES[level].id]).tuples()
    yield from select.iterator()


def iter_instance_files(image_level: int,
                        conditions: Sequence[Condition]) -> Iterator[tuple[str, str, str, str]]:
    """``(file key, SOP class, SOP instance UID, transfer syntax)`` of the matching instances.

    ``image_level`` is the IMAGE level's number; in series, then instance row order.
    """
    select = select_rows(
        image_level, conditions,
        columns=[Instance.key, Instance.sop_class, Instance.sop_uid, Instance.transfer_syntax],
    ).order_by(Instance.series, Instance.id)
    yield from select.tuples().iterator()
