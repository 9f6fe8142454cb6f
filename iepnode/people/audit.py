"""Audit trail: who did what, when, from where, to which patient/study.

Events are shaped after DICOM PS3.15 A.5 audit messages: an EventID code from
DCM, an action, an outcome indicator (0 success, 4 minor failure, 8 serious
failure), the active participant and the participant objects (patient, study).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from storage import hot_queries
from storage.models import AuditEvent, StaffUser
from storage.queries import people as queries

#: EventID codes (DCM) used by the node, with their meanings: the only place they are
#: written (``event[0]`` is stored as the event code, ``event[1]`` as its name).
USER_AUTHENTICATION = ("110114", "User Authentication")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
EXPORT = ("110106", "Export")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
SECURITY_ALERT = ("110113", "Security Alert")
PATIENT_RECORD = ("110110", "Patient Record")
QUERY = ("110112", "Query")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8

#: The action of a change to the node's set-up (remote AEs, staff users, own TOTP or
#: password, an admin's resets), recorded as a :data:`SECURITY_ALERT`.
ADMIN_CHANGE = "admin-change"


@dataclass(frozen=True)
class Actor:
    """Who acted: ``staff``, ``recipient``, ``cli`` or ``system``, and from where."""

    kind: str
    name: str
    source_ip: str = ""


def actor_of(who: StaffUser | Actor, source_ip: str = "") -> Actor:
    """The actor of a staff user acting from ``source_ip``; an :class:`Actor` as it is.

    Services that anyone allowed may call (the web pages as a staff user, the CLI as
    the operating-system user, ``Actor("cli", ...)``) take either.
    """
    if isinstance(who, Actor):
        return who
    return Actor("staff", who.username, source_ip)


def record(
    event: tuple[str, str],
    action: str,
    actor: Actor,
    *,
    outcome: int = SUCCESS,
    patient_id: str = "",
    study_uid: str = "",
    transaction: str = "",
    detail: str = "",
    now: float | None = None,
) -> AuditEvent:
    """Store one audit event.

    Parameters
    ----------
    event : tuple of (str, str)
        EventID code and meaning, e.g. :data:`USER_AUTHENTICATION`.
    action : str
        What happened, e.g. ``login``, ``login-failed``, ``decline``, ``transfer-create``.
    actor : Actor
        The active participant.
    outcome : int, optional
        0, 4 or 8 (PS3.15 EventOutcomeIndicator).
    patient_id, study_uid, transaction : str, optional
        The participant objects concerned.
    detail : str, optional
        Free text; never passcodes, tokens or message bodies.
    now : float, optional
        Event time (default: the current time).
    """
    return queries.add_audit_event(
        at=time.time() if now is None else now,
        event_code=event[0],
        event_name=event[1],
        action=action,
        outcome=outcome,
        actor_kind=actor.kind,
        actor=actor.name[:254],
        source_ip=actor.source_ip[:64],
        patient_id=patient_id[:64],
        study_uid=study_uid[:64],
        transaction_public_id=transaction[:16],
        detail=detail,
    )


def record_many(
    event: tuple[str, str],
    action: str,
    actor: Actor,
    items: list[tuple[str, str, str]],
    *,
    outcome: int = SUCCESS,
    now: float | None = None,
) -> None:
    """Store one event per ``(patient_id, transaction, detail)`` in one statement.

    For pages that show many transactions at once (the dashboard); call it inside
    a write transaction.
    """
    if not items:
        return
    at = time.time() if now is None else now
    hot_queries.insert_audit_events([
        (at, event[0], event[1], action, outcome, actor.kind, actor.name[:254],
         actor.source_ip[:64], patient_id[:64], "", transaction[:16], detail)
        for patient_id, transaction, detail in items
    ])


def record_export(
    action: str,
    actor: Actor,
    *,
    media: str,
    study_uids: tuple[str, ...] | list[str],
    patient_id: str = "",
    transaction: str = "",
    outcome: int = SUCCESS,
    detail: str = "",
) -> AuditEvent:
    """Store an Export event (DCM 110106, PS3.15 A.5.3.6): studies left the node on media.

    The PS3.15 message names the user (the requestor), the Destination Media (here
    a zip file, e.g. ``"zip IEP12345678.zip"``), the patient and every study; the
    studies go into ``detail`` as ``studies=UID,UID`` (the first also into
    ``study_uid``, which holds one UID).

    Parameters
    ----------
    action : str
        e.g. ``download``, ``download-protected``, ``export``.
    actor : Actor
        Who exported (recipient, staff or cli).
    media : str
        The destination media: what was written and under which name.
    study_uids : sequence of str
        The studies exported.
    patient_id, transaction : str, optional
        The participant objects.
    outcome : int, optional
        0 success, 4 when the transfer was interrupted, 8 when it failed.
    detail : str, optional
        More facts (bytes sent, range).
    """
    text = "; ".join(x for x in (f"media={media}", f"studies={','.join(study_uids)}", detail)
                     if x)
    return record(EXPORT, action, actor, outcome=outcome, patient_id=patient_id,
                  study_uid=study_uids[0] if study_uids else "", transaction=transaction,
                  detail=text)


def events_for_transaction(public_id: str) -> list[AuditEvent]:
    """Return a transaction's audit trail, oldest first."""
    return queries.audit_events_of_transaction(public_id)
