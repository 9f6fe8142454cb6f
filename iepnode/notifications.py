"""The texts the node sends to recipients: the transfer email and the passcode.

No passcode or token is ever logged; these functions only build text.
"""

from __future__ import annotations

from datetime import tzinfo

from iepnode import timefmt
from storage.models import Transaction


def transfer_email(transaction: Transaction, link: str, zone: tzinfo) -> tuple[str, str]:
    """Return (subject, text) of the email announcing a transaction.

    Parameters
    ----------
    transaction : Transaction
        The new transaction.
    link : str
        The login link with its token.
    zone : tzinfo
        The hospital's time zone (``Settings.zone``) for the expiry date.
    """
    subject = f"{transaction.institution}: images are ready for you ({transaction.public_id})"
    text = (
        f"Hello,\n\n"
        f"{transaction.institution} has sent you medical images "
        f"(transaction {transaction.public_id}).\n\n"
        f"Open this link to log in:\n{link}\n\n"
        f"When you open it, a one-time passcode is sent to the mobile number or second\n"
        f"email address the hospital has for you. The images are available until\n"
        f"{timefmt.long_day(transaction.expires_at, zone)}.\n\n"
        f"If you did not expect this message, contact {transaction.contact_name or 'the hospital'}"
        f"{' at ' + transaction.contact_email if transaction.contact_email else ''}.\n"
        f"Do not forward this email: the link is personal.\n"
    )
    return subject, text


def passcode_text(code: str, institution: str, minutes: int) -> str:
    """Return the short passcode message (SMS or email body)."""
    return (f"{code} is your {institution} image exchange passcode. "
            f"It is valid for {minutes} minutes. Never share it.")
