"""Reports and attachments of a transaction (issue 4, attachments issue 13).

Reports: a transaction's Encapsulated PDFs and SRs (:mod:`iepnode.viewing.reports`);
attachments: files wrapped as DICOM and held by the transaction that added them until
staff file them into the study through the ingest path
(:mod:`iepnode.viewing.attachments`). Recipients reach only their own live
transactions (someone else's: NotFound; declined, expired, purged: Gone), staff any
transaction whose files are stored. Give ``recipient_id`` for a recipient, ``staff``
for a staff user.
"""

from __future__ import annotations

import dataclasses

from config import Settings
from iepnode.archive.ingest import Ingester
from iepnode.errors import BadDataset, Gone, NotFound
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.sharing import downloads, transactions
from iepnode.viewing import attaching, attachment_filing, attachments, rendering, reports
from storage.filestore import FileStore
from storage.models import Attachment, StaffUser, Transaction
from storage.queries import recipients as recipients_q
from storage.queries import transactions as transactions_q


class ReportService:
    """Lists and opens a transaction's reports; adds, files and removes its attachments.

    Parameters
    ----------
    settings : Settings
        The attachment limit.
    store : FileStore
        Where reports and attachments are read and written.
    ingester : Ingester
        Files an attachment into its study.
    """

    def __init__(self, settings: Settings, store: FileStore, ingester: Ingester) -> None:
        self.settings = settings
        self.store = store
        self.ingester = ingester

    def _report_access(self, public_id: str, *, recipient_id: int | None = None,
                       staff: StaffUser | None = None,
                       source_ip: str = "") -> tuple[Transaction, Actor, str]:
        """The transaction, the audit actor and the name shown in the thread."""
        if recipient_id is not None:
            recipient = recipients_q.recipient_by_id(recipient_id)
            transaction = transactions.get_for_recipient(recipient, public_id)
            downloads.check_downloadable(transaction)
            return (transaction, Actor("recipient", recipient.email, source_ip),
                    recipient.name or recipient.email)
        if staff is None:
            raise NotFound("no one asked")
        transaction = transactions_q.transaction_with_public_id(public_id)
        if transaction is None:
            raise NotFound(f"no transaction {public_id}")
        if transaction.purged_at:
            raise Gone("The images of this transaction have been removed: it has expired.")
        return (transaction, Actor("staff", staff.username, source_ip),
                staff.display_name or staff.username)

    @staticmethod
    def _study_uids_of(transaction: Transaction) -> list[str]:
        return transactions_q.study_uids_of(transaction.id, ordered=True)

    def transaction_reports(self, public_id: str, *, recipient_id: int | None = None,
                            staff: StaffUser | None = None, source_ip: str = "",
                            ) -> tuple[Transaction, list[reports.ReportEntry],
                                       list[attachments.AttachmentEntry]]:
        """The reports of a transaction's studies and the attachments it holds (audited).

        Returns the transaction, the PDF and SR reports of its studies (those that are
        attachments filed into the study say so in ``attachment``), and the attachments
        only this transaction holds: apart, since they are not the hospital's.

        Raises
        ------
        NotFound, Gone
            See the block comment above.
        """
        transaction, actor, _ = self._report_access(public_id, recipient_id=recipient_id,
                                                    staff=staff, source_ip=source_ip)
        entries = self._labelled(reports.list_reports(self._study_uids_of(transaction),
                                                      self.store.path))
        held = attachments.describe(attachments.held_by(transaction))
        audit.record(audit.PATIENT_RECORD, "view-reports", actor, patient_id=transaction.patient_id,
                     transaction=public_id,
                     detail=f"{len(entries)} reports listed"
                     + (f", {len(held)} attachments held" if held else ""))
        return transaction, entries, held

    @staticmethod
    def _labelled(entries: list[reports.ReportEntry]) -> list[reports.ReportEntry]:
        """Mark the reports that are attachments filed into the study (who added them)."""
        added = attachments.provenance(e.sop_uid for e in entries)
        return [dataclasses.replace(e, attachment=added[e.sop_uid]) if e.sop_uid in added
                else e for e in entries]

    def _held_report(self, transaction: Transaction, sop_uid: str) -> reports.ReportEntry:
        """A report entry for an attachment only ``transaction`` holds (``NotFound``)."""
        entry = attachments.held_entry(transaction, sop_uid)
        return reports.ReportEntry(
            sop_uid=entry.sop_uid, kind=entry.kind, title=entry.row.title or "Attachment",
            date="", study_uid=entry.row.study_uid, series_description="",
            path=attachments.path_of(self.store, entry), attachment=entry)

    def open_report(self, public_id: str, sop_uid: str, *, recipient_id: int | None = None,
                    staff: StaffUser | None = None, source_ip: str = "",
                    ) -> tuple[reports.ReportEntry, bytes | reports.SrDocument]:
        """One report of a transaction: PDF bytes or a readable SR (audited, DCM 110103).

        Also an attachment the transaction holds: its PDF, or its picture as PNG bytes
        (``entry.kind`` is then ``image``); ``entry.attachment`` says who added it.

        Raises
        ------
        NotFound
            Not a report of this transaction's studies nor an attachment it holds (or as
            above).
        Gone
            As above.
        BadDataset
            The stored file cannot be read as what it claims to be.
        """
        transaction, actor, _ = self._report_access(public_id, recipient_id=recipient_id,
                                                    staff=staff, source_ip=source_ip)
        if not reports.is_uid(sop_uid):
            raise NotFound("no such report")
        found = self._labelled(reports.list_reports(self._study_uids_of(transaction),
                                                    self.store.path, sop_uid=sop_uid))
        entry = found[0] if found else self._held_report(transaction, sop_uid)
        content: bytes | reports.SrDocument
        try:
            if entry.kind == "pdf":
                content = reports.load_pdf(entry.path)
            elif entry.kind == "image":  # an attached picture: shown as PNG
                try:
                    content = rendering.render_bytes(entry.path, media_type="image/png")
                except rendering.RenderError as exc:
                    raise BadDataset(f"cannot show the picture: {exc}") from exc
            else:
                content = reports.render_sr(entry.path)
        except BadDataset as exc:
            audit.record(audit.INSTANCES_ACCESSED, "report-open", actor,
                         outcome=audit.MINOR_FAILURE, patient_id=transaction.patient_id,
                         study_uid=entry.study_uid, transaction=public_id,
                         detail=f"{entry.kind} {sop_uid}: {exc}"[:500])
            raise
        audit.record(audit.INSTANCES_ACCESSED, "report-open", actor,
                     patient_id=transaction.patient_id, study_uid=entry.study_uid,
                     transaction=public_id, detail=f"{entry.kind} {sop_uid}")
        return entry, content

    def attachments_view(self, public_id: str, *, recipient_id: int | None = None,
                         staff: StaffUser | None = None,
                         source_ip: str = "") -> attachments.AttachmentsView:
        """The attachments of a transaction and the studies a new one may join (audited).

        A recipient may look at the list of a declined or expired transaction (nothing
        can be attached to it); the files themselves are then Gone like the download.
        """
        if recipient_id is not None:
            recipient = recipients_q.recipient_by_id(recipient_id)
            transaction = transactions.get_for_recipient(recipient, public_id)
            closed = attaching.closed_for_recipient(transaction)
            actor = Actor("recipient", recipient.email, source_ip)
        else:
            transaction, actor, _ = self._report_access(public_id, staff=staff,
                                                        source_ip=source_ip)
            closed = ""
        audit.record(audit.PATIENT_RECORD, "view-attachments", actor,
                     patient_id=transaction.patient_id, transaction=public_id)
        return attachments.view(transaction, closed, self.settings.max_attachments)

    def add_attachment(self, public_id: str, *, data: bytes, original_name: str,
                       title: str = "", study_uid: str = "", recipient_id: int | None = None,
                       staff: StaffUser | None = None, source_ip: str = "") -> Attachment:
        """Attach a PDF/JPEG/PNG to a transaction's study; see :func:`attaching.add`.

        Raises
        ------
        AttachmentRefused
            The file was refused (nothing stored); the message says why.
        NotFound, Gone, InvalidRequest
            As :meth:`open_report`; no study chosen when there are several.
        """
        transaction, actor, label = self._report_access(
            public_id, recipient_id=recipient_id, staff=staff, source_ip=source_ip)
        return attaching.add(self.store, transaction, data=data,
                               original_name=original_name, title=title, study_uid=study_uid,
                               actor=actor, author_label=label,
                               max_attachments=self.settings.max_attachments)

    def file_attachment(self, public_id: str, attachment_id: int, *, staff: StaffUser,
                        source_ip: str = "") -> Attachment:
        """File an attachment the transaction holds into the patient's study (staff).

        See :func:`attachment_filing.file_into_study` (who may, once only, audited).

        Raises
        ------
        NotFound, Gone, NotAuthorized, InvalidRequest
            No such transaction or attachment; purged; not allowed; already filed.
        """
        transaction, actor, _ = self._report_access(public_id, staff=staff,
                                                    source_ip=source_ip)
        return attachment_filing.file_into_study(self.ingester, transaction, attachment_id,
                                           user=staff, actor=actor)

    def remove_attachment(self, public_id: str, attachment_id: int, *, staff: StaffUser,
                          source_ip: str = "") -> Attachment:
        """Delete an attachment the transaction holds (not filed); see
        :func:`attachment_filing.remove`.

        Raises
        ------
        NotFound, Gone, NotAuthorized, InvalidRequest
            As :meth:`file_attachment`; a filed one cannot be removed.
        """
        transaction, actor, _ = self._report_access(public_id, staff=staff,
                                                    source_ip=source_ip)
        return attachment_filing.remove(self.store, transaction, attachment_id, user=staff,
                                  actor=actor)
