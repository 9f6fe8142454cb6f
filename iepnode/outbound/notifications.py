"""The texts the node sends to recipients: transfer email, passcode, new-message email.

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


def message_email(transaction: Transaction, transaction_url: str) -> tuple[str, str]:
    """Return (subject, text) of the email telling a recipient that staff wrote to them.

    It names the institution and the transaction ID only: never the message, the
    patient or the studies (email is not a safe place for them). Reading the message
    needs the usual sign-in: the link from the transfer email and a passcode.

    Parameters
    ----------
    transaction : Transaction
        The transaction whose thread has a new staff message.
    transaction_url : str
        The transaction's page on the portal; without a session it leads to the
        page explaining how to sign in.
    """
    institution = transaction.institution
    subject = f"{institution}: a new message about your images ({transaction.public_id})"
    text = (
        f"Hello,\n\n"
        f"{institution} has sent you a new message about the images they shared with you\n"
        f"(transaction {transaction.public_id}). For your privacy the message is not in this\n"
        f"email: sign in to read it.\n\n"
        f"To sign in, open the link in the email headed\n"
        f"\"{institution}: images are ready for you ({transaction.public_id})\":\n"
        f"a one-time passcode is sent to you as before (or use your authenticator app).\n"
        f"Once you are signed in, the message is here:\n{transaction_url}\n\n"
        f"If you did not expect this message, contact {transaction.contact_name or 'the hospital'}"
        f"{' at ' + transaction.contact_email if transaction.contact_email else ''}.\n"
    )
    return subject, text


def passcode_text(code: str, institution: str, minutes: int) -> str:
    """Return the short passcode message (SMS or email body)."""
    return (f"{code} is your {institution} image exchange passcode. "
            f"It is valid for {minutes} minutes. Never share it.")


def channel_changed_text(institution: str, when: str, new_channel: str,
                         contact: str) -> tuple[str, str]:
    """Return (subject, text) telling a recipient, on their OLD channel, that it changed.

    Parameters
    ----------
    institution : str
        The hospital that made the change.
    when : str
        When, as the hospital's local time.
    new_channel : str
        The new channel, masked (``mobile •••55``): never the whole number or address.
    contact : str
        Whom to call if the recipient did not ask for it.
    """
    subject = f"{institution}: your passcode channel was changed"
    text = (f"{institution}: on {when} the hospital changed where your image exchange "
            f"passcodes are sent, to {new_channel}. Passcodes no longer come here. If you "
            f"did not ask for this, contact {contact} at once.")
    return subject, text
