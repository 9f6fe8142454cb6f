"""Forwarding a received package to another person (a solicitor, another clinician).

The forwarded copy is a new transaction (kind TRANSFER) for the new recipient that
references the same studies (``TransactionStudy`` rows; files are shared, never
copied) and points to its source with ``Transaction.forwarded_from``. The rules are
therefore data, not flags:

- only a received transfer that is neither declined nor expired can be forwarded;
- a package received by forwarding (``forwarded_from`` set) cannot be forwarded again;
- a package can be forwarded at most ``max_forwards`` times: every copy counts,
  declined or expired ones too;
- a copy never outlives its source: it expires at the earliest of the days asked
  for, the node's ``expiry_days`` and the source's own expiry (the hospital's
  retention), so the purge never keeps files longer because of a forward.

:func:`create_copy` counts the copies and inserts the new one in one write
transaction with the source row locked (SQLite: ``BEGIN IMMEDIATE`` behind the
writer queue; PostgreSQL: ``SELECT ... FOR UPDATE``), so simultaneous requests can
never exceed the limit.

Recipients are never changed by a forward: someone who already has an account keeps
their name and passcode channel (otherwise a forward could redirect a stranger's
passcodes); the details typed in the dialog go to the hospital's notice and the audit
trail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from iepnode.errors import InvalidRequest
from iepnode.people import audit
from iepnode.rules.text import has_control
from iepnode.security import new_token, token_hash
from iepnode.sharing import recipients
from iepnode.sharing.recipients import normalize_email, normalize_mobile
from iepnode.sharing.transactions import (
    DAY,
    DECLINED,
    IN,
    MAX_MESSAGE,
    NEW,
    TRANSFER,
    _new_public_id,  # one ID scheme for every transaction
    is_expired,
)
from storage.db import write_transaction
from storage.models import Recipient, Transaction
from storage.queries import forwarding as queries

#: Why the recipient forwards (step 2 of the dialog), shown to the hospital.
PURPOSES = {
    "second-opinion": "Second opinion",
    "legal": "Legal or medico-legal review",
    "care": "Care by another clinician",
    "personal": "Personal records",
    "other": "Other",
}
#: Steps of the dialog, for errors that send the user back to one of them.
DESTINATION, ADDITIONAL_INFO, MESSAGE, RETENTION = 1, 2, 3, 4
#: Message author kind of the forwarder's note in the copy's thread.
FORWARDER = "forwarder"
MAX_NAME = 64
MAX_ADDRESS = 500
MAX_ORGANISATION = 128


class ForwardInvalid(InvalidRequest):
    """Something typed in the dialog is wrong; ``step`` is where to fix it."""

    def __init__(self, message: str, step: int = DESTINATION) -> None:
        super().__init__(message)
        self.step = step


class ForwardRefused(InvalidRequest):
    """The rules do not allow forwarding this package (limit, copy, declined, expired)."""


@dataclass(frozen=True)
class ForwardRequest:
    """What the forward dialog sends, as typed (checked by :func:`check_request`).

    The new-individual fields (names, address, phone, passcode channel) are needed
    only for someone the forwarder has not forwarded to before.
    """

    email: str
    email_confirm: str
    first_name: str = ""
    last_name: str = ""
    address: str = ""
    phone: str = ""
    otp_mobile: str = ""
    otp_email: str = ""
    purpose: str = ""
    organisation: str = ""
    message: str = ""
    days: int | None = None
    agreed: bool = False


@dataclass(frozen=True)
class CheckedForward:
    """A forward request that passed :func:`check_request` (normalised values)."""

    email: str
    known: bool
    name: str
    address: str
    phone: str
    otp_mobile: str
    otp_email: str
    purpose: str
    organisation: str
    message: str
    days: int | None


@dataclass(frozen=True)
class ForwardState:
    """Whether a package may be forwarded now, and how many forwards it has used."""

    allowed: bool
    used: int
    limit: int
    reason: str = ""

    @property
    def left(self) -> int:
        """Forwards still possible (0 when not allowed)."""
        return max(self.limit - self.used, 0) if self.allowed else 0


@dataclass(frozen=True)
class Forwarded:
    """A forwarded copy just created, with its link token (stored only hashed)."""

    source: Transaction
    copy: Transaction
    recipient: Recipient
    token: str
    recipient_created: bool


@dataclass(frozen=True)
class ForwardDialog:
    """What the forward dialog shows: the package, the forwarder and the choices."""

    transaction: Transaction
    forwarder: Recipient
    state: ForwardState
    #: Emails the forwarder has forwarded to before (no new-individual details needed).
    known: list[str]
    #: ``(days or None for the longest, expiry)`` the recipient may be given.
    periods: list[tuple[int | None, float]]


@dataclass(frozen=True)
class ForwardHistory:
    """A package's forwarded copies as its recipient sees them."""

    transaction: Transaction
    forwarder: Recipient
    state: ForwardState
    copies: list[Transaction]


