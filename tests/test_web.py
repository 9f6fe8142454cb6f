"""The aiohttp application: health endpoint and the headers every response carries."""

from __future__ import annotations

from pathlib import Path

from config import load_settings
from iepnode.wiring import build_services
from tests import data_factory as factory
from tests.support.ingest import store_files
from web.app import create_app


async def test_healthz_reports_counts_and_security_headers(aiohttp_client, tmp_path: Path) -> None:
    settings = load_settings(overrides={"data_dir": tmp_path / "data"}, environ={})
    node = build_services(settings)
    store_files(node, factory.make_ct_series(tmp_path / "in", 2))
    client = await aiohttp_client(create_app(settings, node))
    response = await client.get("/healthz")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ok" and body["ae_title"] == "IEPNODE"
    assert (body["patients"], body["studies"], body["instances"]) == (1, 1, 2)
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    missing = await client.get("/no/such/page")
    assert missing.status == 404
    assert missing.headers["Referrer-Policy"] == "no-referrer"


def test_orphan_fileset_folders_are_removed(tmp_path: Path) -> None:
    settings = load_settings(overrides={"data_dir": tmp_path / "data"}, environ={})
    node = build_services(settings)
    study_uid = store_files(node, factory.make_ct_series(tmp_path / "in", 1))
    kept = node.filesets.build_fileset(study_uid)
    orphan = settings.fileset_dir / "ZZZZZZZZ"
    (orphan / "PT000000").mkdir(parents=True)
    staging = settings.fileset_dir / ".ABC.1234.staging"
    staging.mkdir()
    assert node.filesets.remove_orphan_filesets() == 1
    assert not orphan.exists() and kept.is_dir() and staging.is_dir()
