"""Downloads (issue 5): zip packages, their audit, password-protected copies.

The zip package of a transaction or study (:mod:`iepnode.sharing.package`), its CRC
cache (:mod:`iepnode.sharing.checksums`), the download rules and password-protected
copies (:mod:`iepnode.sharing.downloads`). Web views and the CLI call these in a thread.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

from config import Settings
from iepnode.errors import Gone, NotFound
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.sharing import (
    checksums,
    download_stream,
    downloads,
    package,
    package_plan,
    transactions,
)
from storage.filestore import FileStore
from storage.models import Recipient, Transaction
from storage.queries import recipients as recipients_q
from storage.queries import transactions as transactions_q

log = logging.getLogger("iepnode.downloads")


class DownloadService:
    """The packages recipients download and staff export, and their protected copies.

    Parameters
    ----------
    settings : Settings
        Institution (named in packages), data folder (protected copies).
    store : FileStore
        Where the packaged instances are read from.
    """

    def __init__(self, settings: Settings, store: FileStore) -> None:
        self.settings = settings
        self.store = store
        self._packages = package.PackageCache()
        self._protected = downloads.ProtectedStore(settings.downloads_dir)

    def _package_of(self, source: package.PackageSource) -> package.Package:
        """Plan (or take from the cache) the package of ``source``.

        Instances whose stored files cannot be read are left out of it (logged, listed
        in its README.TXT and in :attr:`~iepnode.sharing.package.Package.left_out`).

        Raises
        ------
        Gone
            None of its studies is stored any more, or none of their files can be read.
        """
        files = package.stored_files(source.study_uids, self.store.path)
        if not files:
            raise Gone("The images of this package are no longer stored.")
        key = package.fingerprint(source, files)

        def build() -> package.Package:
            return package_plan.build_package(source, files, checksums.crcs_for, key,
                                              self.store.path)

        try:
            return self._packages.get_or_build(key, build)
        except package.NothingReadable as exc:
            log.error("package %s: none of its %d stored files can be read (first: %s)",
                      source.reference or source.study_uids[0], len(exc.left_out),
                      exc.left_out[0].reason)
            raise Gone("The images of this package cannot be read at the moment. Please "
                       "contact the sender.") from exc

    def recipient_package(self, recipient_id: int, public_id: str) -> package.Package:
        """The download package of one of the recipient's live transactions.

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        Gone
            Declined, expired or purged.
        """
        return self._recipient_download(recipient_id, public_id)[1]

    def _recipient_download(self, recipient_id: int,
                            public_id: str) -> tuple[Transaction, package.Package]:
        recipient = recipients_q.recipient_by_id(recipient_id)
        transaction = transactions.get_for_recipient(recipient, public_id)
        downloads.check_downloadable(transaction)
        return transaction, self._package_of(downloads.source_for_transaction(
            transaction, self.settings.institution))

    def transaction_package(self, public_id: str) -> package.Package:
        """The package of any transaction whose files are still stored (``iepnode export``).

        Raises
        ------
        NotFound
            No such transaction.
        Gone
            Its files were purged.
        """
        transaction = transactions_q.transaction_with_public_id(public_id)
        if transaction is None:
            raise NotFound(f"no transaction {public_id}")
        if transaction.purged_at:
            raise Gone(f"the images of {public_id} have been purged")
        return self._package_of(downloads.source_for_transaction(transaction,
                                                                 self.settings.institution))

    def study_package(self, study_uid: str) -> package.Package:
        """The package of one stored study (``iepnode export UID``).

        Raises
        ------
        NotFound
            No such study.
        """
        try:
            source = package.source_for_study(study_uid, self.settings.institution)
        except KeyError:
            raise NotFound(f"no study {study_uid}") from None
        return self._package_of(source)

    def record_download(self, actor: Actor, pkg: package.Package, *, action: str,
                        transaction: str = "", outcome: int = audit.SUCCESS,
                        detail: str = "") -> None:
        """Audit one download or export of ``pkg`` (DCM 110106 Export).

        The detail names the instances the package leaves out (unreadable files).
        """
        audit.record_export(action, actor, media=f"zip {pkg.filename}",
                            study_uids=pkg.study_uids, patient_id=pkg.patient_id,
                            transaction=transaction, outcome=outcome,
                            detail="; ".join(x for x in (f"{pkg.instances} instances",
                                                         pkg.left_out_text(), detail) if x))

    def record_recipient_download(self, recipient_id: int, pkg: package.Package, *,
                                  public_id: str, source_ip: str = "",
                                  outcome: int = audit.SUCCESS, detail: str = "") -> None:
        """Audit one download request of a recipient (when it ended, with its outcome)."""
        recipient = recipients_q.recipient_by_id(recipient_id)
        self.record_download(audit.Actor("recipient", recipient.email, source_ip), pkg,
                             action="download", transaction=public_id, outcome=outcome,
                             detail=detail)

    def protect_package(self, recipient_id: int, public_id: str, source_ip: str = "",
                        ) -> tuple[downloads.ProtectedCopy, Recipient]:
        """Write a password-protected copy of a recipient's package (audited).

        Returns the copy (its token and its password, to show once) and the recipient.

        Raises
        ------
        NotFound, Gone
            As :meth:`recipient_package`.
        InProgress
            A copy of it is being made for this recipient already (one at a time).
        InvalidRequest
            No room on disk for the copy.
        """
        transaction, pkg = self._recipient_download(recipient_id, public_id)
        copy = self._protected.create(pkg, recipient_id=recipient_id,
                                      transaction_id=transaction.id, public_id=public_id)
        recipient = recipients_q.recipient_by_id(recipient_id)
        self.record_download(audit.Actor("recipient", recipient.email, source_ip), pkg,
                             action="encrypt", transaction=public_id,
                             detail=f"AES-256 copy of {copy.size} bytes prepared")
        return copy, recipient

    def protected_download(self, recipient_id: int, token: str,
                           source_ip: str = "", detail: str = "") -> tuple[Path, str]:
        """The file and download name of a recipient's protected copy (audited).

        Raises
        ------
        NotFound
            Unknown, expired or someone else's token.
        Gone
            The transaction is no longer downloadable.
        """
        path, meta = self._protected.find(token, recipient_id)
        recipient = recipients_q.recipient_by_id(recipient_id)
        transaction = transactions.get_for_recipient(recipient, meta["public_id"])
        downloads.check_downloadable(transaction)
        audit.record_export("download-protected", audit.Actor("recipient", recipient.email,
                                                              source_ip),
                            media=f"AES zip {meta['filename']}",
                            study_uids=[ts.study_uid for ts in transaction.studies],
                            patient_id=transaction.patient_id,
                            transaction=transaction.public_id, detail=detail)
        return path, str(meta["filename"])

    def sweep_protected_downloads(self) -> int:
        """Delete protected copies that expired or whose transaction is no longer live."""

        def keep(meta: dict) -> bool:
            transaction = transactions_q.transaction_with_public_id(meta.get("public_id"))
            return transaction is not None and downloads.is_downloadable(transaction)

        return self._protected.sweep(keep)

    def package_bytes(self, planned: package.Package, start: int,
                      stop: int) -> AsyncIterator[bytearray]:
        """Bytes ``start``-``stop`` of a planned package, read through the file store.

        See :func:`iepnode.sharing.download_stream.package_bytes`: web views iterate
        this and never see a stored file's path.
        """
        return download_stream.package_bytes(self.store, planned, start, stop)
