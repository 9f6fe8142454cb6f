"""``iepnode request``: ask an individual to upload images they hold."""

from __future__ import annotations

import argparse
import getpass

from config import Settings
from iepnode.cli.people import acting_user
from iepnode.cli.sharing import warn_if_channel_kept


def cmd_request(args: argparse.Namespace, settings: Settings) -> int:
    """``iepnode request create``: ask an individual for images; print its ID."""
    import asyncio

    from iepnode.people import audit
    from iepnode.uploads.image_requests import NewRequest
    from iepnode.wiring import build_services

    node = build_services(settings)
    user, known = acting_user(args.as_user)
    if not known:
        return 1
    request = NewRequest(
        recipient_email=args.to, patient_family_name=args.last_name,
        patient_given_name=args.first_name, patient_birth_date=args.birth_date,
        patient_sex=args.sex or "", patient_id=args.patient_id,
        patient_id_issuer=args.issuer, nhs_number=args.nhs_number, reason=args.reason,
        message=args.message, otp_mobile=args.otp_mobile or "",
        otp_email=args.otp_email or "", recipient_name=args.name, priority=args.priority,
        expiry_days=args.expiry_days or settings.transaction_expiry_days,
    )
    actor = audit.Actor("cli", user.username if user else getpass.getuser())
    transaction = asyncio.run(node.requests.create_request(request, actor=actor, user=user))
    warn_if_channel_kept(transaction, request.otp_mobile, request.otp_email)
    print(transaction.public_id)
    return 0
