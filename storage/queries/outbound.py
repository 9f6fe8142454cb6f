"""Outbound queries: routing rules, the studies they route, and recipient sends."""

from __future__ import annotations

import time

import peewee

from storage.models import Instance, RoutedStudy, RouteRule, SendJob, Series, Study, Transaction

# -- routing rules ------------------------------------------------------------------------


def create_rule(calling_ae: str, accession_prefix: str, modality: str, destination: str,
                created_by: str) -> RouteRule:
    """A new routing rule, created now."""
    return RouteRule.create(calling_ae=calling_ae, accession_prefix=accession_prefix,
                            modality=modality, destination=destination,
                            created_by=created_by, created_at=time.time())


def rule_or_none(rule_id: int) -> RouteRule | None:
    """The routing rule with id ``rule_id``, or ``None``."""
    return RouteRule.get_or_none(RouteRule.id == rule_id)


def delete_rule(rule: RouteRule) -> None:
    """Delete a routing rule row."""
    rule.delete_instance()


def rules() -> list[RouteRule]:
    """Every routing rule, oldest first."""
    return list(RouteRule.select().order_by(RouteRule.id))


def enabled_rules() -> peewee.ModelSelect:
    """The enabled routing rules (a query, iterated lazily)."""
    return RouteRule.select().where(RouteRule.enabled == True)  # noqa: E712


def _exists(query: peewee.SelectQuery) -> peewee.Expression:
    """``EXISTS (query)`` as a peewee expression."""
    return peewee.fn.EXISTS(query)


def unrouted_studies(rule: RouteRule, received_before: float, limit: int) -> list[Study]:
    """Studies ``rule`` has not routed, last received in ``[rule.created_at, received_before]``.

    Only those whose accession starts with the rule's prefix and (if the rule names
    a calling AE) with an instance sent by it; oldest last-received first, at most
    ``limit``. The modality condition is left to the caller.
    """
    routed = RoutedStudy.select(RoutedStudy.id).where(
        (RoutedStudy.rule == rule.id) & (RoutedStudy.study_uid == Study.study_uid))
    query = Study.select().where(
        (Study.last_received <= received_before) & (Study.last_received >= rule.created_at)
        & ~_exists(routed))
    if rule.accession_prefix:
        query = query.where(Study.accession.startswith(rule.accession_prefix))
    if rule.calling_ae:
        sent_by = (Instance.select(Instance.id).join(Series)
                   .where((Series.study == Study.id) & (Instance.source_ae == rule.calling_ae)))
        query = query.where(_exists(sent_by))
    return list(query.order_by(Study.last_received).limit(limit))


def note_routed(rule_id: int, study_uid: str, job_id: int | None, now: float) -> None:
    """Remember that ``rule_id`` routed ``study_uid`` (as send job ``job_id``, or failed).

    Raises
    ------
    storage.queries.Conflict
        The rule routed this study already (e.g. another node sharing the database).
    """
    RoutedStudy.create(rule=rule_id, study_uid=study_uid, job_id=job_id, routed_at=now)


# -- recipient sends ----------------------------------------------------------------------


def live_transactions_of(recipient_id: int, public_ids: list[str], now: float,
                         ) -> list[Transaction]:
    """Id and public ID of the recipient's unpurged, unexpired transactions in ``public_ids``."""
    return list(Transaction.select(Transaction.id, Transaction.public_id).where(
        (Transaction.recipient == recipient_id) & Transaction.public_id.in_(public_ids)
        & Transaction.purged_at.is_null() & (Transaction.expires_at > now)))


def recipient_send_jobs(email: str, public_ids: list[str], limit: int = 100) -> list[SendJob]:
    """The newest ``limit`` send jobs the recipient ``email`` asked for in these transactions."""
    return list(SendJob.select().where(SendJob.transaction_public_id.in_(public_ids)
                                       & (SendJob.requester_kind == "recipient")
                                       & (SendJob.requested_by == email))
                .order_by(SendJob.id.desc()).limit(limit))
