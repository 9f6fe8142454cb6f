"""DICOMweb (QIDO-RS / WADO-RS): what another viewer sees of a transaction, and nothing more.

The app runs in-process over a real :class:`Services` on a loopback aiohttp test
server. The peer is a real, independent DICOMweb client (``dicomweb-client``, run in
a thread: it is synchronous), plus raw HTTP to check PS3.18 media types, multipart
boundaries and part headers (parsed with the ``email`` package), metadata JSON
(read back with pydicom's ``Dataset.from_json``) and frames (byte-identical to the
stored pixel data).
"""

from __future__ import annotations

import asyncio
import base64
import html as html_lib
import io
import json
import re
import time
import urllib.parse
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame

from config import Settings
from iepnode.services import Services
from iepnode.sharing import transactions as tx
from iepnode.viewing import dicomweb_access
from iepnode.viewing import dicomweb_access as access
from iepnode.wiring import build_services
from storage.models import AuditEvent, Instance, Transaction
from tests import data_factory as factory
from tests.support.browser import Browser
from tests.support.ingest import store_files
from tests.test_admin_web import log_in as staff_log_in
from tests.test_admin_web import make_user
from tests.test_recipient_web import log_in, make_settings, share
from web.app import create_app

VIEWER = "https://viewer.example.org"
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "P1", "PatientBirthDate": "19800214",
           "PatientSex": "F"}


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return build_services(make_settings(tmp_path, dicomweb_cors_origins=(VIEWER,)))


@pytest.fixture
def studies(services: Services, tmp_path: Path) -> dict[str, str]:
    return make_studies(services, tmp_path)


def make_studies(services: Services, tmp_path: Path) -> dict[str, str]:
    """A CT study and a compressed (RLE, 2 frames) study of P1; a CT study of P2."""
    ct = store_files(services, factory.make_ct_series(
        tmp_path / "ct", 3, StudyDate="20240105", StudyDescription="CT HEAD",
        AccessionNumber="ACC1", **PATIENT))
    rle = store_files(services, [factory.copy_bundled(
        "SC_rgb_rle_2frame.dcm", tmp_path / "rle", StudyDate="20240301",
        StudyDescription="SC RLE", **PATIENT)])
    other = store_files(services, factory.make_ct_series(
        tmp_path / "other", 2, PatientName="Roe^Richard", PatientID="P2",
        StudyDate="20240110"))
    return {"ct": ct, "rle": rle, "other": other}


@pytest.fixture
def shared(studies: dict[str, str]) -> tuple[Transaction, str]:
    return share([studies["ct"], studies["rle"]])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def recipient_token(transaction: Transaction, **kw: Any) -> str:
    return access.issue_recipient_token(transaction.recipient_id, transaction.public_id, **kw).token


def dicomweb_client(client: Any, base: str, token: str) -> DICOMwebClient:
    return DICOMwebClient(url=str(client.make_url(base)), headers=bearer(token))


