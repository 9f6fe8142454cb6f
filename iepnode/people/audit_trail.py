"""The audit log as staff page through it: filtered, newest first."""

from __future__ import annotations

import math
from dataclasses import dataclass

from iepnode.dicomtext import typed_text
from storage.models import AuditEvent

AUDIT_PAGE_SIZE = 50


@dataclass(frozen=True)
class AuditPage:
    """One page of the audit log, newest first."""

    events: list[AuditEvent]
    page: int
    pages: int
    total: int
    actions: list[str]


class AuditTrail:
    """Pages of the audit log for the staff pages (no dependencies: it reads the index)."""

    def audit_log(self, actor: str = "", action: str = "", patient: str = "",
                  page: int = 1, per_page: int = AUDIT_PAGE_SIZE) -> AuditPage:
        """One page of the audit log, newest first.

        ``actor`` matches part of the actor's name (case-insensitive), ``action``
        the action exactly, ``patient`` the patient ID exactly.
        """
        query = AuditEvent.select()
        if actor.strip():
            query = query.where(AuditEvent.actor.contains(typed_text(actor, 254)))
        if action.strip():
            query = query.where(AuditEvent.action == action.strip()[:32])
        if patient.strip():
            query = query.where(AuditEvent.patient_id == patient.strip()[:64])
        total = query.count()
        pages = max(1, math.ceil(total / per_page))
        page = min(max(1, page), pages)
        events = list(query.order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
                      .paginate(page, per_page))
        actions = [a for (a,) in AuditEvent.select(AuditEvent.action).distinct()
                   .order_by(AuditEvent.action).tuples()]
        return AuditPage(events, page, pages, total, actions)

