"""Requests for images and the uploads that answer them (issue 7).

A request (:mod:`iepnode.uploads.image_requests`) asks an individual for images; they
answer with an upload staged by :mod:`iepnode.uploads.staging` (each file inspected by
:mod:`iepnode.uploads.intake`); on Send, :meth:`RequestService.send_upload` has it
checked by :mod:`iepnode.uploads.review` for staff, who release or reject it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from config import Settings
from iepnode.archive.ingest import Ingester
from iepnode.outbound.messaging import DeliveryError, Messenger
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.sharing.service import SharingService, channel_note
from iepnode.uploads import housekeeping as upload_housekeeping
from iepnode.uploads import image_requests
from iepnode.uploads import listing as upload_listing
from iepnode.uploads import release as upload_release
from iepnode.uploads import review as upload_review
from iepnode.uploads import staging as uploads
from storage import registry
from storage.models import StaffUser, Transaction, Upload

log = logging.getLogger("iepnode.uploads")


class RequestService:
    """Requests for images, and the review, release and rejection of their uploads.

    Parameters
    ----------
    settings : Settings
        Public URL, time zone, data folder, release settings.
    messenger : Messenger
        Mails the request link, the confirmation and the staff notice.
    ingester : Ingester
        Stores a released upload.
    uploads : UploadService
        Staging and the chunk protocol of uploads.
    sharing : SharingService
        The hospital contact of a new request.
    """

    def __init__(self, settings: Settings, messenger: Messenger, ingester: Ingester,
                 uploads: uploads.UploadService, sharing: SharingService) -> None:
        self.settings = settings
        self.messenger = messenger
        self.ingester = ingester
        self.uploads = uploads
        self.sharing = sharing

    async def create_request(self, request: image_requests.NewRequest, *, actor: Actor,
                             user: StaffUser | None = None) -> Transaction:
        """Create a request for images, email its link to the recipient, audit it.

        Raises
        ------
        InvalidRequest
            See :func:`iepnode.uploads.image_requests.create_request`.
        DeliveryError
            The email could not be sent (the request stays).
        """
        transaction, token = await asyncio.to_thread(
            image_requests.create_request, request, contact=self.sharing.contact_for(user),
            institution=self.settings.institution, created_by=actor.name)
        await asyncio.to_thread(
            audit.record, audit.PATIENT_RECORD, "request-create", actor,
            patient_id=transaction.patient_id, transaction=transaction.public_id,
            detail=f"to {transaction.recipient.email}"
                   f"{channel_note(transaction.recipient, request.otp_mobile, request.otp_email)}")
        subject, text = image_requests.request_email(
            transaction, f"{self.settings.public_url}/t/{token}", self.settings.zone)
        await self.messenger.send_email(transaction.recipient.email, subject, text,
                                        kind="request-link")
        return transaction

    async def send_upload(self, recipient_id: int, public_id: str,
                          patient: uploads.ConfirmedPatient, message: str,
                          source_ip: str = "") -> Upload:
        """The uploader confirms an upload (see :meth:`UploadService.send`); the uploader
        gets a confirmation email and the hospital contact a notice (failures to send
        either are logged and audited, the upload stands)."""
        upload = await asyncio.to_thread(self.uploads.send, recipient_id, public_id, patient,
                                         message, source_ip)
        await asyncio.to_thread(self._check_sent_upload, upload.id)  # reconcile: staff review

        def facts() -> tuple[Transaction, int, int]:
            files = list(upload.files)
            return upload.transaction, len(files), sum(f.size for f in files)

        transaction, count, size = await asyncio.to_thread(facts)
        subject, text = image_requests.upload_confirmation_email(
            transaction, count, size, upload.sent_at or time.time(), self.settings.zone)
        notices = [(upload.uploader, subject, text, "upload-confirmation")]
        if transaction.contact_email:
            notices.append((transaction.contact_email,
                            f"Upload received for request {transaction.public_id}",
                            f"{count} files ({size / 1e6:.1f} MB) were uploaded in answer to "
                            f"request {transaction.public_id}. Review them before release:\n"
                            f"{self.settings.public_url}/admin/uploads/{upload.id}\n",
                            "upload-notice"))
        for to, subject, text, kind in notices:
            try:
                await self.messenger.send_email(to, subject, text, kind=kind)
            except DeliveryError as exc:
                log.warning("%s for %s not sent: %s", kind, public_id, exc)
                await asyncio.to_thread(
                    audit.record, audit.INSTANCES_TRANSFERRED, f"{kind}-not-sent",
                    audit.Actor("system", "uploads"), outcome=audit.MINOR_FAILURE,
                    transaction=public_id, detail=str(exc)[:500])
        return upload

    def intake_upload(self, upload_id: int, actor: Actor | None = None, *,
                      fresh: bool = False) -> upload_review.Review:
        """Check a sent upload for staff (audited); release it at once when the settings
        allow automatic release and nothing is flagged. See :func:`upload_review.intake`.
        """
        review = upload_review.intake(upload_id, self.settings.data_dir, actor=actor,
                                      fresh=fresh)
        if self.settings.upload_auto_release and not review.flagged and not fresh:
            upload = upload_review.get_upload(upload_id)
            if upload.status == upload_review.SENT:
                self.release_upload(upload_id, audit.Actor("system", "auto-release"))
        return review

    def _check_sent_upload(self, upload_id: int) -> None:
        """Intake right after Send; a failure is logged, the upload stays for staff."""
        try:
            self.intake_upload(upload_id)
        except Exception:
            log.exception("intake of upload %s failed: staff can check it again", upload_id)

    def release_upload(self, upload_id: int, actor: Actor,
                       exclude: frozenset[str] = frozenset()) -> upload_release.ReleaseResult:
        """Reconcile, store and (when configured) send a sent upload to the PACS."""
        return upload_release.release(
            upload_id, data_dir=self.settings.data_dir, ingester=self.ingester, actor=actor,
            exclude=exclude, modifying_system=self.settings.ae_title,
            default_issuer=self.settings.upload_issuer, pacs_ae=self.settings.upload_pacs_ae)

    def reject_upload(self, upload_id: int, actor: Actor, reason: str = "") -> None:
        """Refuse a sent upload; its staged files are deleted."""
        upload_release.reject(upload_id, data_dir=self.settings.data_dir, actor=actor,
                              reason=reason)

    def upload_rows(self) -> list[upload_listing.UploadRow]:
        """Uploads for the staff list, those waiting first."""
        return upload_listing.list_uploads()

    def upload_detail(self, upload_id: int) -> upload_listing.UploadDetail:
        """One upload for the staff review page."""
        return upload_listing.detail(upload_id)

    def upload_pacs_problem(self) -> str:
        """Why released uploads cannot reach ``[portal] upload_pacs_ae`` ('' when fine)."""
        title = self.settings.upload_pacs_ae
        if not title:
            return ""
        ae = registry.get_remote_ae(title)
        if ae is None or not ae.send_to:
            return (f"[portal] upload_pacs_ae is {title}, which is not a registered send "
                    f"destination: released uploads will not be sent to the PACS. Register "
                    f"it with `iepnode ae add {title} HOST PORT --send-to`.")
        return ""

    def purge_abandoned_uploads(self) -> int:
        """Delete staging of uploads never sent (housekeeping); return folders removed."""
        return upload_housekeeping.purge_abandoned(self.settings.data_dir,
                                                   self.settings.upload_staging_hours * 3600)
