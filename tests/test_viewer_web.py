"""The web viewer's pages and pixels over the real app (aiohttp test server, real Services).

Who may view what (recipient: own open transactions; others' IDs 404, gone ones
410; staff: any transaction), the display order, the frames' bytes against
:mod:`iepnode.viewing.rendering`, the caching headers, and the one audit event per study.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid

from iepnode.services import Services
from iepnode.sharing import transactions as tx
from iepnode.viewing import rendering
from iepnode.viewing.pixel_values import window_linear
from storage.models import AuditEvent
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.support.ingest import store_files
from tests.test_admin_web import log_in as staff_log_in
from tests.test_admin_web import make_user
from tests.test_recipient_web import log_in, page_csrf, share


def distinct_ct(directory: Path, n: int, **overrides: Any) -> list[Path]:
    """A CT series whose slices differ (slice i is the ramp plus 100*i), 32x32."""
    paths = factory.make_ct_series(directory, n, rows=32, columns=32, **overrides)
    for i, path in enumerate(paths):
        ds = dcmread(path)
        values = (np.arange(32 * 32, dtype=np.uint16) * 3 + 100 * i).reshape(32, 32)
        ds.PixelData = values.astype("<u2").tobytes()
        ds.save_as(path)
    return paths


@pytest.fixture
def two_studies(services: Services, tmp_path: Path) -> tuple[str, str, list[Path]]:
    """A newer CT (4 slices, stored in reverse order) and an older MR study of patient P1."""
    ct = distinct_ct(tmp_path / "ct", 4, PatientName="Doe^Jane", PatientID="P1",
                     PatientBirthDate="19700101", StudyDate="20240105",
                     StudyDescription="CT HEAD")
    newer = store_files(services, list(reversed(ct)))
    mr = factory.copy_bundled("MR_small.dcm", tmp_path / "mr", PatientID="P1",
                              PatientName="Doe^Jane", StudyDate="20200101",
                              StudyInstanceUID=generate_uid(), SOPInstanceUID=generate_uid())
    older = store_files(services, [mr])
    return newer, older, ct


async def test_recipient_views_own_studies_oldest_first(browser: Browser, services: Services,
                                                         two_studies) -> None:
    newer, older, ct = two_studies
    mine, token = share([newer, older], "me@example.org")
    base = f"/transactions/{mine.public_id}/view"
    anonymous = await browser.get(base)
    assert anonymous.status == 303 and anonymous.headers["Location"] == "/signin"
    await log_in(browser, services, token)

    dashboard = await browser.page("/dashboard")
    assert f'href="{base}"' in dashboard  # the View button beside the studies
    page = await browser.page(base)
    assert "Review only. Not for diagnostic use." in page
    assert '<script src="/static/viewer.js">' in page and f'data-api="{base}"' in page

    manifest = await (await browser.get(f"{base}/manifest.json")).json()
    assert [s["uid"] for s in manifest["studies"]] == [older, newer]  # oldest first
    assert manifest["patient"]["id"] == "P1" and manifest["patient"]["name"] == "DOE, Jane"
    (series,) = manifest["studies"][1]["series"]
    numbers = [i["number"] for i in series["instances"]]
    assert numbers == ["1", "2", "3", "4"]  # instance number order, not arrival order
    assert series["frames"] == 4

    # frame 1 of slice 3: the raw values equal the stored file's modality values
    uid = series["instances"][2]["uid"]
    response = await browser.get(f"{base}/instances/{uid}/frames/1.raw")
    assert response.status == 200
    assert "immutable" in response.headers["Cache-Control"]
    info = json.loads(response.headers["X-Frame-Info"])
    assert info["dtype"] == "int16" and (info["rows"], info["columns"]) == (32, 32)
    values = np.frombuffer(await response.read(), "<i2").reshape(32, 32)
    np.testing.assert_array_equal(values, rendering.decode_frame(ct[2]).values)
    etag = response.headers["ETag"]
    again = await browser.get(f"{base}/instances/{uid}/frames/1.raw",
                              headers={"If-None-Match": etag})
    assert again.status == 304 and again.headers["ETag"] == etag

    png = await browser.get(f"{base}/instances/{uid}/frames/1.png?window=40,400")
    assert png.status == 200 and png.headers["Content-Type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(await png.read())))
    np.testing.assert_array_equal(
        image, window_linear(rendering.decode_frame(ct[2]).values, 40, 400))
    thumb = await browser.get(f"{base}/instances/{uid}/thumbnail.jpg")
    assert thumb.status == 200 and (await thumb.read())[:2] == b"\xff\xd8"
    assert (await browser.get(f"{base}/instances/{uid}/frames/2.raw")).status == 422
    reduced = await browser.get(f"{base}/instances/{uid}/frames/1.raw?max=64")
    assert json.loads(reduced.headers["X-Frame-Info"])["factor"] == 1  # 32 fits in 64
    assert (await browser.get(f"{base}/instances/{uid}/frames/1.raw?max=9")).status == 400

    # one audit event per study opened; none per frame
    assert (await browser.get(f"{base}/opened?study={older}")).status == 204
    events = list(AuditEvent.select().where(AuditEvent.action == "view-images"))
    assert len(events) == 1
    assert (events[0].event_code, events[0].study_uid, events[0].actor_kind) == (
        "110103", older, "recipient")
    assert events[0].transaction_public_id == mine.public_id


async def test_the_window_is_checked_and_names_the_etag_by_value(
        browser: Browser, services: Services, two_studies) -> None:
    newer, _, _ = two_studies
    mine, token = share([newer], "me@example.org")
    base = f"/transactions/{mine.public_id}/view"
    await log_in(browser, services, token)
    manifest = await (await browser.get(f"{base}/manifest.json")).json()
    uid = manifest["studies"][0]["series"][0]["instances"][0]["uid"]
    frame = f"{base}/instances/{uid}/frames/1.png"

    # float() would accept most of these (spaces, CRLF, nan, inf); all are refused.
    for bad in ("40%0D%0A,400", "%2040,400", "nan,400", "40,inf", "-inf,400", "1e999,400",
                "40", "40,400,1"):
        refused = await browser.get(f"{frame}?window={bad}")
        assert refused.status == 400, bad
        assert "ETag" not in refused.headers

    plain = await browser.get(f"{frame}?window=40,400")
    dotted = await browser.get(f"{frame}?window=40.0,400.0")
    other = await browser.get(f"{frame}?window=40,401")
    assert plain.status == dotted.status == other.status == 200
    assert plain.headers["ETag"] == dotted.headers["ETag"]
    assert await plain.read() == await dotted.read()
    assert other.headers["ETag"] != plain.headers["ETag"]
    cached = await browser.get(f"{frame}?window=40.00,4e2",
                               headers={"If-None-Match": plain.headers["ETag"]})
    assert cached.status == 304, (cached.headers.get("ETag"), plain.headers["ETag"])


async def test_a_frame_reads_the_recipient_once(browser: Browser, services: Services,
                                                two_studies, caplog) -> None:
    # Hundreds of frames per series: the audit actor (the recipient's email) is built
    # only by /opened, so a frame reads the recipient row once (to check access).
    newer, _, _ = two_studies
    mine, token = share([newer], "me@example.org")
    base = f"/transactions/{mine.public_id}/view"
    await log_in(browser, services, token)
    manifest = await (await browser.get(f"{base}/manifest.json")).json()
    uid = manifest["studies"][0]["series"][0]["instances"][0]["uid"]

    def recipient_reads() -> int:
        return sum(1 for r in caplog.records
                   if r.name == "peewee" and 'FROM "recipient"' in r.getMessage())

    with caplog.at_level(logging.DEBUG, logger="peewee"):
        frame = await browser.get(f"{base}/instances/{uid}/frames/1.raw")
        assert frame.status == 200
        assert recipient_reads() == 1
        caplog.clear()
        opened = await browser.get(f"{base}/opened?study={newer}")
        assert opened.status == 204
        assert recipient_reads() == 2  # access check, then the actor's email
    (event,) = AuditEvent.select().where(AuditEvent.action == "view-images")
    assert (event.actor, event.actor_kind) == ("me@example.org", "recipient")


async def test_others_ids_are_not_found_and_closed_transactions_gone(
        browser: Browser, services: Services, two_studies, tmp_path: Path) -> None:
    newer, older, _ = two_studies
    mine, token = share([newer], "me@example.org")
    theirs, _ = share([older], "them@example.org")
    declined, _ = share([newer], "me@example.org")
    expired, _ = share([newer], "me@example.org", now=time.time() - 20 * tx.DAY)
    await log_in(browser, services, token)
    base = f"/transactions/{mine.public_id}/view"
    manifest = await (await browser.get(f"{base}/manifest.json")).json()
    uid = manifest["studies"][0]["series"][0]["instances"][0]["uid"]
    older_uid = (await _instance_uids(services, older))[0]
    for url in (f"/transactions/{theirs.public_id}/view",
                f"/transactions/{theirs.public_id}/view/manifest.json",
                f"/transactions/{theirs.public_id}/view/instances/{older_uid}/frames/1.raw",
                f"{base}/instances/{older_uid}/frames/1.raw",  # not in this transaction
                f"{base}/instances/{older_uid}/thumbnail.jpg",
                f"{base}/opened?study={older}",
                f"{base}/instances/1.2.3/frames/1.raw",
                f"{base}/instances/{uid}/frames/0.raw",
                "/transactions/IEP00000000/view"):
        response = await browser.get(url)
        assert response.status == 404, url
    csrf = await page_csrf(browser)
    assert (await browser.post(f"/transactions/{declined.public_id}/decline",
                               data={"csrf": csrf, "reason": "not mine"})).status == 303
    for gone, words in ((declined, "declined"), (expired, "expired")):
        for path in ("view", "view/manifest.json", f"view/instances/{uid}/frames/1.raw"):
            response = await browser.get(f"/transactions/{gone.public_id}/{path}")
            assert response.status == 410, (gone, path)
            assert words in await response.text()
    dashboard = await browser.page("/dashboard?tab=all")
    assert dashboard.count("/view\"") == 1  # only the open transaction offers View


async def _instance_uids(services: Services, study_uid: str) -> list[str]:
    from storage.models import Instance, Series, Study
    return [i.sop_uid for i in Instance.select().join(Series).join(Study)
            .where(Study.study_uid == study_uid)]


async def test_staff_view_any_transaction(browser: Browser, services: Services,
                                          two_studies) -> None:
    newer, older, _ = two_studies
    transaction, _ = share([newer, older], "me@example.org")
    base = f"/admin/transactions/{transaction.public_id}/view"
    assert (await browser.get(base)).status == 303  # to the staff login
    _, secret = make_user("radiographer")
    assert (await staff_log_in(browser, "radiographer", secret)).status == 303
    staff_page = await browser.page(f"/admin/transactions/{transaction.public_id}")
    assert f'href="{base}"' in staff_page
    page = await browser.page(base)
    assert "Review only. Not for diagnostic use." in page
    manifest = await (await browser.get(f"{base}/manifest.json")).json()
    assert len(manifest["studies"]) == 2
    uid = manifest["studies"][0]["series"][0]["instances"][0]["uid"]
    assert (await browser.get(f"{base}/instances/{uid}/frames/1.raw")).status == 200
    assert (await browser.get(f"{base}/opened?study={newer}")).status == 204
    (event,) = AuditEvent.select().where(AuditEvent.action == "view-images")
    assert event.actor_kind == "staff" and event.actor == "radiographer"
    # a staff session is not a recipient's: the recipient URLs still ask for sign-in
    response = await browser.get(f"/transactions/{transaction.public_id}/view")
    assert response.status == 303 and response.headers["Location"] == "/signin"


async def test_multi_frame_colour_lists_frames_and_serves_rgb(browser: Browser,
                                                              services: Services,
                                                              tmp_path: Path) -> None:
    path = factory.copy_bundled("SC_rgb_rle_2frame.dcm", tmp_path / "mf", PatientID="P7",
                                StudyInstanceUID=generate_uid(), SOPInstanceUID=generate_uid())
    study = store_files(services, [path])
    transaction, token = share([study], "me@example.org")
    await log_in(browser, services, token)
    base = f"/transactions/{transaction.public_id}/view"
    manifest = await (await browser.get(f"{base}/manifest.json")).json()
    (series,) = manifest["studies"][0]["series"]
    (instance,) = series["instances"]
    assert instance["frames"] == 2 and series["frames"] == 2  # cine over the frames
    response = await browser.get(f"{base}/instances/{instance['uid']}/frames/2.raw")
    info = json.loads(response.headers["X-Frame-Info"])
    assert info["dtype"] == "rgb8" and info["frames"] == 2
    rgb = np.frombuffer(await response.read(), np.uint8).reshape(info["rows"], info["columns"], 3)
    np.testing.assert_array_equal(rgb, dcmread(path).pixel_array[1])