def parts(content_type: str, body: bytes) -> list[Any]:
    """The parts of a multipart body, parsed by the standard library's email package."""
    message = BytesParser(policy=policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    assert message.is_multipart(), content_type
    return list(message.iter_parts())


def reached(uri: str, public_url: str, served: str) -> str:
    """A link the node wrote (under its configured public URL), as the test reaches it.

    Links start with ``[portal] public_url`` whatever address the request came to; the
    tests' server listens elsewhere (an ephemeral loopback port), so the follower
    swaps the prefix, as a reverse proxy in front of the node would.
    """
    assert uri.startswith(public_url + "/dicomweb/"), uri
    return served.rstrip("/") + uri[len(public_url):]


def stored(sop_uid: str, services: Services) -> Path:
    return services.store.path(Instance.get(Instance.sop_uid == sop_uid).key)


def events(action: str) -> list[AuditEvent]:
    return list(AuditEvent.select().where(AuditEvent.action == action).order_by(AuditEvent.id))


# -- the real client ---------------------------------------------------------------------


async def test_a_dicomweb_client_searches_and_retrieves_one_transaction(
        client: Any, services: Services, studies: dict[str, str],
        shared: tuple[Transaction, str]) -> None:
    transaction, _ = shared
    base = f"/dicomweb/t/{transaction.public_id}"
    peer = dicomweb_client(client, base, recipient_token(transaction))

    found = await asyncio.to_thread(peer.search_for_studies)
    uids = {Dataset.from_json(s).StudyInstanceUID for s in found}
    assert uids == {studies["ct"], studies["rle"]}  # not P2's study: outside the transaction
    ct = Dataset.from_json(next(s for s in found
                                if s["0020000D"]["Value"][0] == studies["ct"]))
    assert str(ct.PatientName) == "Doe^Jane" and ct.AccessionNumber == "ACC1"
    assert ct.NumberOfStudyRelatedInstances == 3
    assert ct.RetrieveURL.endswith(f"{base}/studies/{studies['ct']}")

    series = await asyncio.to_thread(peer.search_for_series, studies["ct"])
    assert len(series) == 1
    series_uid = series[0]["0020000E"]["Value"][0]
    instances = await asyncio.to_thread(peer.search_for_instances, studies["ct"], series_uid)
    assert len(instances) == 3

    retrieved = await asyncio.to_thread(peer.retrieve_study, studies["ct"])
    assert len(retrieved) == 3
    for ds in retrieved:
        original = dcmread(stored(ds.SOPInstanceUID, services))
        assert ds.PixelData == original.PixelData

    metadata = await asyncio.to_thread(peer.retrieve_study_metadata, studies["ct"])
    assert len(metadata) == 3
    for item in metadata:
        assert item["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")
        # Valid DICOM JSON (PS3.18 F.2); pixel data fetched from its BulkDataURI.
        ds = await asyncio.to_thread(Dataset.from_json, item, lambda uri: bytes(
            peer.retrieve_bulkdata(reached(uri, services.settings.public_url,
                                           str(client.make_url("/"))))[0]))
        assert ds.StudyInstanceUID == studies["ct"]
        assert ds.PixelData == dcmread(stored(ds.SOPInstanceUID, services)).PixelData

    sop = instances[0]["00080018"]["Value"][0]
    frames = await asyncio.to_thread(peer.retrieve_instance_frames, studies["ct"], series_uid,
                                     sop, [1])
    assert frames == [dcmread(stored(sop, services)).PixelData]

    # One audit event per request, never one per instance.
    assert len(events("qido")) == 3
    transferred = events("wado-retrieve")
    assert len(transferred) == 1 and transferred[0].event_code == "110104"
    assert "3 of 3 instances" in transferred[0].detail
    assert transferred[0].transaction_public_id == transaction.public_id
    assert transferred[0].actor == "pat@example.org"
    assert [e.event_code for e in events("wado-metadata")] == ["110103"]


async def test_compressed_frames_come_as_stored(client: Any, services: Services,
                                               studies: dict[str, str],
                                               shared: tuple[Transaction, str]) -> None:
    transaction, _ = shared
    token = recipient_token(transaction)
    base = f"/dicomweb/t/{transaction.public_id}"
    rle = next(i for i in Instance.select() if i.transfer_syntax == "1.2.840.10008.1.2.5")
    series_uid = rle.series.series_uid
    url = f"{base}/studies/{studies['rle']}/series/{series_uid}/instances/{rle.sop_uid}/frames/2,1"
    stored_ds = dcmread(services.store.path(rle.key))

    response = await client.get(url, headers={
        **bearer(token), "Accept": 'multipart/related; type="image/dicom-rle"'})
    assert response.status == 200, await response.text()
    content_type = response.headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="image/dicom-rle"; boundary=')
    got = parts(content_type, await response.read())
    assert [p.get_content_type() for p in got] == ["image/dicom-rle"] * 2
    assert all(p["Content-Type"].params["transfer-syntax"] == "1.2.840.10008.1.2.5" for p in got)
    assert [p.get_payload(decode=True) for p in got] == [
        get_frame(stored_ds.PixelData, i, number_of_frames=2) for i in (1, 0)]

    # Native pixels cannot be given (no transcoding): 406, not some other bytes.
    refused = await client.get(url, headers={
        **bearer(token), "Accept": 'multipart/related; type="application/octet-stream"'})
    assert refused.status == 406
    anything = await client.get(url, headers={
        **bearer(token),
        "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    assert anything.status == 200
    beyond = await client.get(url.replace("2,1", "3"), headers=bearer(token))
    assert beyond.status == 404


async def test_frame_requests_are_audited_through_the_group_committer(
        client: Any, services: Services, studies: dict[str, str],
        shared: tuple[Transaction, str]) -> None:
    # A viewer fetches frames many at a time: each request keeps its own audit event,
    # but the events share commits (storage/group_commit.py) instead of one each.
    transaction, _ = shared
    token = recipient_token(transaction)
    base = f"/dicomweb/t/{transaction.public_id}"
    ct = [i for i in Instance.select() if i.series.study.study_uid == studies["ct"]]
    urls = [f"{base}/studies/{studies['ct']}/series/{i.series.series_uid}/instances/"
            f"{i.sop_uid}/frames/1" for i in ct] * 4
    jobs_before = services.group_commit.jobs
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'

    async def fetch(url: str) -> int:
        response = await client.get(url, headers={**bearer(token), "Accept": accept})
        await response.read()
        return response.status

    statuses = await asyncio.gather(*(fetch(u) for u in urls))
    assert statuses == [200] * len(urls)
    audited = events("wado-frames")
    assert len(audited) == len(urls)
    assert {e.transaction_public_id for e in audited} == {transaction.public_id}
    assert services.group_commit.jobs - jobs_before == len(urls)


# -- media types and multipart, raw ----------------------------------------------------


async def test_retrieve_is_multipart_related_per_ps3_18(client: Any, services: Services,
                                                        studies: dict[str, str],
                                                        shared: tuple[Transaction, str]) -> None:
    transaction, _ = shared
    token = recipient_token(transaction)
    base = f"/dicomweb/t/{transaction.public_id}"
    response = await client.get(f"{base}/studies/{studies['ct']}", headers={
        **bearer(token), "Accept": 'multipart/related; type="application/dicom"; '
                                   "transfer-syntax=*"})
    assert response.status == 200
    content_type = response.headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    body = await response.read()
    boundary = content_type.split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\n".encode())
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    got = parts(content_type, body)
    assert len(got) == 3
    for part in got:
        assert part.get_content_type() == "application/dicom"
        assert part["Content-Type"].params["transfer-syntax"] == "1.2.840.10008.1.2.1"
        data = part.get_payload(decode=True)
        sop = dcmread(io.BytesIO(data)).SOPInstanceUID
        assert data == stored(sop, services).read_bytes()  # the stored bytes, unchanged
        assert part["Content-Location"].endswith(f"/instances/{sop}")

    # A transfer syntax other than the stored one cannot be given: 406.
    other = await client.get(f"{base}/studies/{studies['ct']}", headers={
        **bearer(token), "Accept": 'multipart/related; type="application/dicom"; '
                                   "transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert other.status == 406
    json_only = await client.get(f"{base}/studies/{studies['ct']}/metadata", headers={
        **bearer(token), "Accept": "image/png"})
    assert json_only.status == 406

    search = await client.get(f"{base}/studies", headers=bearer(token))
    assert search.headers["Content-Type"].startswith("application/dicom+json")
    assert search.headers["Cache-Control"] == "no-store"


async def test_qido_matching_paging_and_warnings(client: Any, services: Services,
                                                 studies: dict[str, str]) -> None:
    await check_qido(client, studies)


@pytest.mark.postgres
async def test_qido_matching_on_postgresql(aiohttp_client: Any, tmp_path: Path,
                                           fresh_postgres_url: str) -> None:
    services = build_services(make_settings(tmp_path, database_url=fresh_postgres_url))
    try:
        studies = make_studies(services, tmp_path)
        client = await aiohttp_client(create_app(services.settings, services))
        await check_qido(client, studies)
    finally:
        services.database.close_all()


async def check_qido(client: Any, studies: dict[str, str]) -> None:
    """Matching (wildcards, ranges, tags), paging, includefield, warnings, bad keys."""
    user, _ = make_user("radiographer")
    token = access.issue_staff_token(user).token

    async def query(path: str) -> tuple[aiohttp.ClientResponse, list[dict]]:
        response = await client.get(path, headers=bearer(token))
        assert response.status in (200, 400), await response.text()
        return response, (json.loads(await response.text()) if response.status == 200 else [])

    def study_uids(rows: list[dict]) -> set[str]:
        return {r["0020000D"]["Value"][0] for r in rows}

    _, rows = await query("/dicomweb/studies")
    assert study_uids(rows) == set(studies.values())  # staff: every study
    _, rows = await query("/dicomweb/studies?PatientName=doe*")
    assert study_uids(rows) == {studies["ct"], studies["rle"]}
    _, rows = await query("/dicomweb/studies?StudyDate=20240101-20240131")
    assert study_uids(rows) == {studies["ct"], studies["other"]}
    _, rows = await query("/dicomweb/studies?00100020=P2")
    assert study_uids(rows) == {studies["other"]}
    _, first = await query("/dicomweb/studies?limit=2")
    _, rest = await query("/dicomweb/studies?limit=2&offset=2")
    assert len(first) == 2 and len(rest) == 1
    assert study_uids(first) | study_uids(rest) == set(studies.values())
    _, rows = await query("/dicomweb/studies?includefield=InstitutionName&PatientID=P2")
    assert "00080080" in rows[0]
    assert "00080080" not in (await query("/dicomweb/studies?PatientID=P2"))[1][0]
    response, rows = await query("/dicomweb/studies?PatientName=Doe&fuzzymatching=true"
                                 "&ScanningSequence=SE")
    warning = response.headers["Warning"]
    assert "fuzzymatching" in warning and "ScanningSequence" in warning
    assert warning.startswith("299 ")
    _, rows = await query("/dicomweb/series?Modality=CT")
    assert {r["0020000D"]["Value"][0] for r in rows} == {studies["ct"], studies["other"]}
    _, rows = await query(f"/dicomweb/studies/{studies['ct']}/instances")
    assert len(rows) == 3 and all(r["00083002"]["Value"] for r in rows)
    bad, _ = await query("/dicomweb/studies?NoSuchKeyword=1")
    assert bad.status == 400
    bad, _ = await query("/dicomweb/studies?limit=-1")
    assert bad.status == 400


# -- who sees what -----------------------------------------------------------------------


async def test_a_recipient_cannot_read_outside_their_transaction(
        client: Any, browser: Browser, services: Services, studies: dict[str, str],
        shared: tuple[Transaction, str]) -> None:
    transaction, link = shared
    other_transaction, _ = share([studies["other"]], email="someone@example.org")
    token = recipient_token(transaction)
    base = f"/dicomweb/t/{transaction.public_id}"
    other = studies["other"]
    for path in (f"{base}/studies/{other}", f"{base}/studies/{other}/metadata",
                 f"{base}/studies/{other}/series",
                 f"/dicomweb/t/{other_transaction.public_id}/studies",
                 "/dicomweb/studies", f"/dicomweb/studies/{studies['ct']}",
                 f"{base}/studies/1.2.3.4", "/dicomweb/t/IEP00000000/studies",
                 "/dicomweb/t/nonsense/studies"):
        response = await client.get(path, headers=bearer(token))
        assert response.status == 404, (path, response.status)
    rows = json.loads(await (await client.get(f"{base}/series?PatientID=P2",
                                              headers=bearer(token))).text())
    assert rows == []

    # The recipient's own session works under the transaction's base only.
    await log_in(browser, services, link)
    mine = await browser.get(f"{base}/studies")
    assert mine.status == 200 and len(json.loads(await mine.text())) == 2
    assert (await browser.get("/dicomweb/studies")).status == 404
    assert (await browser.get(f"/dicomweb/t/{other_transaction.public_id}/studies")
            ).status == 404


async def test_tokens_expire_and_can_be_revoked(client: Any, services: Services,
                                                studies: dict[str, str],
                                                shared: tuple[Transaction, str]) -> None:
    transaction, _ = shared
    base = f"/dicomweb/t/{transaction.public_id}/studies"
    anonymous = await client.get(base)
    assert anonymous.status == 401 and anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    expired = recipient_token(transaction, now=time.time() - 7200)
    assert (await client.get(base, headers=bearer(expired))).status == 401
    assert (await client.get(base, headers=bearer("x" * 43))).status == 401
    assert (await client.get(base, headers={"Authorization": "Basic dTpw"})).status == 401

    token = recipient_token(transaction)
    assert (await client.get(base, headers=bearer(token))).status == 200
    assert access.revoke_tokens(recipient_id=transaction.recipient_id,
                            public_id=transaction.public_id) == 1
    assert (await client.get(base, headers=bearer(token))).status == 401
    # Housekeeping deletes them a day later.
    assert dicomweb_access.purge_tokens() == 0
    assert access.purge_tokens(now=time.time() + 2 * 86400) == 2


async def test_a_declined_transaction_is_gone(client: Any, services: Services,
                                              studies: dict[str, str],
                                              shared: tuple[Transaction, str]) -> None:
    transaction, _ = shared
    token = recipient_token(transaction)
    tx.decline(transaction, "not mine")
    response = await client.get(f"/dicomweb/t/{transaction.public_id}/studies",
                                headers=bearer(token))
    assert response.status == 410


async def test_staff_session_sees_every_study(client: Any, browser: Browser, services: Services,
                                              studies: dict[str, str]) -> None:
    _, secret = make_user("radiographer")
    await staff_log_in(browser, "radiographer", secret)
    response = await browser.get("/dicomweb/studies")
    assert response.status == 200
    assert len(json.loads(await response.text())) == 3
    assert events("qido")[-1].actor == "radiographer"
    # Under a transaction's base URL staff see its studies, whatever its state.
    transaction, _ = share([studies["other"]])
    tx.decline(transaction, "wrong patient")
    rows = json.loads(await (await browser.get(
        f"/dicomweb/t/{transaction.public_id}/studies")).text())
    assert [r["0020000D"]["Value"][0] for r in rows] == [studies["other"]]
    assert events("qido")[-1].transaction_public_id == transaction.public_id


# -- CORS ----------------------------------------------------------------------------------


async def test_cors_preflight_only_for_configured_origins(
        client: Any, studies: dict[str, str], shared: tuple[Transaction, str]) -> None:
    transaction, _ = shared
    path = f"/dicomweb/t/{transaction.public_id}/studies"
    preflight = await client.request("OPTIONS", path, headers={
        "Origin": VIEWER, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    refused = await client.request("OPTIONS", path, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in refused.headers
    answer = await client.get(path, headers={"Origin": VIEWER,
                                             **bearer(recipient_token(transaction))})
    assert answer.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "Warning" in answer.headers["Access-Control-Expose-Headers"]


# -- token pages ---------------------------------------------------------------------------


def shown(html: str, element: str) -> str:
    match = re.search(rf'id="{element}">([^<]+)<', html)
    assert match, f"no {element} in the page"
    return match.group(1)


async def test_open_in_another_viewer_gives_a_token_for_that_transaction(
        client: Any, browser: Browser, services: Services, studies: dict[str, str],
        shared: tuple[Transaction, str]) -> None:
    transaction, link = shared
    await log_in(browser, services, link)
    page = await browser.page(f"/transactions/{transaction.public_id}")
    assert f'action="/transactions/{transaction.public_id}/dicomweb-token"' in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    no_csrf = await browser.post(f"/transactions/{transaction.public_id}/dicomweb-token")
    assert no_csrf.status == 403
    response = await browser.post(f"/transactions/{transaction.public_id}/dicomweb-token",
                                  data={"csrf": csrf})
    html = await response.text()
    assert response.status == 200, html
    token = shown(html, "dicomweb-token")
    assert shown(html, "dicomweb-base") == (f"https://portal.example/dicomweb/t/"
                                           f"{transaction.public_id}")
    weasis = re.findall(r'href="(weasis://[^"]+)"', html)
    assert len(weasis) == 2
    command = urllib.parse.unquote(html_lib.unescape(weasis[0])[len("weasis://"):])
    assert command.startswith('$dicom:rs --url "https://portal.example/dicomweb/t/')
    assert f'--header "Authorization: Bearer {token}"' in command
    assert events("dicomweb-token")[-1].transaction_public_id == transaction.public_id

    # A program without the cookie uses the key; the OHIF data source carries it as Basic.
    base = f"/dicomweb/t/{transaction.public_id}/studies"
    assert (await client.get(base, headers=bearer(token))).status == 200
    config = json.loads(await (await client.get(f"/dicomweb/ohif/{token}.json")).text())
    server = config["servers"]["dicomWeb"][0]
    assert server["qidoRoot"].endswith(f"/dicomweb/t/{transaction.public_id}")
    basic = base64.b64encode(server["requestOptions"]["auth"].encode()).decode()
    assert (await client.get(base, headers={"Authorization": f"Basic {basic}"})).status == 200
    assert (await client.get("/dicomweb/ohif/" + "y" * 43 + ".json")).status == 404

    revoke = await browser.post(f"/transactions/{transaction.public_id}/dicomweb-token/revoke",
                                data={"csrf": csrf})
    assert revoke.status == 303
    assert (await client.get(base, headers=bearer(token))).status == 401
    assert (await client.get(f"/dicomweb/ohif/{token}.json")).status == 404


async def test_staff_get_a_token_over_every_study(client: Any, browser: Browser, services: Services,
                                                  studies: dict[str, str]) -> None:
    _, secret = make_user("radiographer")
    await staff_log_in(browser, "radiographer", secret)
    page = await browser.page("/admin/dicomweb")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    response = await browser.post("/admin/dicomweb/token",
                                  data={"csrf": csrf, "studies": studies["other"]})
    html = await response.text()
    token = shown(html, "dicomweb-token")
    assert shown(html, "dicomweb-base") == "https://portal.example/dicomweb"
    rows = json.loads(await (await client.get("/dicomweb/studies",
                                              headers=bearer(token))).text())
    assert len(rows) == 3
    assert (await browser.post("/admin/dicomweb/revoke", data={"csrf": csrf})).status == 303
    assert (await client.get("/dicomweb/studies", headers=bearer(token))).status == 401


# -- rendered ------------------------------------------------------------------------------


async def test_rendered_images(client: Any, services: Services, studies: dict[str, str],
                               shared: tuple[Transaction, str]) -> None:
    import numpy as np
    from PIL import Image

    from iepnode.viewing import rendering

    transaction, _ = shared
    headers = bearer(recipient_token(transaction))
    base = f"/dicomweb/t/{transaction.public_id}/studies"
    ct = Instance.select().where(Instance.transfer_syntax == "1.2.840.10008.1.2.1").first()
    url = f"{base}/{studies['ct']}/series/{ct.series.series_uid}/instances/{ct.sop_uid}"

    jpeg = await client.get(f"{url}/rendered", headers=headers)
    assert jpeg.status == 200 and jpeg.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(await jpeg.read())).format == "JPEG"

    png = await client.get(f"{url}/rendered?window=40,400&viewport=8,8",
                           headers={**headers, "Accept": "image/png"})
    assert png.status == 200 and png.headers["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(await png.read()))
    assert image.size == (8, 8)  # the 16x16 slice fitted in the viewport
    full = await client.get(f"{url}/frames/1/rendered?window=40,400&accept=image/png",
                            headers=headers)
    expected = rendering.decode_frame(services.store.path(ct.key), 0).windowed(40, 400)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(await full.read()))), expected)

    rle = Instance.get(Instance.transfer_syntax == "1.2.840.10008.1.2.5")
    frames = await client.get(
        f"{base}/{studies['rle']}/series/{rle.series.series_uid}/instances/{rle.sop_uid}"
        "/frames/1,2/rendered", headers={**headers, "Accept": "image/png"})
    content_type = frames.headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="image/png"')
    assert [p.get_content_type() for p in parts(content_type, await frames.read())] == [
        "image/png"] * 2

    study = await client.get(f"{base}/{studies['ct']}/rendered", headers=headers)
    assert len(parts(study.headers["Content-Type"], await study.read())) == 3
    assert (await client.get(f"{url}/rendered?window=40", headers=headers)).status == 400
    assert (await client.get(f"{url}/rendered",
                             headers={**headers, "Accept": "application/pdf"})).status == 406
    assert (await client.get(f"{base}/{studies['other']}/rendered", headers=headers)
            ).status == 404
    assert [e.event_code for e in events("wado-rendered")][:1] == ["110103"]

    thumb = await client.get(f"{base}/{studies['ct']}/thumbnail", headers=headers)
    assert thumb.headers["Content-Type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(await thumb.read())).size) <= 128
    small = await client.get(f"{url}/thumbnail?viewport=4,4&accept=image/png", headers=headers)
    assert Image.open(io.BytesIO(await small.read())).size == (4, 4)


# -- the real node, end to end ---------------------------------------------------------


async def test_a_viewer_opens_a_package_from_iepnode_serve(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    """dcmtk storescu -> ``iepnode serve`` (2 HTTP processes) -> transfer -> passcode login
    -> "Open in another viewer" -> dicomweb-client with the key, over real sockets."""
    from tests.support.node import running_node
    from tests.support.scu import storescu
    from tests.test_download import http_browser, outbox_text, sign_in

    data_dir = tmp_path / "node"
    files = factory.make_ct_series(tmp_path / "ct", 4, **PATIENT)
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    monkeypatch.setenv("IEPNODE_HTTP_WORKERS", "2")
    with running_node(data_dir, register=[("TESTSCU", "127.0.0.1", 0, "store")]) as node:
        sent = storescu(node, files)
        assert sent.returncode == 0, sent.stderr
        public_id = node.cli("transfer", "create", "--study", study_uid, "--to",
                             "pat@example.org", "--otp-mobile", "+447700900123"
                             ).stdout.strip()
        link = re.search(r"/t/([A-Za-z0-9_-]+)", outbox_text(data_dir, "pat@example.org"))
        async with http_browser(node.http_port) as browser:
            await sign_in(browser, data_dir, link.group(1))
            page = await browser.page(f"/transactions/{public_id}")
            csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
            response = await browser.post(f"/transactions/{public_id}/dicomweb-token",
                                          data={"csrf": csrf})
            token = shown(await response.text(), "dicomweb-token")
        peer = DICOMwebClient(url=f"http://127.0.0.1:{node.http_port}/dicomweb/t/{public_id}",
                              headers=bearer(token))
        found = await asyncio.to_thread(peer.search_for_studies)
        assert [Dataset.from_json(s).StudyInstanceUID for s in found] == [study_uid]
        retrieved = await asyncio.to_thread(peer.retrieve_study, study_uid)
        stored_files = {str(dcmread(p).SOPInstanceUID): p for p in node.object_files()}
        assert {str(ds.SOPInstanceUID) for ds in retrieved} == set(stored_files)
        for ds in retrieved:
            assert ds.PixelData == dcmread(stored_files[ds.SOPInstanceUID]).PixelData
        metadata = await asyncio.to_thread(peer.retrieve_study_metadata, study_uid)
        assert len(metadata) == 4
        first = Dataset.from_json(metadata[0], lambda uri: bytes(peer.retrieve_bulkdata(
            reached(uri, Settings.public_url, f"http://127.0.0.1:{node.http_port}"))[0]))
        frames = await asyncio.to_thread(peer.retrieve_instance_frames, study_uid,
                                         first.SeriesInstanceUID, first.SOPInstanceUID, [1])
        assert frames == [first.PixelData]
        assert frames[0] == dcmread(stored_files[first.SOPInstanceUID]).PixelData


async def test_an_encapsulated_pdf_report_through_its_bulkdata_uri(
        client: Any, services: Services, tmp_path: Path, studies: dict[str, str]) -> None:
    pdf = factory.minimal_pdf("report " + "x" * 3000)
    like = stored(Instance.get(Instance.transfer_syntax == "1.2.840.10008.1.2.1").sop_uid, services)
    store_files(services, [factory.make_pdf(tmp_path / "pdf", pdf=pdf, like=like)])
    transaction, _ = share([studies["ct"]])
    headers = bearer(recipient_token(transaction))
    base = f"/dicomweb/t/{transaction.public_id}"
    rows = json.loads(await (await client.get(f"{base}/studies/{studies['ct']}/metadata",
                                              headers=headers)).text())
    report = next(r for r in rows if "00420011" in r)
    uri = report["00420011"]["BulkDataURI"]
    assert report["00420011"]["vr"] == "OB" and "7FE00010" not in report
    path = urllib.parse.urlsplit(uri).path
    single = await client.get(path, headers={**headers, "Accept": "application/pdf"})
    assert single.headers["Content-Type"] == "application/pdf"
    assert await single.read() == pdf
    multi = await client.get(path, headers={
        **headers, "Accept": 'multipart/related; type="application/pdf"'})
    got = parts(multi.headers["Content-Type"], await multi.read())
    assert [p.get_content_type() for p in got] == ["application/pdf"]
    assert got[0].get_payload(decode=True) == pdf
    octets = await client.get(path, headers={
        **headers, "Accept": 'multipart/related; type="application/octet-stream"'})
    assert octets.status == 200
    assert parts(octets.headers["Content-Type"], await octets.read())[0].get_payload(
        decode=True) == pdf


def test_dicomweb_settings_are_checked(tmp_path: Path) -> None:
    from config import load_settings
    from config.settings import ConfigError

    settings = load_settings(overrides={"data_dir": tmp_path}, environ={
        "IEPNODE_DICOMWEB_CORS_ORIGINS": "https://viewer.example.org/, http://localhost:3000",
        "IEPNODE_DICOMWEB_OHIF_URL": "https://viewer.example.org/"})
    assert settings.dicomweb_cors_origins == ("https://viewer.example.org",
                                              "http://localhost:3000")
    assert settings.dicomweb_ohif_url == "https://viewer.example.org"
    assert load_settings(overrides={"data_dir": tmp_path}, environ={}).dicomweb_cors_origins == ()
    for bad in ("viewer.example.org", "https://viewer.example.org/path", "javascript:x"):
        with pytest.raises(ConfigError, match="dicomweb_cors_origins"):
            load_settings(overrides={"data_dir": tmp_path, "dicomweb_cors_origins": (bad,)},
                          environ={})
    with pytest.raises(ConfigError, match="dicomweb_ohif_url"):
        load_settings(overrides={"data_dir": tmp_path, "dicomweb_ohif_url": "ftp://x"},
                      environ={})
