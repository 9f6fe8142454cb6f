"""Viewing queries: what a transaction's studies hold, reports, and DICOMweb tokens."""

from __future__ import annotations

from collections.abc import Sequence

from storage.models import DicomwebToken, Instance, Recipient, Series, Study, Transaction

# -- studies, series, instances -----------------------------------------------------------


def studies_in_order(study_uids: Sequence[str]) -> list[Study]:
    """The stored studies among ``study_uids``, by date, time, then row id."""
    return list(Study.select().where(Study.study_uid.in_(list(study_uids)))
                .order_by(Study.study_date, Study.study_time, Study.id))


def series_of_study(study_id: int) -> list[Series]:
    """Every series of the study with row id ``study_id`` (no particular order)."""
    return list(Series.select().where(Series.study == study_id))


def instance_summaries(series_id: int) -> list[Instance]:
    """SOP UID, instance number, store key and SOP class of every instance of a series."""
    return list(Instance.select(Instance.sop_uid, Instance.instance_number,
                                Instance.key, Instance.sop_class)
                .where(Instance.series == series_id))


def locate_instance(sop_uid: str, study_uids: Sequence[str]) -> tuple[str, str] | None:
    """``(store key, study UID)`` of the instance ``sop_uid`` in one of ``study_uids``."""
    return (Instance.select(Instance.key, Study.study_uid).join(Series).join(Study)
            .where((Instance.sop_uid == sop_uid) & (Study.study_uid.in_(list(study_uids))))
            .tuples().first())


def report_rows(study_uids: Sequence[str], sop_classes: Sequence[str],
                sop_uid: str | None = None) -> list[tuple[Instance, Series, Study]]:
    """``(instance, series, study)`` of the instances of ``sop_classes`` in ``study_uids``.

    Only the one with ``sop_uid`` when given; in study, series, instance row order.
    """
    query = (Instance.select(Instance, Series, Study).join(Series).join(Study)
             .where(Study.study_uid.in_(list(study_uids))
                    & Instance.sop_class.in_(list(sop_classes))))
    if sop_uid is not None:
        query = query.where(Instance.sop_uid == sop_uid)
    return [(instance, instance.series, instance.series.study)
            for instance in query.order_by(Study.id, Series.id, Instance.id)]


# -- DICOMweb tokens ----------------------------------------------------------------------


def recipient_transaction(public_id: str, recipient_id: int) -> Transaction | None:
    """The recipient's transaction ``public_id`` (recipient joined), or ``None``."""
    return (Transaction.select(Transaction, Recipient).join(Recipient)
            .where((Transaction.public_id == public_id)
                   & (Transaction.recipient == recipient_id)).get_or_none())


def create_token(**fields: object) -> DicomwebToken:
    """A new DICOMweb token row with ``fields`` (the model's column names)."""
    return DicomwebToken.create(**fields)


def revoke_live_tokens(now: float, *, recipient_id: int | None = None,
                       transaction_id: int | None = None, staff_id: int | None = None) -> int:
    """Revoke at ``now`` the tokens live then, of a recipient's transaction or of a staff member.

    Returns
    -------
    int
        How many were revoked.
    """
    where = DicomwebToken.revoked_at.is_null() & (DicomwebToken.expires_at > now)
    if recipient_id is not None:
        where = where & (DicomwebToken.recipient == recipient_id) & (
            DicomwebToken.transaction == transaction_id)
    else:
        where = where & (DicomwebToken.staff == staff_id)
    return DicomwebToken.update(revoked_at=now).where(where).execute()


def token_with_hash(token_hash: str) -> DicomwebToken | None:
    """The DICOMweb token row whose token hashes to ``token_hash``, or ``None``."""
    return DicomwebToken.get_or_none(DicomwebToken.token_hash == token_hash)


def delete_tokens_older_than(cutoff: float) -> int:
    """Delete tokens that expired or were revoked before ``cutoff``; how many."""
    return DicomwebToken.delete().where(
        (DicomwebToken.expires_at < cutoff) | (DicomwebToken.revoked_at < cutoff)).execute()