# -- pure rules -----------------------------------------------------------------------------


def refusal(transaction: Any, copies: int, *, max_forwards: int, now: float) -> str:
    """Why ``transaction`` cannot be forwarded now; ``""`` when it can.

    Parameters
    ----------
    transaction : Transaction or a dashboard row
        Anything with ``kind``, ``direction``, ``status``, ``expires_at``,
        ``purged_at`` and ``forwarded_from_id``.
    copies : int
        How many forwarded copies of it exist.
    max_forwards : int
        The most copies allowed (``[portal] max_forwards``; 0 turns forwarding off).
    now : float
        The current time.
    """
    t = transaction
    if t.forwarded_from_id is not None:
        return "This package was forwarded to you: it cannot be forwarded again."
    if t.kind != TRANSFER or t.direction != IN:
        return "Only packages sent to you can be forwarded."
    if t.status == DECLINED:
        return "You declined this package: it cannot be forwarded."
    if is_expired(t, now) or t.purged_at:
        return "This package has expired: it cannot be forwarded."
    if max_forwards <= 0:
        return "Forwarding is turned off."
    if copies >= max_forwards:
        return (f"This package has been forwarded {copies} time{'s' if copies != 1 else ''} "
                f"already, the most allowed.")
    return ""


def copy_expiry(source_expires_at: float, now: float, *, days: int | None,
                default_days: int) -> float:
    """When a copy forwarded at ``now`` expires: never later than its source.

    The earliest of ``now + days`` (when asked for), ``now + default_days`` (the
    node's ``expiry_days``) and the source's expiry.
    """
    limit = default_days if days is None else min(days, default_days)
    return min(now + limit * DAY, source_expires_at)


def periods(source_expires_at: float, now: float, *, default_days: int,
            ) -> list[tuple[int | None, float]]:
    """The availability periods the dialog offers: the longest allowed, then shorter ones.

    Returns ``(None, longest expiry)`` followed by ``(days, expiry)`` for 1, 3, 7, 14
    and 30 days where they end earlier.
    """
    longest = copy_expiry(source_expires_at, now, days=None, default_days=default_days)
    shorter = [(d, now + d * DAY) for d in (30, 14, 7, 3, 1) if now + d * DAY < longest]
    return [(None, longest), *shorter]


def _line(value: str, label: str, limit: int, *, step: int, required: bool) -> str:
    text = " ".join(value.split())
    if required and not text:
        raise ForwardInvalid(f"give the {label}", step)
    if len(text) > limit or has_control(text):
        raise ForwardInvalid(f"the {label} has at most {limit} characters", step)
    return text


