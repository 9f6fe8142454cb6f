"""``iepnode user``, and who an admin command acts as (the audit trail's actor)."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from config import Settings
from iepnode.people import passwords


def cli_actor() -> Any:  # -> iepnode.people.audit.Actor
    """Who the audit trail names for an admin command: the operating-system user."""
    from iepnode.people.audit import Actor

    return Actor("cli", getpass.getuser())


def cmd_user(args: argparse.Namespace, settings: Settings) -> int:
    """``iepnode user add|unlock``: create a staff user, or unlock a recipient."""
    from iepnode.wiring import build_services

    staff_side = build_services(settings).admin
    if args.user_command == "unlock":
        email = staff_side.transactions.unlock_recipient_email(args.email, cli_actor())
        print(f"unlocked {email}")
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password ({passwords.MIN_LENGTH}+ characters): ")
        if getpass.getpass("Again: ") != password:
            print("iepnode: the passwords differ", file=sys.stderr)
            return 1
    user, uri = staff_side.accounts.add_user(
        args.username, password, is_admin=args.admin, display_name=args.name,
        email=args.email, department=args.department, phone=args.phone, user=cli_actor())
    print(f"created {'admin' if user.is_admin else 'staff user'} {user.username}")
    print("Add this to an authenticator app (it is shown only now):")
    print(uri)
    return 0


def acting_user(username: str | None):  # -> tuple[StaffUser | None, bool]
    """The staff user named by ``--as-user`` (``None`` without it); ``False`` if unknown."""
    from storage.models import StaffUser

    if not username:
        return None, True
    user = StaffUser.get_or_none(StaffUser.username == username.strip().lower())
    if user is None:
        print(f"iepnode: no staff user {username}", file=sys.stderr)
    return user, user is not None
