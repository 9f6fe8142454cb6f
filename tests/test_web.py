"""The aiohttp application: health endpoint and the headers every response carries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from config import load_settings
from iepnode.wiring import build_services
from tests import data_factory as factory
from tests.support.ingest import store_files
from web.app import create_app
from web.connections import GuardedAppRunner, HttpLimits


async def test_healthz_reports_counts_and_security_headers(aiohttp_client, tmp_path: Path) -> None:
    settings = load_settings(overrides={"data_dir": tmp_path / "data"}, environ={})
    services = build_services(settings)
    store_files(services, factory.make_ct_series(tmp_path / "in", 2))
    client = await aiohttp_client(create_app(settings, services))
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
    services = build_services(settings)
    study_uid = store_files(services, factory.make_ct_series(tmp_path / "in", 1))
    kept = services.filesets.build_fileset(study_uid)
    orphan = settings.fileset_dir / "ZZZZZZZZ"
    (orphan / "PT000000").mkdir(parents=True)
    staging = settings.fileset_dir / ".ABC.1234.staging"
    staging.mkdir()
    assert services.filesets.remove_orphan_filesets() == 1
    assert not orphan.exists() and kept.is_dir() and staging.is_dir()


async def test_resources_go_in_cleanup_ctx_and_the_guarded_runner_runs_it(
        tmp_path: Path) -> None:
    # create_app registers no startup/shutdown/cleanup hook of its own (a resource the app
    # holds belongs in app.cleanup_ctx); the guarded runner of `iepnode serve` enters a
    # cleanup context at setup() and leaves it at cleanup(), as aiohttp's AppRunner does.
    settings = load_settings(overrides={"data_dir": tmp_path / "data"}, environ={})
    app = create_app(settings, build_services(settings))
    assert list(app.cleanup_ctx) == [] and list(app.on_shutdown) == []
    assert len(app.on_startup) == 1 and len(app.on_cleanup) == 1  # cleanup_ctx's own
    events: list[str] = []

    async def resource(app: web.Application) -> AsyncIterator[None]:
        events.append("opened")
        yield
        events.append("closed")

    app.cleanup_ctx.append(resource)
    runner = GuardedAppRunner(app, limits=HttpLimits(4, 2, 1.0))
    await runner.setup()
    assert events == ["opened"]
    await runner.cleanup()
    assert events == ["opened", "closed"]