def check_request(request: ForwardRequest, *, forwarder_email: str,
                  known: set[str]) -> CheckedForward:
    """Check what the dialog sent; return it normalised.

    Parameters
    ----------
    request : ForwardRequest
        The dialog's fields as typed.
    forwarder_email : str
        The email of the recipient who forwards (they cannot forward to themselves).
    known : set of str
        Emails the forwarder has forwarded to before: those need no new-individual
        details (and any typed are ignored).

    Raises
    ------
    ForwardInvalid
        With the dialog step to go back to.
    """
    try:
        email = normalize_email(request.email)
    except InvalidRequest:
        raise ForwardInvalid("type the recipient's email address, like name@example.org",
                             DESTINATION) from None
    if request.email_confirm.strip().lower() != email:
        raise ForwardInvalid("the two email addresses differ: type the same address twice",
                             DESTINATION)
    if email == forwarder_email.lower():
        raise ForwardInvalid("you cannot forward a package to yourself", DESTINATION)
    is_known = email in known
    name = address = phone = otp_mobile = otp_email = ""
    if not is_known:
        first = _line(request.first_name, "first name", MAX_NAME, step=DESTINATION,
                      required=True)
        last = _line(request.last_name, "last name", MAX_NAME, step=DESTINATION, required=True)
        name = f"{first} {last}"
        address = "\n".join(line.strip() for line in request.address.strip().splitlines()
                            if line.strip())
        if not address:
            raise ForwardInvalid("give the recipient's address", DESTINATION)
        if len(address) > MAX_ADDRESS or has_control(address, multiline=True):
            raise ForwardInvalid(f"the address has at most {MAX_ADDRESS} characters",
                                 DESTINATION)
        try:
            phone = normalize_mobile(request.phone)
        except InvalidRequest:
            raise ForwardInvalid("the contact telephone number: 7 to 15 digits, like "
                                 "+44 20 7946 0000", DESTINATION) from None
        if bool(request.otp_mobile.strip()) == bool(request.otp_email.strip()):
            raise ForwardInvalid("give a mobile number or a second email address for the "
                                 "passcode (one of them)", DESTINATION)
        if request.otp_mobile.strip():
            try:
                otp_mobile = normalize_mobile(request.otp_mobile)
            except InvalidRequest:
                raise ForwardInvalid("the mobile number for the passcode: 7 to 15 digits, "
                                     "like +44 7700 900123", DESTINATION) from None
        else:
            try:
                otp_email = normalize_email(request.otp_email)
            except InvalidRequest:
                raise ForwardInvalid("the second email address for the passcode is not an "
                                     "email address", DESTINATION) from None
            if otp_email == email:
                raise ForwardInvalid("the passcode email must differ from the recipient's "
                                     "email address", DESTINATION)
    if request.purpose not in PURPOSES:
        raise ForwardInvalid("choose why you forward the package", ADDITIONAL_INFO)
    organisation = _line(request.organisation, "organisation", MAX_ORGANISATION,
                         step=ADDITIONAL_INFO, required=False)
    message = request.message.strip()
    if len(message) > MAX_MESSAGE:
        raise ForwardInvalid(f"messages are limited to {MAX_MESSAGE} characters", MESSAGE)
    if request.days is not None and not 1 <= request.days <= 3650:
        raise ForwardInvalid("choose how long the recipient has the package", RETENTION)
    if not request.agreed:
        raise ForwardInvalid("tick the box to confirm you may send this data", RETENTION)
    return CheckedForward(email, is_known, name, address, phone, otp_mobile, otp_email,
                          request.purpose, organisation, message, request.days)


# -- reading ------------------------------------------------------------------------------

def forward_counts(transaction_ids: list[int]) -> dict[int, int]:
    """How many forwarded copies each of these transactions has (missing: none)."""
    return queries.forward_counts(transaction_ids)


def states(rows: list[Any], *, max_forwards: int, now: float) -> dict[str, ForwardState]:
    """Whether each transaction may be forwarded, by public ID (one query for all).

    Copies are counted only for rows that could have any (received transfers that
    are not copies themselves).
    """
    counted = [r.id for r in rows if r.forwarded_from_id is None and r.kind == TRANSFER]
    counts = forward_counts(counted) if max_forwards > 0 else {}
    result = {}
    for row in rows:
        used = counts.get(row.id, 0)
        reason = refusal(row, used, max_forwards=max_forwards, now=now)
        result[row.public_id] = ForwardState(not reason, used, max_forwards, reason)
    return result


def known_recipients(forwarder_id: int) -> list[str]:
    """Emails of the people this recipient has forwarded packages to, sorted.

    Only their own forwards: whether someone else has an account is never revealed.
    """
    return queries.forwarded_to_emails(forwarder_id)


def forwards_of(source_id: int) -> list[Transaction]:
    """The forwarded copies of a transaction (recipient loaded), oldest first."""
    return queries.copies_of(source_id)


# -- writing ------------------------------------------------------------------------------


def _recipient_for(checked: CheckedForward, now: float) -> tuple[Recipient, bool]:
    """The recipient with ``checked.email``: the existing one unchanged, or a new one."""
    kind = recipients.SMS if checked.otp_mobile else recipients.EMAIL
    found = recipients.find_or_create(
        checked.email, recipients.Channel(kind, checked.otp_mobile or checked.otp_email),
        name=checked.name, address=checked.address, phone=checked.phone, update_name=False,
        now=now)
    return found.recipient, found.created


