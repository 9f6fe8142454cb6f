"""Every recipient page asks for a recipient session the same way (web.common.recipient_session).

No session, or a staff session (signed in at /admin, no recipient): a 303 to /signin,
whatever the page (dashboard, transaction, downloads, reports, upload, forward, viewer,
DICOMweb keys). Upload's script API answers 403 JSON instead (a script cannot follow a
redirect to a sign-in page), and is checked here too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from iepnode.services import Services
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.support.ingest import store_files
from tests.test_admin_web import log_in as staff_log_in
from tests.test_admin_web import make_user
from tests.test_recipient_web import field, share
from web.common import recipient_session

PAGES = ("/dashboard", "/account/authenticator", "/transactions/{id}",
         "/transactions/{id}/download", "/transactions/{id}/reports",
         "/transactions/{id}/attachments", "/transactions/{id}/upload",
         "/transactions/{id}/forward", "/transactions/{id}/forwards",
         "/transactions/{id}/view", "/transactions/{id}/view/manifest.json",
         "/downloads/0123456789abcdef")


@pytest.fixture
def public_id(services: Services, tmp_path: Path) -> str:
    study = store_files(services, factory.make_ct_series(tmp_path / "ct", 1, PatientID="P1"))
    transaction, _ = share([study], "me@example.org")
    return transaction.public_id


async def check_every_page_sends_to_signin(browser: Browser, public_id: str) -> None:
    for page in PAGES:
        response = await browser.get(page.format(id=public_id))
        assert (response.status, response.headers.get("Location")) == (303, "/signin"), page
    api = await browser.get(f"/transactions/{public_id}/upload/files/1")
    assert api.status == 403 and (await api.json()) == {"error": "not signed in"}


async def test_no_session_is_sent_to_signin(browser: Browser, public_id: str) -> None:
    await check_every_page_sends_to_signin(browser, public_id)


async def test_a_staff_session_is_no_recipient_session(browser: Browser, services: Services,
                                                       public_id: str) -> None:
    _, secret = make_user("alice")
    signed_in = await staff_log_in(browser, "alice", secret)
    assert signed_in.status == 303 and signed_in.headers["Location"] == "/admin"
    await check_every_page_sends_to_signin(browser, public_id)
    # POSTs too (past the CSRF check: the staff session's own token).
    csrf = field(await browser.page("/admin"), "csrf")
    for path in ("dicomweb-token", "dicomweb-token/revoke"):
        response = await browser.post(f"/transactions/{public_id}/{path}",
                                      data={"csrf": csrf})
        assert (response.status, response.headers.get("Location")) == (303, "/signin"), path


def test_recipient_session_is_the_one_helper() -> None:
    # The copies it replaced are gone (dicomweb_pages imported a private one).
    import web.download
    import web.forward
    import web.recipient
    import web.reports
    import web.upload

    for module in (web.download, web.forward, web.recipient, web.reports, web.upload):
        assert not hasattr(module, "_recipient_session") and not hasattr(module, "_session")
        assert module.recipient_session is recipient_session
