"""The node's services, as the composition root hands them to the SCP, web app and CLI.

:func:`iepnode.wiring.build_services` builds one :class:`Services` per process; web
views reach it through ``web.common.services_of(request)``, the DICOM handlers get
its :attr:`Services.archive`.
"""

from __future__ import annotations

from dataclasses import dataclass

import peewee

from config import Settings
from iepnode.archive.filesets import FilesetService
from iepnode.archive.ingest import Ingester
from iepnode.archive.service import ArchiveService
from iepnode.outbound.messaging import Messenger
from iepnode.outbound.service import SendService
from iepnode.security import SecretKey
from iepnode.sharing.download_service import DownloadService
from iepnode.sharing.forward_service import ForwardService
from iepnode.sharing.login_service import RecipientLogins
from iepnode.sharing.service import SharingService
from iepnode.staff_side import StaffSide
from iepnode.uploads.service import RequestService
from iepnode.uploads.staging import UploadService
from iepnode.viewing.dicomweb import DicomWebService
from iepnode.viewing.report_service import ReportService
from iepnode.viewing.service import ViewingService
from storage.filestore import FileStore
from storage.group_commit import GroupCommitter


@dataclass(frozen=True)
class Services:
    """Every service of one process, and the storage they share."""

    settings: Settings
    #: The index database (peewee), opened by the composition root.
    database: peewee.Database
    store: FileStore
    #: Page views' small writes (audit events, read marks) share commits.
    group_commit: GroupCommitter
    ingester: Ingester
    #: Outgoing mail and SMS (SMTP / gateway, or the outbox folder).
    messenger: Messenger
    #: The node's secret key (``DATA_DIR/secret.key``), read on first use.
    secret_key: SecretKey
    #: Peers, ingest, query/retrieve (the SCP's service).
    archive: ArchiveService
    #: Per-study DICOMDIR file-sets.
    filesets: FilesetService
    #: Transfers, the recipient dashboard and thread, expiry and purge.
    sharing: SharingService
    #: Recipient logins: passcodes, authenticator apps, sessions.
    logins: RecipientLogins
    #: Forwarding a package to another person.
    forwards: ForwardService
    #: Zip packages, protected copies, download audit.
    downloads: DownloadService
    #: Sends to DICOM nodes and routing rules.
    sends: SendService
    #: Requests for images and the review of their uploads.
    requests: RequestService
    #: Staging and the chunk protocol of uploads.
    uploads: UploadService
    #: The web viewer (its frame cache lives as long as this process).
    viewing: ViewingService
    #: Reports and attachments of transactions.
    reports: ReportService
    #: DICOMweb's selection of stored instances (QIDO-RS / WADO-RS), over the file store.
    dicomweb: DicomWebService
    #: Staff-side services for the /admin pages and the CLI's admin commands
    #: (logins, accounts, audit trail, remote AEs, study search, transactions, channels).
    admin: StaffSide

    @property
    def secret(self) -> bytes:
        """The node's secret key (``DATA_DIR/secret.key``), created on first use."""
        return self.secret_key.get()

    def close(self) -> None:
        """Return this thread's database connection to the pool (call when a thread is done)."""
        if not self.database.is_closed():
            self.database.close()
