"""The services behind the staff pages (``/admin``) and the CLI's admin commands.

One field per service, each in the area package it belongs to; they take what they
need in their constructors. :func:`build_staff_side` is for the composition root
only (today ``Node.admin``; the wiring module once the ``Node`` façade is gone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iepnode.archive.peers import RemotePeers
from iepnode.archive.study_search import StudySearch
from iepnode.people.audit_trail import AuditTrail
from iepnode.people.passwords import PasswordWork
from iepnode.people.staff_accounts import StaffAccounts
from iepnode.people.staff_logins import LoginThrottle, StaffLogins
from iepnode.sharing.passcode_channels import PasscodeChannels
from iepnode.sharing.staff_transactions import StaffTransactions

if TYPE_CHECKING:
    from config import Settings
    from iepnode.outbound.messaging import Messenger


@dataclass(frozen=True)
class StaffSide:
    """What staff do, by area: logins, accounts, audit trail, peers, studies, transactions."""

    #: Staff login/logout, the login throttle, and the steps after an admin reset.
    logins: StaffLogins
    #: Own account (TOTP, password) and staff users (add, disable, reset).
    accounts: StaffAccounts
    #: Pages of the audit log.
    audit_trail: AuditTrail
    #: Remote AEs: listed, validated and audited changes.
    peers: RemotePeers
    #: Search of the received studies.
    studies: StudySearch
    #: Transactions as staff see them, replies, recipients' sign-in help.
    transactions: StaffTransactions
    #: Where a recipient's passcodes go.
    channels: PasscodeChannels


def build_staff_side(settings: Settings, secret: Callable[[], bytes],
                     messenger: Messenger) -> StaffSide:
    """Build the staff services of one process (the composition root calls this).

    Parameters
    ----------
    settings : Settings
        The node's settings (password-hash pool size, public URL, institution, zone).
    secret : callable
        Returns the node's secret key (signs staff TOTP enrolments), read or created
        on first use (e.g. ``SecretKey.get``).
    messenger : Messenger
        Outgoing mail and SMS (replies' notices, passcode-channel notices).
    """
    throttle = LoginThrottle()
    work = PasswordWork(settings.password_hash_concurrency, settings.password_hash_queue)
    return StaffSide(
        logins=StaffLogins(work, throttle),
        accounts=StaffAccounts(secret, throttle),
        audit_trail=AuditTrail(),
        peers=RemotePeers(),
        studies=StudySearch(),
        transactions=StaffTransactions(settings, messenger),
        channels=PasscodeChannels(settings, messenger),
    )
