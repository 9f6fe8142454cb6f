"""Who may use DICOMweb: scopes, short-lived bearer tokens and viewer links.

Scopes
    A request acts in a :class:`Scope`: a recipient's scope holds the studies of one
    of their transactions, and only while its package may be downloaded (declined,
    expired or purged: :class:`~iepnode.errors.Gone`, as for the zip); staff scopes
    hold every study (or one transaction's studies under its base URL). A study,
    series or instance outside the scope is :class:`~iepnode.errors.NotFound`, the
    same as one that does not exist.

Tokens
    Viewers hosted elsewhere (OHIF, Weasis) cannot use the session cookie, so a
    recipient or staff member can ask for a random bearer token valid for
    :data:`TOKEN_TTL` seconds (256 bits; only its SHA-256 is stored; revocable). A
    recipient's token opens one transaction; a staff token opens every study.
    Issuing one is audited (User Authentication, 110114).

The search and retrieve themselves are :mod:`iepnode.viewing.dicomweb`.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from iepnode.errors import NodeError, NotFound
from iepnode.people import audit
from iepnode.sharing import downloads
from storage.db import write_transaction
from storage.models import DicomwebToken, StaffUser, Transaction
from storage.queries import people as people_q
from storage.queries import transactions as transactions_q
from storage.queries import viewing as queries

#: Seconds a DICOMweb bearer token is valid.
TOKEN_TTL = 3600.0


class TokenRefused(NodeError):
    """A bearer token that is unknown, expired or revoked (HTTP 401)."""


# -- scopes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """What one DICOMweb request may see, and who is asking (for the audit trail)."""

    actor: audit.Actor
    #: Study Instance UIDs the request may see; ``None``: every study (staff).
    study_uids: frozenset[str] | None
    #: The transaction of a per-transaction base URL ("" for the staff base URL).
    public_id: str = ""
    patient_id: str = ""
    transaction_id: int = 0

    def allows(self, study_uid: str) -> bool:
        """Whether the study is inside the scope (not whether it is stored)."""
        return self.study_uids is None or study_uid in self.study_uids


def _transaction_uids(transaction: Transaction) -> frozenset[str]:
    return frozenset(transactions_q.study_uids_of(transaction.id))


def recipient_scope(recipient_id: int, public_id: str, source_ip: str = "") -> Scope:
    """The scope of a recipient over one of their transactions.

    Raises
    ------
    NotFound
        No such transaction, or someone else's.
    Gone
        Declined, expired or purged (as for the download).
    """
    transaction = queries.recipient_transaction(public_id, recipient_id)
    if transaction is None:
        raise NotFound(f"no transaction {public_id}")
    downloads.check_downloadable(transaction)
    return Scope(audit.Actor("recipient", transaction.recipient.email, source_ip),
                 _transaction_uids(transaction), transaction.public_id,
                 transaction.patient_id, transaction.id)


def staff_scope(user: StaffUser, public_id: str = "", source_ip: str = "") -> Scope:
    """The scope of a staff member: every study, or one transaction's (any status).

    Raises
    ------
    NotFound
        ``public_id`` names no transaction.
    """
    actor = audit.Actor("staff", user.username, source_ip)
    if not public_id:
        return Scope(actor, None)
    transaction = transactions_q.transaction_with_public_id(public_id)
    if transaction is None:
        raise NotFound(f"no transaction {public_id}")
    return Scope(actor, _transaction_uids(transaction), public_id, transaction.patient_id)


# -- tokens ------------------------------------------------------------------------------


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    """A new token (shown once) and when it stops working."""

    token: str
    expires_at: float


def issue_recipient_token(recipient_id: int, public_id: str, *, source_ip: str = "",
                          ttl: float = TOKEN_TTL, now: float | None = None) -> IssuedToken:
    """Create a token that opens one of the recipient's live transactions (audited).

    Raises
    ------
    NotFound, Gone
        As :func:`recipient_scope`.
    """
    now = time.time() if now is None else now
    scope = recipient_scope(recipient_id, public_id, source_ip)
    transaction = transactions_q.transaction_by_public_id(public_id)
    token = secrets.token_urlsafe(32)
    with write_transaction():
        queries.create_token(token_hash=_hash(token), recipient=recipient_id,
                             transaction=transaction.id, created_at=now,
                             expires_at=now + ttl)
        audit.record(audit.USER_AUTHENTICATION, "dicomweb-token", scope.actor,
                     patient_id=scope.patient_id, transaction=public_id,
                     detail=f"DICOMweb token valid {int(ttl // 60)} minutes", now=now)
    return IssuedToken(token, now + ttl)


def issue_staff_token(user: StaffUser, *, source_ip: str = "", ttl: float = TOKEN_TTL,
                      now: float | None = None) -> IssuedToken:
    """Create a token that opens every study for a staff member (audited)."""
    now = time.time() if now is None else now
    token = secrets.token_urlsafe(32)
    with write_transaction():
        queries.create_token(token_hash=_hash(token), staff=user.id, created_at=now,
                             expires_at=now + ttl)
        audit.record(audit.USER_AUTHENTICATION, "dicomweb-token",
                     audit.Actor("staff", user.username, source_ip),
                     detail=f"DICOMweb token valid {int(ttl // 60)} minutes", now=now)
    return IssuedToken(token, now + ttl)


def revoke_tokens(*, recipient_id: int | None = None, public_id: str = "",
                  staff_id: int | None = None, now: float | None = None) -> int:
    """Revoke the live tokens of a recipient (for one transaction) or of a staff member.

    Returns how many were revoked.
    """
    now = time.time() if now is None else now
    if recipient_id is not None:
        transaction = transactions_q.transaction_of_recipient(public_id, recipient_id)
        if transaction is None:
            raise NotFound(f"no transaction {public_id}")
        whose = {"recipient_id": recipient_id, "transaction_id": transaction.id}
    elif staff_id is not None:
        whose = {"staff_id": staff_id}
    else:
        raise ValueError("revoke whose tokens?")
    with write_transaction():
        return queries.revoke_live_tokens(now, **whose)


def resolve_token(token: str, now: float | None = None) -> DicomwebToken:
    """The live token row for a bearer token.

    Raises
    ------
    TokenRefused
        Unknown, expired or revoked.
    """
    now = time.time() if now is None else now
    if not 20 <= len(token) <= 128:
        raise TokenRefused("malformed token")
    row = queries.token_with_hash(_hash(token))
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        raise TokenRefused("unknown, expired or revoked token")
    return row


def token_scope(row: DicomwebToken, public_id: str, source_ip: str = "") -> Scope:
    """The scope a token gives under a base URL (``public_id`` "" for the staff base).

    Raises
    ------
    NotFound
        A recipient's token under another transaction's base, or under the staff base.
    Gone
        The recipient's transaction is no longer available.
    """
    if row.staff_id is not None:
        user = people_q.staff_user_or_none(row.staff_id)
        if user is None or user.disabled:
            raise TokenRefused("staff user disabled")
        return staff_scope(user, public_id, source_ip)
    if not public_id:
        raise NotFound("not this token's transaction")
    scope = recipient_scope(row.recipient_id, public_id, source_ip)
    if row.transaction_id != scope.transaction_id:
        raise NotFound("not this token's transaction")
    return scope


@dataclass(frozen=True)
class ViewerAccess:
    """What a person needs to open studies in another viewer with a new token."""

    base_url: str
    token: str
    expires_at: float
    study_uids: tuple[str, ...]
    #: ``weasis://`` links, one per study (Weasis 4 ``$dicom:rs`` over DICOMweb).
    weasis: tuple[tuple[str, str], ...]
    #: The OHIF data source configuration (a ``dicomwebproxy`` JSON) of this token.
    ohif_config_url: str
    #: A link that opens OHIF on the studies ("" when no OHIF viewer is configured).
    ohif: str


def viewer_access(issued: IssuedToken, node_url: str, public_id: str,
                  study_uids: Sequence[str], ohif_url: str = "") -> ViewerAccess:
    """Base URL, token and ready-made viewer links for a new token.

    Parameters
    ----------
    issued : IssuedToken
        The token (from :func:`issue_recipient_token` or :func:`issue_staff_token`).
    node_url : str
        The node's public address (``[portal] public_url``).
    public_id : str
        The transaction of a recipient's token ("" for a staff token).
    study_uids : sequence of str
        The studies the links open.
    ohif_url : str, optional
        An OHIF Viewer's address (``[http] dicomweb_ohif_url``).
    """
    base = f"{node_url.rstrip('/')}/dicomweb" + (f"/t/{public_id}" if public_id else "")
    weasis = tuple(
        (uid, "weasis://" + quote(
            f'$dicom:rs --url "{base}" -r "studyUID={uid}" '
            f'--header "Authorization: Bearer {issued.token}"', safe=""))
        for uid in study_uids)
    config = f"{node_url.rstrip('/')}/dicomweb/ohif/{issued.token}.json"
    ohif = ""
    if ohif_url:
        ohif = (f"{ohif_url.rstrip('/')}/viewer/dicomwebproxy?"
                + urlencode({"url": config, "StudyInstanceUIDs": ",".join(study_uids)}))
    return ViewerAccess(base, issued.token, issued.expires_at, tuple(study_uids), weasis,
                        config, ohif)


def ohif_config(token: str, node_url: str, now: float | None = None) -> dict[str, Any]:
    """The OHIF ``dicomwebproxy`` data source of a live token (PS3.18 roots, Basic auth).

    OHIF sends ``requestOptions.auth`` as HTTP Basic credentials; the node accepts a
    token as the Basic password.

    Raises
    ------
    TokenRefused
        Unknown, expired or revoked token.
    """
    row = resolve_token(token, now)
    public_id = (transactions_q.transaction_by_id(row.transaction_id).public_id
                 if row.transaction_id else "")
    base = f"{node_url.rstrip('/')}/dicomweb" + (f"/t/{public_id}" if public_id else "")
    return {"servers": {"dicomWeb": [{
        "name": "iepnode", "wadoUriRoot": base, "qidoRoot": base, "wadoRoot": base,
        "qidoSupportsIncludeField": True, "supportsReject": False,
        "imageRendering": "wadors", "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True, "supportsFuzzyMatching": False,
        "supportsWildcard": True,
        "acceptHeader": ["multipart/related; type=application/octet-stream; transfer-syntax=*"],
        "requestOptions": {"auth": f"token:{token}"},
    }]}}


def purge_tokens(now: float | None = None) -> int:
    """Delete tokens that expired or were revoked more than a day ago (housekeeping)."""
    now = time.time() if now is None else now
    with write_transaction():
        return queries.delete_tokens_older_than(now - 86400)


__all__ = [
    "TOKEN_TTL",
    "IssuedToken",
    "Scope",
    "TokenRefused",
    "ViewerAccess",
    "issue_recipient_token",
    "issue_staff_token",
    "ohif_config",
    "purge_tokens",
    "recipient_scope",
    "resolve_token",
    "revoke_tokens",
    "staff_scope",
    "token_scope",
    "viewer_access",
]
