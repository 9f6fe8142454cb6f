"""Requests: staff ask an individual for images they hold (a CD, a DVD, a zip).

A request is a :class:`~storage.models.Transaction` of kind ``REQUEST`` and direction
``OUT`` (the images go out of the recipient's hands to the hospital). It carries the
patient details the hospital has (name, date of birth, sex, Patient ID and its issuer),
the reason and an optional message. The individual gets the same emailed link and
passcode login as for a transfer, sees the request under Action Required and answers
it with an upload (:mod:`iepnode.uploads.staging`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import tzinfo

from iepnode import timefmt
from iepnode.errors import InvalidRequest
from iepnode.rules.text import has_control
from iepnode.security import new_token, token_hash
from iepnode.sharing.transactions import (
    DAY,
    MAX_MESSAGE,
    NEW,
    OUT,
    PRIORITIES,
    REQUEST,
    Contact,
    NewTransfer,
    _new_public_id,
    _recipient,
)
from storage.db import write_transaction
from storage.models import Transaction
from storage.queries import transactions as transactions_q

SEXES = ("F", "M", "O", "")
_DA = re.compile(r"^[0-9]{8}$")


@dataclass(frozen=True)
class NewRequest:
    """What staff (or the CLI) ask for when requesting images from an individual.

    ``patient_family_name``/``patient_given_name`` make the DICOM name
    ``Family^Given``; ``patient_birth_date`` is ``YYYYMMDD`` (DA) or ``DD/MM/YYYY``.
    """

    recipient_email: str
    patient_family_name: str
    patient_given_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    patient_id: str = ""
    patient_id_issuer: str = ""
    nhs_number: str = ""
    reason: str = ""
    message: str = ""
    otp_mobile: str = ""
    otp_email: str = ""
    recipient_name: str = ""
    priority: str = "NORMAL"
    expiry_days: int = 14


def parse_birth_date(value: str) -> str:
    """Return a date of birth as DICOM DA (``YYYYMMDD``); "" stays "".

    Accepts ``YYYYMMDD``, ``YYYY-MM-DD`` (HTML date inputs) and ``DD/MM/YYYY``.

    Raises
    ------
    InvalidRequest
        Any other text, or a date that does not exist or lies in the future.
    """
    text = value.strip()
    if not text:
        return ""
    if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
        text = text.replace("-", "")
    elif re.fullmatch(r"[0-9]{1,2}/[0-9]{1,2}/[0-9]{4}", text):
        day, month, year = text.split("/")
        text = f"{year}{int(month):02d}{int(day):02d}"
    if not _DA.match(text):
        raise InvalidRequest(f"date of birth {value!r}: use DD/MM/YYYY")
    try:
        parsed = time.strptime(text, "%Y%m%d")
    except ValueError:
        raise InvalidRequest(f"date of birth {value!r} does not exist") from None
    if time.mktime(parsed) > time.time():
        raise InvalidRequest("the date of birth lies in the future")
    return text


def person_name(family: str, given: str) -> str:
    """Return the DICOM PN ``Family^Given`` of two typed names.

    Raises
    ------
    InvalidRequest
        No family name, or a name with ``^``, ``=``, ``\\`` or control characters.
    """
    family, given = family.strip(), given.strip()
    if not family:
        raise InvalidRequest("give the patient's last name")
    for part in (family, given):
        if has_control(part) or any(c in part for c in "^=\\"):
            raise InvalidRequest(f"the name {part!r} has characters a name cannot have")
        if len(part) > 64:
            raise InvalidRequest("names are limited to 64 characters")
    return f"{family}^{given}" if given else family


def _clean(value: str, limit: int, what: str) -> str:
    value = value.strip()
    if has_control(value) or len(value) > limit:
        raise InvalidRequest(f"{what}: at most {limit} characters, no line breaks")
    return value


def create_request(
    request: NewRequest, *, contact: Contact, institution: str, created_by: str,
    now: float | None = None,
) -> tuple[Transaction, str]:
    """Create a request for images and the recipient it goes to.

    Parameters
    ----------
    request : NewRequest
        Recipient, passcode channel, patient details, reason, message, expiry.
    contact : Contact
        The hospital contact shown to the recipient.
    institution : str
        The requesting institution's name.
    created_by : str
        Staff username (or the CLI user) for the audit trail.
    now : float, optional
        The current time (tests control it).

    Returns
    -------
    tuple of (Transaction, str)
        The request and the link token for the email (stored only hashed).

    Raises
    ------
    InvalidRequest
        A bad email, mobile number, name, date of birth, sex, priority or expiry, or
        no Patient ID.
    """
    now = time.time() if now is None else now
    name = person_name(request.patient_family_name, request.patient_given_name)
    birth_date = parse_birth_date(request.patient_birth_date)
    sex = request.patient_sex.strip().upper()[:1]
    if sex not in SEXES:
        raise InvalidRequest("sex must be F, M or O")
    if request.priority not in PRIORITIES:
        raise InvalidRequest(f"priority must be one of {', '.join(PRIORITIES)}")
    if not 1 <= request.expiry_days <= 3650:
        raise InvalidRequest("expiry must be 1 to 3650 days")
    patient_id = _clean(request.patient_id, 64, "Patient ID")
    if not patient_id:  # release reconciles the images to it: a request needs one
        raise InvalidRequest("give the hospital's Patient ID: the uploaded images are "
                             "reconciled to it")
    issuer = _clean(request.patient_id_issuer, 64, "issuer of Patient ID")
    nhs_number = _clean(request.nhs_number, 16, "NHS number")
    reason = request.reason.strip()
    if len(reason) > MAX_MESSAGE or len(request.message) > MAX_MESSAGE:
        raise InvalidRequest(f"reason and message are limited to {MAX_MESSAGE} characters")
    token = new_token()
    recipient_fields = NewTransfer(
        study_uids=(), recipient_email=request.recipient_email,
        otp_mobile=request.otp_mobile, otp_email=request.otp_email,
        recipient_name=request.recipient_name)
    with write_transaction():
        recipient = _recipient(recipient_fields, now).recipient
        transaction = transactions_q.create_transaction(
            public_id=_new_public_id(), kind=REQUEST, direction=OUT, recipient=recipient,
            status=NEW, priority=request.priority, created_at=now,
            expires_at=now + request.expiry_days * DAY,
            patient_name=name, patient_birth_date=birth_date, patient_sex=sex,
            patient_id=patient_id, patient_id_issuer=issuer, nhs_number=nhs_number,
            request_reason=reason,
            institution=institution[:128], contact_name=contact.name[:128],
            contact_department=contact.department[:128], contact_email=contact.email[:254],
            contact_phone=contact.phone[:32], created_by=created_by[:64],
            link_token_hash=token_hash(token),
        )
        if request.message.strip():
            transactions_q.add_transaction_message(transaction=transaction, author_kind="staff",
                                                   author=contact.name or created_by,
                                                   body=request.message.strip(), created_at=now)
    return transaction, token


def request_email(transaction: Transaction, link: str, zone: tzinfo) -> tuple[str, str]:
    """Return (subject, text) of the email asking the recipient for images.

    Like every email of the node it names no patient: the details are behind the login.
    """
    subject = (f"{transaction.institution}: please upload images "
               f"({transaction.public_id})")
    text = (
        f"Hello,\n\n"
        f"{transaction.institution} asks you to upload medical images you hold, for\n"
        f"example from a CD or DVD you were given (request {transaction.public_id}).\n\n"
        f"Open this link to log in:\n{link}\n\n"
        f"When you open it, a one-time passcode is sent to the mobile number or second\n"
        f"email address the hospital has for you. Then choose Open next to the request\n"
        f"and drop the files or zip files on the page. The request is open until\n"
        f"{timefmt.long_day(transaction.expires_at, zone)}.\n\n"
        f"If you did not expect this message, contact {transaction.contact_name or 'the hospital'}"
        f"{' at ' + transaction.contact_email if transaction.contact_email else ''}.\n"
        f"Do not forward this email: the link is personal.\n"
    )
    return subject, text


def upload_confirmation_email(transaction: Transaction, files: int, size: int,
                              when: float, zone: tzinfo) -> tuple[str, str]:
    """Return (subject, text) confirming to the uploader that their files were sent."""
    contact = transaction.contact_name or transaction.institution
    how = (f"{contact}"
           f"{', ' + transaction.contact_email if transaction.contact_email else ''}"
           f"{', ' + transaction.contact_phone if transaction.contact_phone else ''}")
    subject = f"{transaction.institution}: your upload was received ({transaction.public_id})"
    text = (
        f"Hello,\n\n"
        f"Thank you. {transaction.institution} has received the {files} file"
        f"{'s' if files != 1 else ''} ({size / 1e6:.1f} MB) you uploaded on\n"
        f"{timefmt.day_time(when, zone)} in answer to request {transaction.public_id}.\n"
        f"The hospital will check them before adding them to its records.\n\n"
        f"If you have a question about this upload, contact {how}.\n"
    )
    return subject, text
