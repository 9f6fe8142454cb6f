"""Download queries (sharing area): cached CRC-32s, protected-copy build leases, contents.

:func:`claim_build` is the atomic limit "one build of a protected copy at a time":
one conditional ``UPDATE`` whose row count says whether this caller won.
"""

from __future__ import annotations

from collections.abc import Sequence

import peewee

from storage.db import write_transaction
from storage.models import (
    Instance,
    InstanceChecksum,
    ProtectedCopyBuild,
    Series,
    Study,
    TransactionStudy,
)

# -- cached checksums ---------------------------------------------------------------------


def cached_crcs(keys: Sequence[str]) -> dict[str, int]:
    """The cached CRC-32 of each of ``keys`` (one ``IN`` list) that has one."""
    query = InstanceChecksum.select(InstanceChecksum.instance, InstanceChecksum.crc32).where(
        InstanceChecksum.instance.in_(list(keys)))
    return {row[0]: int(row[1]) for row in query.tuples()}


def cache_crcs(rows: list[dict[str, object]]) -> bool:
    """Cache ``{"instance": key, "crc32": crc}`` rows in one write; ``False``: a key is gone.

    Rows already cached are left alone (``ON CONFLICT DO NOTHING``); an instance
    deleted meanwhile fails the whole insert (foreign key), which is then rolled back.
    """
    try:
        with write_transaction():
            InstanceChecksum.insert_many(rows).on_conflict_ignore().execute()
    except peewee.IntegrityError:
        return False
    return True


def instance_keys_of_study(study_uid: str) -> list[str]:
    """The file-store keys of every instance of a study."""
    return [row[0] for row in Instance.select(Instance.key).join(Series).join(Study)
            .where(Study.study_uid == study_uid).tuples()]


# -- what a package holds -----------------------------------------------------------------


def study_uids_of(transaction_id: int) -> tuple[str, ...]:
    """The study UIDs of a transaction, in the order they were shared."""
    return tuple(ts.study_uid for ts in TransactionStudy.select(TransactionStudy.study_uid)
                 .where(TransactionStudy.transaction == transaction_id)
                 .order_by(TransactionStudy.id))


# -- protected-copy build leases ----------------------------------------------------------


def _build_of(recipient_id: int, transaction_id: int, owner: str) -> peewee.Expression:
    return ((ProtectedCopyBuild.recipient == recipient_id)
            & (ProtectedCopyBuild.transaction == transaction_id)
            & (ProtectedCopyBuild.owner == owner))


def claim_build(recipient_id: int, transaction_id: int, owner: str, now: float,
                lease_until: float) -> bool:
    """Make the pair's build ``building`` for ``owner`` unless a live lease holds it.

    The row is created if missing; then one conditional ``UPDATE`` (in the same
    write transaction) wins only where the state is not ``building`` or the lease
    ended before ``now``.

    Returns
    -------
    bool
        Whether this caller won the build.
    """
    builds = ProtectedCopyBuild
    with write_transaction():
        builds.insert(recipient=recipient_id, transaction=transaction_id, state="idle",
                      lease_until=0.0, owner="").on_conflict_ignore().execute()
        won = builds.update(state="building", lease_until=lease_until, owner=owner).where(
            (builds.recipient == recipient_id) & (builds.transaction == transaction_id)
            & ((builds.state != "building") | (builds.lease_until < now))).execute()
    return bool(won)


def renew_build(recipient_id: int, transaction_id: int, owner: str, lease_until: float) -> None:
    """Extend ``owner``'s build lease of the pair to ``lease_until``."""
    with write_transaction():
        ProtectedCopyBuild.update(lease_until=lease_until).where(
            _build_of(recipient_id, transaction_id, owner)).execute()


def release_build(recipient_id: int, transaction_id: int, owner: str) -> None:
    """End ``owner``'s build of the pair: it is ``idle`` again."""
    with write_transaction():
        ProtectedCopyBuild.update(state="idle", lease_until=0.0, owner="").where(
            _build_of(recipient_id, transaction_id, owner)).execute()
