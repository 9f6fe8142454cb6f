"""The composition root: settings -> storage -> services.

:func:`build_services` is the only code that opens the database and builds the file
store, the group committer, the ingester, the messenger, the secret and every
service; ``iepnode serve`` (:mod:`iepnode.serve`), the CLI, the tests and the benches
build through it.
"""

from __future__ import annotations

from config import Settings
from iepnode.archive.filesets import FilesetService
from iepnode.archive.ingest import Ingester
from iepnode.archive.service import ArchiveService
from iepnode.outbound.messaging import Messenger
from iepnode.outbound.service import SendService
from iepnode.security import SecretKey
from iepnode.services import Services
from iepnode.sharing.download_service import DownloadService
from iepnode.sharing.forward_service import ForwardService
from iepnode.sharing.login_service import RecipientLogins
from iepnode.sharing.service import SharingService
from iepnode.staff_side import build_staff_side
from iepnode.uploads import staging
from iepnode.uploads.service import RequestService
from iepnode.viewing import rendering
from iepnode.viewing.dicomweb import DicomWebService
from iepnode.viewing.report_service import ReportService
from iepnode.viewing.service import ViewingService
from storage.db import open_database
from storage.filestore import FileStore
from storage.group_commit import GroupCommitter

__all__ = ["Services", "build_services"]


def build_services(settings: Settings) -> Services:
    """Open the storage of ``settings`` and build every service on it.

    Parameters
    ----------
    settings : Settings
        Validated settings; the data folder is created and the database opened (and
        migrated); the secret key is read or created on first use.

    Returns
    -------
    Services
        The services of this process; call :meth:`Services.close` when a thread that
        used them is done.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = open_database(settings.resolved_database_url)
    group_commit = GroupCommitter(database)
    store = FileStore(settings.store_dir, settings.tmp_dir, durable=settings.fsync)
    ingester = Ingester(
        store, replace_duplicates=settings.duplicate_policy == "replace",
        max_inflated=settings.max_inflated_mb << 20,
    )
    # hardening (issue 13): frames decoded at once in this process (each is whole
    # in memory while it is rendered).
    rendering.set_concurrency(settings.render_concurrency)
    secret_key = SecretKey(settings.data_dir)
    messenger = Messenger(settings)
    mib = staging.MIB
    uploads = staging.UploadService(settings.staging_dir, staging.Limits(
        settings.upload_max_file_mb * mib, settings.upload_max_total_mb * mib,
        inspections=settings.upload_inspections))
    downloads = DownloadService(settings, store)
    sharing = SharingService(settings, store, group_commit, messenger, downloads)
    return Services(
        settings=settings, database=database, store=store, group_commit=group_commit,
        ingester=ingester, messenger=messenger, secret_key=secret_key,
        archive=ArchiveService(settings, database, store, ingester),
        filesets=FilesetService(settings, store),
        sharing=sharing,
        logins=RecipientLogins(settings, secret_key, messenger, group_commit),
        forwards=ForwardService(settings, messenger),
        downloads=downloads,
        sends=SendService(settings, store),
        requests=RequestService(settings, messenger, ingester, uploads, sharing),
        uploads=uploads,
        viewing=ViewingService(store),
        reports=ReportService(settings, store, ingester),
        dicomweb=DicomWebService(store),
        admin=build_staff_side(settings, secret_key.get, messenger),
    )
