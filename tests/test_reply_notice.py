"""A staff reply emails the recipient a note to sign in (never the message); a mail failure
loses nothing.

The node's app runs in-process; mail goes to a real SMTP server (aiosmtpd) or, for the
failure, to a port where nothing listens. Staff and recipients use the cookie-keeping
clients of the staff and recipient page tests.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp

from iepnode.people import audit
from iepnode.services import Services
from iepnode.sharing.transactions import NewTransfer
from iepnode.wiring import build_services
from storage.models import AuditEvent, Transaction, TransactionMessage
from tests import data_factory as factory
from tests.support.mail import Inbox
from tests.test_admin_web import log_in as staff_log_in
from tests.test_admin_web import make_user
from tests.test_recipient_web import (
    Browser,
    log_in,
    make_settings,
    outbox,
    share,
    store,
)
from web.app import create_app

SECRET_NEWS = "Your biopsy result is benign."


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def staff_client(aiohttp_client: Any, services: Services) -> tuple[Any, Browser]:
    services.admin.logins.failure_delay = 0.0
    client = await aiohttp_client(create_app(services.settings, services),
                                  cookie_jar=aiohttp.DummyCookieJar())
    staff = Browser(client)
    _, secret = make_user("nurse", display_name="Nurse Kim")
    assert (await staff_log_in(staff, "nurse", secret)).status == 303
    return client, staff


def notify_events() -> list[AuditEvent]:
    return list(AuditEvent.select().where(AuditEvent.action == "message-notify")
                .order_by(AuditEvent.id))


async def test_a_staff_reply_emails_the_recipient_to_sign_in_and_not_the_message(
        aiohttp_client: Any, tmp_path: Path, smtp: Inbox) -> None:
    services = build_services(make_settings(tmp_path, smtp_host="127.0.0.1", smtp_port=smtp.port,
                              smtp_tls="none"))
    study = store(services, factory.make_ct_series(tmp_path / "ct", 1, PatientName="Doe^Jane",
                                               PatientID="MRN4711"))
    created = await services.sharing.share(NewTransfer((study,), "pat@example.org",
                                           otp_mobile="+447700900123"),
                               actor=audit.Actor("cli", "t"))
    client, staff = await staff_client(aiohttp_client, services)
    url = f"/admin/transactions/{created.public_id}"

    response = await staff.form(f"{url}/messages", {"body": SECRET_NEWS})
    assert response.status == 303
    assert response.headers["Location"] == f"{url}?done=replied#messages"
    page = await staff.page(response.headers["Location"])
    assert "the recipient was emailed to sign in" in page and 'class="alert info"' in page

    transfer_mail, notice = smtp.messages
    assert notice["To"] == "pat@example.org" and notice["X-Iepnode-Kind"] == "message-notice"
    assert notice["Subject"] == (
        f"St Elsewhere: a new message about your images ({created.public_id})")
    text = notice.get_content()
    assert f"https://portal.example/transactions/{created.public_id}" in text
    assert f'"St Elsewhere: images are ready for you ({created.public_id})"' in text
    assert transfer_mail["Subject"] in text  # the email whose link signs in
    for private in ("biopsy", "benign", "Doe", "Jane", "JANE", "MRN4711", "/t/"):
        assert private not in text and private not in notice["Subject"], private
    (event,) = notify_events()
    assert (event.outcome, event.actor, event.detail) == (0, "nurse", "email to pat@example.org")
    assert event.transaction_public_id == created.public_id

    # The link in the note: without a session it explains how to sign in; after the
    # usual sign-in (link from the transfer email + passcode) it shows the message.
    recipient = Browser(client)
    response = await recipient.get(f"/transactions/{created.public_id}")
    assert response.status == 303 and response.headers["Location"] == "/signin"
    assert "open the link in your email again" in await recipient.page("/signin")
    token = re.search(r"/t/([A-Za-z0-9_-]+)", transfer_mail.get_content()).group(1)  # type: ignore[union-attr]
    await log_in(recipient, services, token)
    assert SECRET_NEWS in await recipient.page(f"/transactions/{created.public_id}")


async def test_a_reply_whose_email_fails_is_kept_and_staff_are_told(
        aiohttp_client: Any, tmp_path: Path) -> None:
    services = build_services(make_settings(tmp_path, smtp_host="127.0.0.1",
                                            smtp_port=closed_port(),
                                            smtp_tls="none", smtp_timeout=2.0))
    study = store(services, factory.make_ct_series(tmp_path / "ct", 1))
    transaction, _ = share([study])
    _, staff = await staff_client(aiohttp_client, services)
    url = f"/admin/transactions/{transaction.public_id}"

    response = await staff.form(f"{url}/messages", {"body": SECRET_NEWS})
    assert response.status == 303
    assert response.headers["Location"] == f"{url}?done=replied-failed#messages"
    (message,) = TransactionMessage.select()
    assert (message.body, message.author_kind, message.author) == (SECRET_NEWS, "staff",
                                                                   "Nurse Kim")
    page = await staff.page(response.headers["Location"])
    assert 'class="alert error"' in page and "could not be sent" in page
    assert SECRET_NEWS in page  # in the thread
    (event,) = notify_events()
    assert event.outcome == audit.SERIOUS_FAILURE
    assert event.detail.startswith("email to pat@example.org failed: ")
    assert SECRET_NEWS not in event.detail
    assert [e.detail for e in AuditEvent.select().where(AuditEvent.action == "message")] == [
        "staff reply"]


async def test_no_email_for_a_reply_on_an_expired_transaction(aiohttp_client: Any,
                                                              tmp_path: Path) -> None:
    services = build_services(make_settings(tmp_path))
    study = store(services, factory.make_ct_series(tmp_path / "ct", 1))
    transaction, _ = share([study])
    before = outbox(services)
    Transaction.update(expires_at=time.time() - 1).where(
        Transaction.id == transaction.id).execute()
    _, staff = await staff_client(aiohttp_client, services)
    url = f"/admin/transactions/{transaction.public_id}"

    response = await staff.form(f"{url}/messages", {"body": "Ask us for a new link."})
    assert response.headers["Location"] == f"{url}?done=replied-expired#messages"
    assert outbox(services) == before
    assert TransactionMessage.select().count() == 1
    assert "the transaction has expired" in await staff.page(response.headers["Location"])
    (event,) = notify_events()
    assert event.outcome == audit.MINOR_FAILURE and "expired" in event.detail