def create_copy(source_id: int, forwarder: Recipient, checked: CheckedForward, *,
                max_forwards: int, default_days: int, actor: audit.Actor,
                now: float | None = None) -> Forwarded:
    """Create the forwarded copy of a package and audit it, or refuse.

    Counting the copies and inserting the new one happen in one write transaction
    with the source row locked, so simultaneous forwards never exceed
    ``max_forwards``.

    Parameters
    ----------
    source_id : int
        Row ID of the package forwarded (already checked to be ``forwarder``'s).
    forwarder : Recipient
        Who forwards.
    checked : CheckedForward
        The dialog's values (see :func:`check_request`).
    max_forwards, default_days : int
        ``[portal] max_forwards`` and ``expiry_days``.
    actor : audit.Actor
        The forwarder as the audit trail names them.
    now : float, optional
        The current time (tests control it).

    Raises
    ------
    ForwardRefused
        The rules do not allow it (see :func:`refusal`).
    ForwardInvalid
        The new recipient is the forwarder.
    """
    now = time.time() if now is None else now
    token = new_token()
    with write_transaction():
        source = queries.source_for_update(source_id)
        copies = queries.count_copies(source.id)
        reason = refusal(source, copies, max_forwards=max_forwards, now=now)
        if reason:
            raise ForwardRefused(reason)
        recipient, created = _recipient_for(checked, now)
        if recipient.id == forwarder.id:
            raise ForwardInvalid("you cannot forward a package to yourself", DESTINATION)
        copy = queries.create_copy(
            public_id=_new_public_id(), kind=TRANSFER, direction=IN, recipient=recipient,
            status=NEW, priority="NORMAL", created_at=now,
            expires_at=copy_expiry(source.expires_at, now, days=checked.days,
                                   default_days=default_days),
            patient_name=source.patient_name, patient_birth_date=source.patient_birth_date,
            patient_sex=source.patient_sex, patient_id=source.patient_id,
            nhs_number=source.nhs_number, institution=source.institution,
            contact_name=source.contact_name, contact_department=source.contact_department,
            contact_email=source.contact_email, contact_phone=source.contact_phone,
            created_by=forwarder.email[:64], link_token_hash=token_hash(token),
            forwarded_from=source.id,
        )
        studies = queries.studies_of(source)
        if not studies:
            raise ForwardRefused("This package holds no studies.")
        queries.copy_studies(copy.id, studies)
        if checked.message:
            queries.add_message(transaction=copy, author_kind=FORWARDER,
                                author=(forwarder.name or forwarder.email)[:128],
                                body=checked.message, created_at=now)
        _audit_forward(source, copy, recipient, checked, [s.study_uid for s in studies],
                       actor, now)
    return Forwarded(source, copy, recipient, token, created)


def _audit_forward(source: Transaction, copy: Transaction, recipient: Recipient,
                   checked: CheckedForward, study_uids: list[str], actor: audit.Actor,
                   now: float) -> None:
    """Two Export (DCM 110106) events: one in each package's trail."""
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(copy.expires_at))
    what = (f"studies {', '.join(study_uids)}; available until {until}; purpose: "
            f"{PURPOSES[checked.purpose]}"
            + (f"; organisation: {checked.organisation}" if checked.organisation else ""))
    audit.record(audit.EXPORT, "forward", actor, patient_id=source.patient_id,
                 study_uid=",".join(study_uids)[:64], transaction=source.public_id,
                 detail=f"forwarded to {recipient.email} as {copy.public_id}; {what}", now=now)
    audit.record(audit.EXPORT, "forward-create", actor, patient_id=source.patient_id,
                 study_uid=",".join(study_uids)[:64], transaction=copy.public_id,
                 detail=f"copy of {source.public_id} for {recipient.email}; {what}", now=now)


def undo(forwarded: Forwarded) -> None:
    """Delete a copy whose link could not be sent (and a recipient made only for it).

    The forward then does not count; the audit events stay.
    """
    with write_transaction():
        queries.delete_copy(forwarded.copy.id, forwarded.recipient.id,
                            recipient_too=forwarded.recipient_created)
