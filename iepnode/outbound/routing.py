"""Auto-routing: admin rules that send matching studies to a remote AE without clicks.

A rule matches a study by the calling AE that sent any of its instances, an
accession number prefix and a modality (empty conditions match anything). When
a matching study is *stable* (no new instance for ``stable_age`` seconds, as for
its DICOMDIR file-set) the housekeeping loop queues a send job for it; a study is
routed once per rule (:class:`~storage.models.RoutedStudy`), and only studies that
received instances after the rule was made are considered. Instances arriving
after a study was routed are not sent again by the rule.
"""

from __future__ import annotations

import logging
import re
import time

from iepnode.errors import InvalidRequest, NodeError, NotFound
from iepnode.outbound import sending
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.rules.identifiers import AE_TITLE
from storage.db import write_transaction
from storage.models import RouteRule, Study
from storage.queries import Conflict
from storage.queries import outbound as queries

log = logging.getLogger("iepnode.routing")

_CODE = re.compile(r"^[A-Za-z0-9 ._-]{0,16}$")
#: Studies looked at per rule and pass (the rest wait for the next pass).
BATCH = 100


def _checked(value: str, what: str, pattern: re.Pattern[str] = _CODE) -> str:
    value = value.strip()
    if value and not pattern.fullmatch(value):
        raise InvalidRequest(f"{what} {value!r}: up to 16 letters, digits, spaces, . _ -")
    return value


def add_rule(destination: str, actor: Actor, *, calling_ae: str = "",
             accession_prefix: str = "", modality: str = "") -> RouteRule:
    """Create a routing rule (audited).

    Raises
    ------
    InvalidRequest
        A malformed condition.
    UnknownDestination
        ``destination`` is not a registered send destination.
    """
    calling_ae = _checked(calling_ae, "calling AE", AE_TITLE) if calling_ae.strip() else ""
    accession_prefix = _checked(accession_prefix, "accession prefix")
    modality = _checked(modality, "modality").upper()
    ae = sending.destination_ae(destination)
    rule = queries.create_rule(calling_ae, accession_prefix, modality, ae.ae_title,
                               actor.name[:254])
    audit.record(audit.SECURITY_ALERT, "admin-change", actor,
                 detail=f"route-add {rule.id}: {describe(rule)}")
    return rule


def remove_rule(rule_id: int, actor: Actor) -> None:
    """Delete a routing rule (audited); jobs it queued go on.

    Raises
    ------
    NotFound
        No such rule.
    """
    rule = queries.rule_or_none(rule_id)
    if rule is None:
        raise NotFound(f"no routing rule {rule_id}")
    queries.delete_rule(rule)
    audit.record(audit.SECURITY_ALERT, "admin-change", actor,
                 detail=f"route-remove {rule_id}: {describe(rule)}")


def list_rules() -> list[RouteRule]:
    """Every routing rule, oldest first."""
    return queries.rules()


def describe(rule: RouteRule) -> str:
    """A rule in words: ``from PACS, accession ACC*, modality CT -> DEST``."""
    conditions = [f"from {rule.calling_ae}" if rule.calling_ae else "",
                  f"accession {rule.accession_prefix}*" if rule.accession_prefix else "",
                  f"modality {rule.modality}" if rule.modality else ""]
    return f"{', '.join(c for c in conditions if c) or 'every study'} -> {rule.destination}"


def _has_modality(modalities: str, modality: str) -> bool:
    return modality in (modalities or "").upper().split("\\")


def due_studies(rule: RouteRule, stable_age: float, now: float) -> list[Study]:
    """Stable studies the rule matches and has not routed yet."""
    studies = queries.unrouted_studies(rule, now - stable_age, BATCH)
    if rule.modality:
        studies = [s for s in studies if _has_modality(s.modalities, rule.modality)]
    return studies


def route_stable(stable_age: float, now: float | None = None) -> int:
    """Queue a send for every stable study a rule matches; return how many were queued."""
    now = time.time() if now is None else now
    queued = 0
    for rule in queries.enabled_rules():
        for study in due_studies(rule, stable_age, now):
            actor = Actor("system", f"routing rule {rule.id}")
            try:
                with write_transaction():
                    job = sending.queue_job([study.study_uid], rule.destination, actor,
                                            route_id=rule.id, now=now)
                    queries.note_routed(rule.id, study.study_uid, job.id, now)
                queued += 1
                log.info("routing rule %d (%s): study %s queued as send job %d", rule.id,
                         describe(rule), study.study_uid, job.id)
            except Conflict:
                continue  # another node sharing the database routed it just now
            except NodeError as exc:
                # Remember the study so that the failure is reported once, not every pass.
                with write_transaction():
                    queries.note_routed(rule.id, study.study_uid, None, now)
                log.error("routing rule %d: study %s not routed: %s", rule.id,
                          study.study_uid, exc)
                audit.record(audit.EXPORT, "dicom-send-queued", actor,
                             outcome=audit.SERIOUS_FAILURE, study_uid=study.study_uid,
                             detail=f"routing rule {rule.id} to {rule.destination}: {exc}")
    return queued
