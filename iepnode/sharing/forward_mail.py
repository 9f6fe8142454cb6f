"""The texts a forward sends: the link email to the new recipient and the hospital's notice.

No passcode or token is ever logged; these functions only build text.
"""

from __future__ import annotations

from datetime import UTC, datetime

from iepnode.sharing.forwarding import PURPOSES, CheckedForward, Forwarded


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%d %B %Y %H:%M UTC")


def forwarded_email(forwarded: Forwarded, forwarder_name: str, link: str) -> tuple[str, str]:
    """Return (subject, text) of the email announcing a forwarded package.

    Parameters
    ----------
    forwarded : Forwarded
        The new copy and its recipient.
    forwarder_name : str
        Who forwarded it (name and email), as the recipient is told.
    link : str
        The login link with its token.
    """
    copy = forwarded.copy
    subject = f"{copy.institution}: medical images forwarded to you ({copy.public_id})"
    text = (
        f"Hello,\n\n"
        f"{forwarder_name} has forwarded medical images from {copy.institution} to you\n"
        f"(transaction {copy.public_id}).\n\n"
        f"Open this link to log in:\n{link}\n\n"
        f"When you open it, a one-time passcode is sent to the mobile number or second\n"
        f"email address given for you. The images are available until\n"
        f"{_when(copy.expires_at)}. You can view and download them; they cannot be\n"
        f"forwarded again.\n\n"
        f"If you did not expect this message, contact {copy.contact_name or copy.institution}"
        f"{' at ' + copy.contact_email if copy.contact_email else ''}.\n"
        f"Do not forward this email: the link is personal.\n"
    )
    return subject, text


def hospital_notice(forwarded: Forwarded, checked: CheckedForward, forwarder_email: str,
                    staff_url: str) -> tuple[str, str]:
    """Return (subject, text) of the notice to the hospital contact of the source package.

    Parameters
    ----------
    forwarded : Forwarded
        The source package and its new copy.
    checked : CheckedForward
        What the forwarder typed about the new recipient (shown even when the
        recipient already had an account, whose stored details stay unchanged).
    forwarder_email : str
        Who forwarded.
    staff_url : str
        The staff page of the source transaction (its audit trail).

    Like the link emails, the notice names no patient: staff see who on the page.
    """
    source, copy = forwarded.source, forwarded.copy
    lines = [
        f"{forwarder_email} has forwarded transaction {source.public_id} to another person.",
        "",
        f"Forwarded to:   {forwarded.recipient.email}",
    ]
    if checked.known:
        lines.append("                (forwarded to before by the same recipient)")
    else:
        lines += [f"Name:           {checked.name}",
                  f"Telephone:      {checked.phone}",
                  "Address:        " + "\n                ".join(checked.address.splitlines())]
    lines += [
        f"Purpose:        {PURPOSES[checked.purpose]}",
        *([f"Organisation:   {checked.organisation}"] if checked.organisation else []),
        f"New package:    {copy.public_id}, available until {_when(copy.expires_at)}",
        "",
        "The forwarder confirmed that the recipient's details are correct and that the",
        "hospital is made aware of the forward. The audit trail of the package:",
        staff_url,
    ]
    subject = f"Package {source.public_id} was forwarded by its recipient"
    return subject, "\n".join(lines) + "\n"
