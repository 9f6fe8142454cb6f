"""``iepnode transfer``, ``recipient`` and ``export``: sharing studies with recipients."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from config import Settings
from iepnode.cli.people import acting_user
from iepnode.rules.identifiers import is_public_id


def cmd_transfer(args: argparse.Namespace, settings: Settings) -> int:
    """``iepnode transfer create``: share studies with a recipient; print its ID."""
    import asyncio

    from iepnode.people import audit
    from iepnode.sharing.transactions import NewTransfer
    from iepnode.wiring import build_services

    node = build_services(settings)
    user, known = acting_user(args.as_user)
    if not known:
        return 1
    request = NewTransfer(
        study_uids=tuple(args.studies), recipient_email=args.to,
        otp_mobile=args.otp_mobile or "", otp_email=args.otp_email or "",
        recipient_name=args.name, message=args.message, priority=args.priority,
        expiry_days=args.expiry_days or settings.transaction_expiry_days,
        nhs_number=args.nhs_number,
    )
    actor = audit.Actor("cli", user.username if user else getpass.getuser())
    transaction = asyncio.run(node.sharing.share(request, actor=actor, user=user))
    warn_if_channel_kept(transaction, request.otp_mobile, request.otp_email)
    print(transaction.public_id)
    return 0


def warn_if_channel_kept(transaction: Any, otp_mobile: str, otp_email: str) -> None:
    """Tell the user on stderr that an existing recipient kept their passcode channel."""
    from iepnode.sharing import recipients

    kept = recipients.kept_instead(transaction.recipient, otp_mobile, otp_email)
    if kept:
        email = transaction.recipient.email
        print(f"iepnode: warning: {email} already has an account: their passcodes still go "
              f"to their {kept.masked}; the channel given was not used. To change it "
              f"(an administrator, or the contact of a transaction they signed in through): "
              f"iepnode recipient channel {email} --otp-mobile NUMBER|--otp-email EMAIL "
              f"--as-user USERNAME, or the staff page of that transaction.", file=sys.stderr)


def cmd_recipient(args: argparse.Namespace, settings: Settings) -> int:
    """``iepnode recipient channel``: change where a recipient's passcodes go."""
    import asyncio

    from iepnode.wiring import build_services

    node = build_services(settings)
    user, known = acting_user(args.as_user)
    if not known:
        return 1
    changed = asyncio.run(node.admin.channels.change_passcode_channel(
        args.email, args.otp_mobile or "", args.otp_email or "", user,
        source_ip=f"cli:{getpass.getuser()}"))
    print(f"passcodes of {changed.email} now go to their {changed.new.masked}; their open "
          f"sessions and unused passcodes have ended")
    if not changed.notified:
        print("iepnode: warning: the notice to their old channel could not be sent (see the "
              "log and the audit trail)", file=sys.stderr)
        return 3
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    """``iepnode export``: write the download zip of a transaction or study."""
    import os

    from tqdm import tqdm

    from iepnode.logs import setup_logging
    from iepnode.people import audit
    from iepnode.sharing import downloads
    from iepnode.wiring import build_services

    setup_logging(settings, process_name="export", to_stderr=False)
    node = build_services(settings)
    is_transaction = is_public_id(args.what)
    pkg = (node.downloads.transaction_package(args.what) if is_transaction
           else node.downloads.study_package(args.what))
    out = args.out
    partial = out.with_name(out.name + ".part")
    password = downloads.new_password() if args.password else ""
    bar = tqdm(total=pkg.size, unit="B", unit_scale=True, unit_divisor=1024, desc="export",
               disable=args.no_progress, file=sys.stderr)
    try:
        if password:
            downloads.write_protected(pkg, partial, password, progress=bar.update)
        else:
            with open(partial, "wb") as fh:
                downloads.write_zip(pkg.layout, fh, progress=bar.update)
        os.replace(partial, out)
    except OSError as exc:  # e.g. a stored file cut short while copied: no broken zip
        partial.unlink(missing_ok=True)
        bar.close()
        node.downloads.record_download(audit.Actor("cli", getpass.getuser()), pkg,
                             action="export-protected" if password else "export",
                             transaction=args.what if is_transaction else "",
                             outcome=audit.SERIOUS_FAILURE, detail=f"failed: {exc}")
        print(f"iepnode: export failed, nothing written: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    node.downloads.record_download(audit.Actor("cli", getpass.getuser()), pkg,
                         action="export-protected" if password else "export",
                         transaction=args.what if is_transaction else "",
                         detail=f"{out.stat().st_size} bytes written")
    print(f"wrote {out} ({out.stat().st_size} bytes, {pkg.instances} instances)")
    if pkg.left_out:
        print(f"left out {len(pkg.left_out)} instances whose stored files cannot be read "
              "(listed in the zip's README.TXT)", file=sys.stderr)
    if password:
        print(f"password: {password}")
        print("(shown only now; send it separately from the file)")
    return 0
