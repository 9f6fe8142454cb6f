# ruff: noqa: F811 - the staff page tests' fixtures are imported and used by name
"""Sending to DICOM nodes from the web pages: staff, recipients allowed by staff, routing.

In-process app over a :class:`Services` in ``tmp_path`` (fixtures of the staff page
tests); sends queued from the pages are then run by a real job runner against
dcmtk ``storescp``, and the JSON progress the page's script polls is checked.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from config import Settings
from iepnode.outbound import sending
from iepnode.services import Services
from iepnode.sharing import transactions
from iepnode.sharing.transactions import Contact, NewTransfer
from scp.sender import make_transport
from storage import registry
from storage.models import AuditEvent, RemoteAE, RouteRule, SendJob, TransactionSendAE
from tests.support.browser import Browser
from tests.support.peers import free_port, received, storescp_on
from tests.test_admin_web import (  # noqa: F401 - fixtures
    admin,
    events,
    log_in,
    make_user,
    services,
    settings,
    studies,
)
from tests.test_recipient_web import log_in as recipient_log_in


def share(study_uid: str, email: str = "pat@example.org") -> tuple[str, str]:
    """A transaction of ``study_uid`` for ``email``; return its ID and link token."""
    transaction, token = transactions.create_transfer(
        NewTransfer((study_uid,), email, otp_mobile="+447700900123"),
        contact=Contact("Dr Boss"), institution="St Elsewhere", created_by="boss")
    return transaction.public_id, token


@pytest.fixture
def destinations() -> None:
    registry.add_remote_ae("DEST", "127.0.0.1", 104, set(), send_to=True)
    registry.add_remote_ae("PACSONLY", "127.0.0.1", 105, {"store"})


async def test_staff_send_from_the_transaction_page_with_live_progress(
        admin: Browser, services: Services, studies: dict[str, str], destinations: None,
        tmp_path: Path) -> None:
    public_id, _ = share(studies["jane"])
    page = await admin.page(f"/admin/transactions/{public_id}")
    assert "Send to DICOM node" in page and '<script src="/static/sends.js"' in page
    assert re.findall(r'<option value="([^"]+)">', page) == ["DEST"]
    assert "No sends yet." in page

    refused = await admin.form(f"/admin/transactions/{public_id}/send",
                               {"ae_title": "PACSONLY"})
    assert refused.status == 400 and "not a send destination" in await refused.text()
    no_token = await admin.post(f"/admin/transactions/{public_id}/send",
                                data={"ae_title": "DEST"})
    assert no_token.status == 403
    assert SendJob.select().count() == 0

    response = await admin.form(f"/admin/transactions/{public_id}/send", {"ae_title": "DEST"})
    assert response.status == 303
    assert response.headers["Location"].endswith("done=send-queued#send")
    (job,) = SendJob.select()
    assert (job.ae_title, job.total, job.state, job.requester_kind, job.requested_by) == (
        "DEST", 3, "queued", "staff", "boss")
    (queued,) = events("dicom-send-queued")
    assert (queued.event_code, queued.actor, queued.transaction_public_id) == (
        "110106", "boss", public_id)

    url = f"/admin/sends.json?transaction={public_id}"
    (shown,) = (await (await admin.get(url)).json())["jobs"]
    assert (shown["state"], shown["sent"], shown["total"], shown["finished"]) == (
        "queued", 0, 3, False)
    assert f'data-sends-url="{url}"' in await admin.page(f"/admin/transactions/{public_id}")

    # The job runs for real: the node's runner sends to dcmtk storescp.
    port = free_port()
    RemoteAE.update(port=port).where(RemoteAE.ae_title == "DEST").execute()
    with storescp_on(port, tmp_path / "got"):
        ran = services.sends.job_runner(make_transport(services.settings)).run_one()
    assert ran is not None and ran.state == "done"
    assert len(received(tmp_path / "got")) == 3
    (shown,) = (await (await admin.get(url)).json())["jobs"]
    assert (shown["state"], shown["sent"], shown["finished"]) == ("done", 3, True)
    (transferred,) = events("dicom-send")
    assert (transferred.event_code, transferred.outcome, transferred.study_uid) == (
        "110104", 0, studies["jane"])
    assert "3 of 3 instances sent" in transferred.detail
    listing = await admin.page("/admin/sends")
    assert "#1" in listing and "3 / 3" in listing
    assert (await admin.get("/admin/sends.json?transaction=../x")).status == 404


async def test_recipient_sends_only_where_staff_allowed(
        admin: Browser, services: Services, studies: dict[str, str], destinations: None,
        client: Any) -> None:
    public_id, token = share(studies["jane"])
    other_id, _ = share(studies["john"], "someone@example.org")
    patient = Browser(client)
    await recipient_log_in(patient, services, token)
    page = await patient.page("/dashboard?tab=all")
    assert "Send to PACS" not in page

    allowed = await admin.form(f"/admin/transactions/{public_id}/recipient-send",
                               [("ae_title", "DEST")])
    assert allowed.status == 303
    assert [r.ae_title for r in TransactionSendAE.select()] == ["DEST"]
    wrong = await admin.form(f"/admin/transactions/{public_id}/recipient-send",
                             [("ae_title", "PACSONLY")])
    assert wrong.status == 400
    assert any("recipient may send to: DEST" in e.detail for e in events("admin-change"))

    page = await patient.page("/dashboard?tab=all")
    assert "Send to PACS" in page and '<option value="DEST">DEST</option>' in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    sent = await patient.post(f"/transactions/{public_id}/send",
                              data={"csrf": csrf, "ae_title": "DEST", "tab": "all"})
    assert sent.status == 303
    (job,) = SendJob.select()
    assert (job.requester_kind, job.requested_by, job.transaction_public_id) == (
        "recipient", "pat@example.org", public_id)
    assert "Sent to DEST: queued, 0 of 3 images" in await patient.page("/dashboard?tab=all")

    not_offered = await patient.post(f"/transactions/{public_id}/send",
                                     data={"csrf": csrf, "ae_title": "PACSONLY"})
    assert not_offered.status == 400
    someone_elses = await patient.post(f"/transactions/{other_id}/send",
                                       data={"csrf": csrf, "ae_title": "DEST"})
    assert someone_elses.status == 404
    no_token = await patient.post(f"/transactions/{public_id}/send", data={"ae_title": "DEST"})
    assert no_token.status == 403
    assert SendJob.select().count() == 1

    # Taking the permission away takes the button away.
    await admin.form(f"/admin/transactions/{public_id}/recipient-send", [])
    assert '<option value="DEST">' not in await patient.page("/dashboard?tab=all")


async def test_admins_manage_routing_rules_and_destinations(
        admin: Browser, destinations: None, client: Any) -> None:
    page = await admin.page("/admin/routes")
    assert "No routing rule" in page
    added = await admin.form("/admin/routes", {"calling_ae": "PACS", "accession_prefix": "RAD",
                                               "modality": "ct", "destination": "DEST"})
    assert added.status == 303
    (rule,) = RouteRule.select()
    assert (rule.calling_ae, rule.accession_prefix, rule.modality, rule.destination) == (
        "PACS", "RAD", "CT", "DEST")
    assert "RAD" in await admin.page("/admin/routes")
    bad = await admin.form("/admin/routes", {"destination": "PACSONLY"})
    assert bad.status == 400 and "not a send destination" in await bad.text()
    assert (await admin.form(f"/admin/routes/{rule.id}/remove", {})).status == 303
    assert RouteRule.select().count() == 0

    saved = await admin.form("/admin/aes", [("ae_title", "NEWPACS"), ("host", "10.0.0.9"),
                                            ("port", "104"), ("send_to", "1")])
    assert saved.status == 303
    assert RemoteAE.get(RemoteAE.ae_title == "NEWPACS").send_to
    await admin.form("/admin/aes", [("ae_title", "NEWPACS"), ("host", "10.0.0.9"),
                                    ("port", "104")])
    assert not RemoteAE.get(RemoteAE.ae_title == "NEWPACS").send_to

    _, secret = make_user("clerk")
    clerk = Browser(client)
    clerk.cookies.clear()
    await log_in(clerk, "clerk", secret)
    assert (await clerk.get("/admin/routes")).status == 403
    assert (await clerk.get("/admin/sends")).status == 200


def test_nothing_to_send_is_refused(services: Services, destinations: None,
                                    settings: Settings) -> None:
    from iepnode.errors import InvalidRequest, UnknownDestination
    from iepnode.people.audit import Actor

    with pytest.raises(InvalidRequest, match="none of these studies"):
        sending.queue_job(["1.2.3.4"], "DEST", Actor("cli", "t"))
    with pytest.raises(UnknownDestination, match="not registered"):
        sending.queue_job(["1.2.3.4"], "NOBODY", Actor("cli", "t"))
    assert AuditEvent.select().count() == 0
    assert isinstance(aiohttp.__version__, str)
