"""DICOMweb under hostile requests: links from the configured address, bounded frame lists,
responses streamed part by part (issue 13, amplification).

The app runs in-process over a real :class:`Services` on a loopback aiohttp test server
(as in ``tests/test_dicomweb.py``); bodies are parsed with the ``email`` package. The
memory of the real ``iepnode serve`` is measured in ``tests/test_memory_bounds.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydicom import dcmread
from pydicom.encaps import get_frame

from iepnode.errors import NotFound
from iepnode.services import Services
from iepnode.wiring import build_services
from storage.models import Instance
from tests.test_dicomweb import bearer, make_studies, parts, recipient_token, stored
from tests.test_recipient_web import make_settings, share
from web.app import create_app

PUBLIC = "https://portal.example"
FORGED = {"Host": "evil.example:8443", "X-Forwarded-Host": "attacker.example",
          "X-Forwarded-Proto": "http", "Forwarded": "host=forwarded.example;proto=http"}
_URL = re.compile(rb"[a-z][a-z0-9+.-]*://[^\s\"<>]+", re.IGNORECASE)


@pytest.fixture(params=["direct", "behind-a-trusted-proxy"])
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Services:
    proxies = ("127.0.0.1",) if request.param == "behind-a-trusted-proxy" else ()
    return build_services(make_settings(tmp_path, public_url=PUBLIC + "/", trusted_proxies=proxies))


def urls(body: bytes) -> list[str]:
    return [m.decode() for m in _URL.findall(body)]


async def test_links_use_the_public_url_whatever_host_the_request_names(
        client: Any, services: Services, tmp_path: Path) -> None:
    studies = make_studies(services, tmp_path)
    transaction, _ = share([studies["ct"], studies["rle"]])
    headers = {**bearer(recipient_token(transaction)), **FORGED}
    base = f"/dicomweb/t/{transaction.public_id}"
    want = f"{PUBLIC}{base}/studies/"
    ct = Instance.select().where(Instance.transfer_syntax == "1.2.840.10008.1.2.1").first()

    search = await client.get(f"{base}/studies", headers=headers)
    assert search.status == 200
    found = json.loads(await search.read())
    retrieve_urls = [row["00081190"]["Value"][0] for row in found]
    assert sorted(retrieve_urls) == sorted(want + s for s in (studies["ct"], studies["rle"]))

    instances = await client.get(f"{base}/studies/{studies['ct']}/instances", headers=headers)
    assert all(row["00081190"]["Value"][0].startswith(want)
               for row in json.loads(await instances.read()))

    metadata = await client.get(f"{base}/studies/{studies['ct']}/metadata", headers=headers)
    rows = json.loads(await metadata.read())
    bulk = [row["7FE00010"]["BulkDataURI"] for row in rows]
    assert len(bulk) == 3
    assert all(u.startswith(want + studies["ct"] + "/series/") for u in bulk)
    assert f"{want}{studies['ct']}/series/{ct.series.series_uid}/instances/{ct.sop_uid}" \
        "/bulkdata/7FE00010" in bulk

    retrieve = await client.get(f"{base}/studies/{studies['ct']}", headers=headers)
    body = await retrieve.read()
    locations = [p["Content-Location"] for p in parts(retrieve.headers["Content-Type"], body)]
    assert len(locations) == 3 and all(loc.startswith(want) for loc in locations)

    # Nothing of the forged names anywhere, in any body or header.
    for response, data in ((search, json.dumps(found).encode()), (metadata, json.dumps(
            rows).encode()), (retrieve, body)):
        text = data + str(dict(response.headers)).encode()
        for name in (b"evil.example", b"attacker.example", b"forwarded.example"):
            assert name not in text
        assert all(u.startswith(PUBLIC + "/") for u in urls(data)), urls(data)


async def test_staff_links_use_the_public_url_too(client: Any, services: Services,
                                                  tmp_path: Path) -> None:
    from iepnode.viewing import dicomweb_access as access
    from tests.test_admin_web import make_user

    studies = make_studies(services, tmp_path)
    user, _ = make_user("rad")
    token = access.issue_staff_token(user).token
    search = await client.get("/dicomweb/studies", headers={**bearer(token), **FORGED})
    assert search.status == 200
    links = [row["00081190"]["Value"][0] for row in json.loads(await search.read())]
    assert sorted(links) == sorted(f"{PUBLIC}/dicomweb/studies/{s}" for s in studies.values())


# -- frame lists -----------------------------------------------------------------------


def frames_url(base: str, instance: Instance, frames: str) -> str:
    return (f"{base}/studies/{instance.series.study.study_uid}/series/"
            f"{instance.series.series_uid}/instances/{instance.sop_uid}/frames/{frames}")


ANY_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


async def test_a_frame_list_beyond_the_cap_is_a_400_and_duplicates_count(
        client: Any, services: Services, tmp_path: Path) -> None:
    studies = make_studies(services, tmp_path)
    transaction, _ = share([studies["ct"], studies["rle"]])
    headers = {**bearer(recipient_token(transaction)), "Accept": ANY_FRAMES}
    base = f"/dicomweb/t/{transaction.public_id}"
    cap = services.settings.dicomweb_max_frames
    assert cap == 100  # the documented default ([http] dicomweb_max_frames)
    ct = Instance.select().where(Instance.transfer_syntax == "1.2.840.10008.1.2.1").first()
    stored_pixels = dcmread(stored(ct.sop_uid, services)).PixelData

    over = await client.get(frames_url(base, ct, ",".join(["1"] * 150)), headers=headers)
    assert over.status == 400
    text = await over.text()
    assert "150 frames" in text and f"at most {cap}" in text
    assert (await client.get(frames_url(base, ct, ",".join(["1"] * (cap + 1))),
                             headers=headers)).status == 400
    rendered_over = await client.get(frames_url(base, ct, ",".join(["1"] * (cap + 1)))
                                     + "/rendered", headers=bearer(recipient_token(transaction)))
    assert rendered_over.status == 400

    full = await client.get(frames_url(base, ct, ",".join(["1"] * cap)), headers=headers)
    assert full.status == 200
    got = parts(full.headers["Content-Type"], await full.read())
    assert len(got) == cap and all(p.get_payload(decode=True) == stored_pixels for p in got)
    # Beyond the instance's frames: still a 404, as before.
    assert (await client.get(frames_url(base, ct, "1,2"), headers=headers)).status == 404
    assert (await client.get(frames_url(base, ct, "0"), headers=headers)).status == 400
    assert (await client.get(frames_url(base, ct, "1,x"), headers=headers)).status == 400


async def test_the_frame_cap_is_a_setting(aiohttp_client: Any, tmp_path: Path) -> None:
    services = build_services(make_settings(tmp_path, dicomweb_max_frames=3))
    client = await aiohttp_client(create_app(services.settings, services),
                                  cookie_jar=aiohttp.DummyCookieJar())
    studies = make_studies(services, tmp_path)
    transaction, _ = share([studies["rle"]])
    headers = {**bearer(recipient_token(transaction)), "Accept": ANY_FRAMES}
    base = f"/dicomweb/t/{transaction.public_id}"
    rle = Instance.get(Instance.transfer_syntax == "1.2.840.10008.1.2.5")
    assert (await client.get(frames_url(base, rle, "1,2,1"), headers=headers)).status == 200
    refused = await client.get(frames_url(base, rle, "1,2,1,2"), headers=headers)
    assert refused.status == 400 and "at most 3" in await refused.text()


def test_frame_cap_settings_are_checked(tmp_path: Path) -> None:
    from config import load_settings
    from config.settings import ConfigError

    for name, bad in (("dicomweb_max_frames", 0), ("dicomweb_max_frames", 10_001),
                      ("render_concurrency", 0), ("upload_inspections", 0),
                      ("upload_inspections", 65)):
        with pytest.raises(ConfigError, match=name):
            load_settings(overrides={"data_dir": tmp_path, name: bad}, environ={})
    settings = load_settings(overrides={"data_dir": tmp_path}, environ={
        "IEPNODE_DICOMWEB_MAX_FRAMES": "8", "IEPNODE_RENDER_CONCURRENCY": "3",
        "IEPNODE_UPLOAD_INSPECTIONS": "1"})
    assert (settings.dicomweb_max_frames, settings.render_concurrency,
            settings.upload_inspections) == (8, 3, 1)


# -- streamed responses ------------------------------------------------------------------


async def test_multipart_and_metadata_responses_are_streamed(
        client: Any, services: Services, tmp_path: Path) -> None:
    """Every multipart body (and metadata) goes out chunked as it is read, never joined
    in memory first (the memory itself is measured in tests/test_memory_bounds.py)."""
    studies = make_studies(services, tmp_path)
    transaction, _ = share([studies["ct"], studies["rle"]])
    headers = bearer(recipient_token(transaction))
    base = f"/dicomweb/t/{transaction.public_id}"
    ct = Instance.select().where(Instance.transfer_syntax == "1.2.840.10008.1.2.1").first()
    rle = Instance.get(Instance.transfer_syntax == "1.2.840.10008.1.2.5")
    instance = frames_url(base, ct, "1").rsplit("/frames/", 1)[0]
    rle_instance = frames_url(base, rle, "1").rsplit("/frames/", 1)[0]
    for url, accept in (
            (f"{base}/studies/{studies['ct']}", ""),
            (f"{base}/studies/{studies['ct']}/metadata", ""),
            (frames_url(base, ct, "1,1"), ANY_FRAMES),
            (frames_url(base, rle, "2,1"), ""),
            (f"{instance}/bulkdata/7FE00010", ""),
            (f"{rle_instance}/bulkdata/7FE00010", ""),
            (f"{rle_instance}/frames/1,2/rendered", ""),
            (f"{base}/studies/{studies['ct']}/rendered", "")):
        response = await client.get(url, headers={**headers, **(
            {"Accept": accept} if accept else {})})
        body = await response.read()
        assert response.status == 200, (url, body[:200])
        assert response.headers.get("Transfer-Encoding") == "chunked", url
        assert "Content-Length" not in response.headers, url
        assert response.headers["Cache-Control"] == "no-store", url
        assert response.headers["X-Content-Type-Options"] == "nosniff", url
        if "metadata" in url:
            assert len(json.loads(body)) == 3
        else:
            assert parts(response.headers["Content-Type"], body)
    # The bulk data of compressed pixel data: one part per frame, as stored.
    bulk = await client.get(f"{rle_instance}/bulkdata/7FE00010", headers=headers)
    stored_rle = dcmread(stored(rle.sop_uid, services))
    assert [p.get_payload(decode=True) for p in parts(bulk.headers["Content-Type"],
                                                      await bulk.read())] == [
        get_frame(stored_rle.PixelData, i, number_of_frames=2) for i in (0, 1)]
    # HEAD: the headers, no body read.
    head = await client.head(f"{base}/studies/{studies['ct']}", headers=headers)
    assert head.status == 200 and head.headers["Content-Type"].startswith("multipart/related")


async def test_a_study_rendered_passes_over_instances_without_an_image(
        client: Any, services: Services, tmp_path: Path) -> None:
    from tests import data_factory as factory
    from tests.support.ingest import store_files

    studies = make_studies(services, tmp_path)
    ct = Instance.select().where(Instance.transfer_syntax == "1.2.840.10008.1.2.1").first()
    store_files(services, [factory.make_pdf(tmp_path / "pdf", like=stored(ct.sop_uid, services))])
    transaction, _ = share([studies["ct"]])
    headers = bearer(recipient_token(transaction))
    response = await client.get(f"/dicomweb/t/{transaction.public_id}/studies/"
                                f"{studies['ct']}/rendered", headers=headers)
    assert response.status == 200
    images = parts(response.headers["Content-Type"], await response.read())
    assert [p.get_content_type() for p in images] == ["image/jpeg"] * 3  # not the PDF
    pdf = Instance.get(Instance.sop_class == "1.2.840.10008.5.1.4.1.1.104.1")
    alone = await client.get(frames_url(f"/dicomweb/t/{transaction.public_id}", pdf, "1")
                             + "/rendered", headers=headers)
    assert alone.status == 404


# -- pixel data read a frame at a time ---------------------------------------------------


@pytest.mark.parametrize("name", [
    "CT_small.dcm", "MR_small_implicit.dcm", "rtdose.dcm", "liver_1frame.dcm",
    "SC_rgb_small_odd.dcm", "rtdose_rle.dcm", "SC_rgb_rle_2frame.dcm", "MR_small_RLE.dcm",
    "JPEG2000.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", "JPEGLSNearLossless_08.dcm", "image_dfl.dcm"])
def test_pixel_data_frames_equal_those_of_the_whole_value(name: str) -> None:
    from iepnode.viewing.dicomweb import StoredInstance
    from iepnode.viewing.dicomweb_frames import NATIVE, PixelData
    from tests.data_factory import bundled

    path = bundled(name)
    full = dcmread(path)
    ts = str(full.file_meta.TransferSyntaxUID)
    count = int(full.get("NumberOfFrames") or 1)
    item = StoredInstance(path, "", "", "", "", ts, "", path.stat().st_size)
    with PixelData(item) as pixels:
        assert pixels.frames == count
        numbers = [count, 1, *range(1, count + 1)]
        got = [b"".join(p.blocks) for p in pixels.frame_parts(numbers)]
        if ts in NATIVE:
            size = (int(full.Rows) * int(full.Columns) * int(full.get("SamplesPerPixel") or 1)
                    * int(full.BitsAllocated) // 8)
            want = [full.PixelData[(n - 1) * size:n * size] for n in numbers]
            assert b"".join(b"".join(p.blocks) for p in pixels.value_parts()) == full.PixelData
        else:
            want = [get_frame(full.PixelData, n - 1, number_of_frames=count) for n in numbers]
            assert [b"".join(p.blocks) for p in pixels.value_parts()] == want[2:]
        assert got == want
        with pytest.raises(NotFound):
            pixels.check([count + 1])


def test_pixel_data_with_an_extended_offset_table(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate_extended
    from pydicom.uid import RLELossless

    from iepnode.viewing.dicomweb import StoredInstance
    from iepnode.viewing.dicomweb_frames import PixelData
    from tests.data_factory import bundled

    source = dcmread(bundled("rtdose_rle.dcm"))
    frames = [get_frame(source.PixelData, i, number_of_frames=15) for i in range(15)]
    value, offsets, lengths = encapsulate_extended(frames)
    source.PixelData, source.ExtendedOffsetTable = value, offsets
    source.ExtendedOffsetTableLengths = lengths
    source["PixelData"].VR = "OB"
    path = tmp_path / "eot.dcm"
    source.save_as(path, enforce_file_format=True)
    item = StoredInstance(path, "", "", "", "", RLELossless, "", path.stat().st_size)
    with PixelData(item) as pixels:
        assert [b"".join(p.blocks) for p in pixels.frame_parts([15, 3, 3])] == [
            frames[14], frames[2], frames[2]]


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "reportsi.dcm"])
def test_pixel_data_that_cannot_be_cut_into_frames(name: str) -> None:
    from iepnode.errors import BadQuery
    from iepnode.viewing.dicomweb import StoredInstance
    from iepnode.viewing.dicomweb_frames import PixelData
    from tests.data_factory import bundled

    path = bundled(name)
    ts = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    item = StoredInstance(path, "", "", "", "", ts, "", path.stat().st_size)
    with pytest.raises(BadQuery if "bigendian" in name else NotFound):
        PixelData(item)


async def test_a_client_leaving_mid_stream_is_audited_and_the_node_goes_on(
        client: Any, services: Services, tmp_path: Path) -> None:
    """aiohttp cancels the handler of a client that went away: the audit event of the
    retrieve must still be written (a queued thread job would be dropped), each time."""
    import asyncio

    from storage.models import AuditEvent
    from tests import data_factory as factory
    from tests.support.ingest import store_files

    big = factory.make_ct_series(tmp_path / "big", 8, rows=512, columns=512)  # 4 MiB
    study = store_files(services, big)
    transaction, _ = share([study])
    token = recipient_token(transaction)

    def audited() -> list[AuditEvent]:
        return list(AuditEvent.select().where(AuditEvent.action == "wado-retrieve"))

    for attempt in range(1, 21):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(f"GET /dicomweb/t/{transaction.public_id}/studies/{study} HTTP/1.1\r\n"
                     f"Host: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readexactly(64 * 1024)  # some of the first instance, then gone
        writer.close()
        await writer.wait_closed()
        for _ in range(100):  # the server notices when its writes fail
            if len(audited()) == attempt:
                break
            await asyncio.sleep(0.05)
        events = audited()
        assert len(events) == attempt, f"attempt {attempt}: the retrieve was not audited"
        assert events[-1].outcome == 4 and "of 8 instances" in events[-1].detail
    again = await client.get(f"/dicomweb/t/{transaction.public_id}/studies/{study}/metadata",
                             headers=bearer(token))
    assert again.status == 200 and len(json.loads(await again.read())) == 8
