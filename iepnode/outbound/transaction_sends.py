"""Sends by the recipient of a transaction: the send destinations staff allow per transaction.

A recipient may send the studies of a transaction to the remote AEs staff chose for it
(each a registered send destination, :func:`iepnode.outbound.sending.destination_ae`).
"""

from __future__ import annotations

from collections.abc import Sequence

from iepnode.outbound.sending import destination_ae
from storage.db import write_transaction
from storage.models import RemoteAE, TransactionSendAE


def transaction_send_aes(transaction_id: int) -> list[str]:
    """The AE titles the recipient of a transaction may send its studies to."""
    return [t for (t,) in TransactionSendAE.select(TransactionSendAE.ae_title)
            .where(TransactionSendAE.transaction == transaction_id)
            .order_by(TransactionSendAE.ae_title).tuples()]


def set_transaction_send_aes(transaction_id: int, ae_titles: Sequence[str]) -> list[str]:
    """Let the recipient of a transaction send to exactly ``ae_titles`` (none: not at all).

    Raises
    ------
    UnknownDestination
        A title that is not a registered send destination.
    """
    titles = sorted({t.strip() for t in ae_titles if t.strip()})
    for title in titles:
        destination_ae(title)
    with write_transaction():
        TransactionSendAE.delete().where(
            TransactionSendAE.transaction == transaction_id).execute()
        if titles:
            TransactionSendAE.insert_many(
                [(transaction_id, t) for t in titles],
                fields=[TransactionSendAE.transaction, TransactionSendAE.ae_title]).execute()
    return titles


def send_options(transaction_ids: Sequence[int]) -> dict[int, list[str]]:
    """For each transaction, the send destinations its recipient may use now."""
    if not transaction_ids:
        return {}
    rows = (TransactionSendAE.select(TransactionSendAE.transaction, TransactionSendAE.ae_title)
            .join(RemoteAE, on=(TransactionSendAE.ae_title == RemoteAE.ae_title))
            .where(TransactionSendAE.transaction.in_(list(transaction_ids))
                   & (RemoteAE.send_to == True))  # noqa: E712
            .order_by(TransactionSendAE.ae_title).tuples())
    options: dict[int, list[str]] = {}
    for transaction_id, title in rows:
        options.setdefault(transaction_id, []).append(title)
    return options
