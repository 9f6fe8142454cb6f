"""Recipients: found or created by email, and their passcode channel, which only staff change.

A recipient is identified by their email; their passcodes go to a second channel,
a mobile number (SMS) or a second email address. Whoever creates a share, request
or forward for someone who already has an account gives a channel too, but it is
used only for a new account (:func:`find_or_create`): an existing recipient's
channel never changes that way, or anyone able to share could redirect a stranger's
passcodes to themselves. Changing it is a separate staff action
(:func:`change_channel`, audited and announced on the old channel by
:meth:`iepnode.sharing.passcode_channels.PasscodeChannels.change_passcode_channel`, allowed as
:meth:`~iepnode.sharing.passcode_channels.PasscodeChannels.may_change_channel` says).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from iepnode.errors import InvalidRequest
from iepnode.rules.text import is_email, is_phone
from storage.db import write_transaction
from storage.models import Recipient
from storage.queries import recipients as queries

SMS, EMAIL = "sms", "email"


def normalize_email(value: str) -> str:
    """Return a lower-cased email address, or raise :class:`InvalidRequest`."""
    email = value.strip().lower()
    if not is_email(email):
        raise InvalidRequest(f"not an email address: {value!r}")
    return email


def normalize_mobile(value: str) -> str:
    """Return a mobile number as ``+digits``/``digits``, or raise :class:`InvalidRequest`."""
    number = re.sub(r"[\s\-().]", "", value)
    if not is_phone(number):
        raise InvalidRequest(f"not a mobile number: {value!r}")
    return number


@dataclass(frozen=True)
class Channel:
    """Where passcodes go: ``sms`` to a number or ``email`` to an address."""

    kind: str
    destination: str

    @property
    def masked(self) -> str:
        """The channel without giving it away: ``mobile •••23``, ``email a•••@example.org``."""
        if self.kind == SMS:
            return f"mobile {mask(SMS, self.destination)}"
        return f"email {mask(EMAIL, self.destination)}"


@dataclass(frozen=True)
class Found:
    """The recipient of a share: ``created`` (new account) or found; ``channel_kept``: the
    channel given differs from theirs and was not used."""

    recipient: Recipient
    created: bool
    channel_kept: bool


def mask(kind: str, destination: str) -> str:
    """Show a passcode destination without giving it away.

    ``+447700900123`` -> ``•••23``; ``anna@example.org`` -> ``a•••@example.org``.
    """
    if kind == SMS:
        return f"•••{destination[-2:]}"
    local, _, domain = destination.partition("@")
    return f"{local[:1]}•••@{domain}"


def channel_of(recipient: Recipient) -> Channel:
    """The recipient's passcode channel."""
    if recipient.otp_mobile:
        return Channel(SMS, recipient.otp_mobile)
    return Channel(EMAIL, recipient.otp_email)


def check_channel(email: str, otp_mobile: str, otp_email: str) -> Channel:
    """The one passcode channel given for the recipient ``email``, normalised.

    Raises
    ------
    InvalidRequest
        None or both given, a bad number or address, or the recipient's own email.
    """
    if bool(otp_mobile.strip()) == bool(otp_email.strip()):
        raise InvalidRequest("give exactly one passcode channel: a mobile number or an email")
    if otp_mobile.strip():
        return Channel(SMS, normalize_mobile(otp_mobile))
    address = normalize_email(otp_email)
    if address == email:
        raise InvalidRequest("the passcode email must differ from the recipient's email")
    return Channel(EMAIL, address)


def kept_instead(recipient: Recipient, otp_mobile: str, otp_email: str) -> Channel | None:
    """The recipient's own channel if a share gave another one (not used), else ``None``.

    For telling staff after :func:`find_or_create` kept an existing recipient's channel.
    """
    own = channel_of(recipient)
    return own if own != check_channel(recipient.email, otp_mobile, otp_email) else None


def find_or_create(email: str, channel: Channel, *, name: str = "", address: str = "",
                   phone: str = "", update_name: bool = True,
                   now: float | None = None) -> Found:
    """The recipient with ``email``, created with ``channel`` if new (in the caller's transaction).

    An existing recipient keeps their channel whatever was given; with
    ``update_name`` a non-empty ``name`` replaces theirs (staff shares), otherwise
    nothing of theirs changes (forwards). Two creations of one new email at once
    make one row (``INSERT ... ON CONFLICT DO NOTHING``; PostgreSQL's second insert
    waits for the first, then does nothing).

    Parameters
    ----------
    email : str
        Normalised (lower-cased) email of the recipient.
    channel : Channel
        The passcode channel given (see :func:`check_channel`).
    """
    now = time.time() if now is None else now
    name = name.strip()[:128]
    existing = queries.recipient_with_email(email)
    created = False
    if existing is None:
        created = queries.insert_recipient_if_new(
            email=email, name=name, address=address, phone=phone,
            otp_mobile=channel.destination if channel.kind == SMS else "",
            otp_email=channel.destination if channel.kind == EMAIL else "",
            created_at=now)
    recipient = queries.recipient_by_email(email)
    if not created and update_name and name and recipient.name != name:
        queries.rename_recipient(recipient.id, name)
        recipient.name = name
    return Found(recipient, created, channel_of(recipient) != channel)


@dataclass(frozen=True)
class ChannelChange:
    """A recipient's passcode channel before and after a staff change."""

    recipient: Recipient
    old: Channel
    new: Channel


def change_channel(recipient_id: int, channel: Channel) -> ChannelChange:
    """Give the recipient a new passcode channel; end their sessions and unused passcodes.

    The passcode already on its way (or sitting) on the old channel cannot sign in
    any more, and the next one may be asked for at once (to the new channel).

    Raises
    ------
    InvalidRequest
        ``channel`` is the recipient's channel already.
    """
    with write_transaction():
        # Attempts first, then the recipient row (locked while its old channel is read):
        # the order verify_passcode locks them in on PostgreSQL, so the two never wait
        # for each other in a circle. SQLite's writers are serialised anyway.
        queries.kill_unused_attempts(recipient_id)
        recipient = queries.recipient_for_update(recipient_id)
        old = channel_of(recipient)
        if old == channel:  # raised inside: the attempts stay alive
            what = "number" if channel.kind == SMS else "address"
            raise InvalidRequest(f"passcodes go to that {what} already")
        queries.set_channel(recipient_id,
                            channel.destination if channel.kind == SMS else "",
                            channel.destination if channel.kind == EMAIL else "")
        queries.end_recipient_sessions(recipient_id)
    return ChannelChange(queries.recipient_by_id(recipient_id), old, channel)


def recipient_by_id(recipient_id: int) -> Recipient:
    """Return the recipient with the id ``recipient_id`` (e.g. a session's recipient).

    Raises
    ------
    Recipient.DoesNotExist
        If there is no such recipient.
    """
    return queries.recipient_by_id(recipient_id)
