"""The audit log as staff page through it: filtered, newest first."""

from __future__ import annotations

import math
from dataclasses import dataclass

from iepnode.dicomtext import typed_text
from storage.models import AuditEvent
from storage.queries import people as queries

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
        actor = typed_text(actor, 254) if actor.strip() else ""
        action = action.strip()[:32]
        patient = patient.strip()[:64]
        total = queries.count_audit_events(actor, action, patient)
        pages = max(1, math.ceil(total / per_page))
        page = min(max(1, page), pages)
        events = queries.audit_events_page(actor, action, patient, page, per_page)
        actions = queries.audit_actions()
        return AuditPage(events, page, pages, total, actions)

