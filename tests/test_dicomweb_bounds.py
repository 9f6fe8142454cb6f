"""DICOMweb under hostile requests: links from the configured address, bounded frame lists,
responses streamed part by part (issue 13, amplification).

The app runs in-process over a real :class:`Node` on a loopback aiohttp test server
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

from iepnode.node import Node
from storage.models import Instance
from tests.test_dicomweb import bearer, make_studies, parts, recipient_token
from tests.test_recipient_web import make_settings, share
from web.app import create_app

PUBLIC = "https://portal.example"
FORGED = {"Host": "evil.example:8443", "X-Forwarded-Host": "attacker.example",
          "X-Forwarded-Proto": "http", "Forwarded": "host=forwarded.example;proto=http"}
_URL = re.compile(rb"[a-z][a-z0-9+.-]*://[^\s\"<>]+", re.IGNORECASE)


@pytest.fixture(params=["direct", "behind-a-trusted-proxy"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Node:
    proxies = ("127.0.0.1",) if request.param == "behind-a-trusted-proxy" else ()
    return Node(make_settings(tmp_path, public_url=PUBLIC + "/", trusted_proxies=proxies))


@pytest.fixture
async def client(aiohttp_client: Any, node: Node) -> Any:
    return await aiohttp_client(create_app(node.settings, node),
                                cookie_jar=aiohttp.DummyCookieJar())


def urls(body: bytes) -> list[str]:
    return [m.decode() for m in _URL.findall(body)]


async def test_links_use_the_public_url_whatever_host_the_request_names(
        client: Any, node: Node, tmp_path: Path) -> None:
    studies = make_studies(node, tmp_path)
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


async def test_staff_links_use_the_public_url_too(client: Any, node: Node,
                                                  tmp_path: Path) -> None:
    from iepnode import dicomweb_access as access
    from tests.test_admin_web import make_user

    studies = make_studies(node, tmp_path)
    user, _ = make_user("rad")
    token = access.issue_staff_token(user).token
    search = await client.get("/dicomweb/studies", headers={**bearer(token), **FORGED})
    assert search.status == 200
    links = [row["00081190"]["Value"][0] for row in json.loads(await search.read())]
    assert sorted(links) == sorted(f"{PUBLIC}/dicomweb/studies/{s}" for s in studies.values())
