"""The node façade: the one object DICOM handlers, web views and the CLI call."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from config import Settings
from iepnode.archive.ingest import Ingester, StoreResult
from iepnode.archive.query import (
    Query,
    Root,
    iter_instance_keys,
    iter_matches,
    parse_identifier,
    parse_retrieve_identifier,
)
from iepnode.errors import (
    BadDataset,
    Gone,
    InvalidRequest,
    LoginRefused,
    NotAuthorized,
    NotFound,
    PasscodeRejected,
    UnknownDestination,
)
from iepnode.outbound import notifications, routing, sending
from iepnode.outbound.messaging import DeliveryError, Messenger
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.security import load_or_create_secret
from iepnode.sharing import (
    checksums,
    download_stream,
    downloads,
    forward_mail,
    forwarding,
    logins,
    package,
    recipients,
    transactions,
)
from iepnode.sharing.logins import NewSession, PasscodeToSend
from iepnode.sharing.transactions import Contact, NewTransfer, StudyRow
from iepnode.staff_side import StaffSide, build_staff_side
from iepnode.uploads import image_requests
from iepnode.uploads import review as upload_review
from iepnode.uploads import staging as uploads
from iepnode.viewing import attachments, rendering, reports
from iepnode.viewing.dicomweb import DicomWebService
from iepnode.viewing.service import ViewingService
from storage import hot_queries, index, registry
from storage.db import open_database
from storage.filestore import FileStore
from storage.group_commit import GroupCommitter
from storage.models import (
    Attachment,
    LoginAttempt,
    Recipient,
    RemoteAE,
    RouteRule,
    SendJob,
    StaffUser,
    Study,
    Transaction,
    TransactionMessage,
    TransactionStudy,
    Upload,
    WebSession,
)

log = logging.getLogger("iepnode.node")

#: Audit EventID (DCM 110110) for a recipient viewing or acting on a transaction's record.
PATIENT_RECORD = ("110110", "Patient Record")


@dataclass(frozen=True)
class RetrieveItem:
    """One stored instance selected for C-MOVE / C-GET / export (``key``: its store key)."""

    key: str
    sop_class: str
    sop_uid: str
    transfer_syntax: str


@dataclass(frozen=True)
class LinkLogin:
    """The login page of an emailed link: the usable attempt and where its passcode went."""

    attempt_id: int | None
    channel: str
    destination: str
    contact: Contact
    #: The recipient has an authenticator app: the page asks for its code first.
    totp: bool = False
    locked: bool = False


@dataclass(frozen=True)
class RecipientView:
    """One transaction as its recipient sees it (all rows loaded: safe to render anywhere)."""

    transaction: Transaction
    studies: list[StudyRow]
    messages: list[TransactionMessage]
    unread: int
    expired: bool
    can_decline: bool
    contact: Contact
    recipient: Recipient


@dataclass(frozen=True)
class RecipientDashboard:
    """A recipient's dashboard: the transactions of one tab and the counts of all tabs."""

    recipient: Recipient
    transactions: list[RecipientView]
    action_count: int
    all_count: int
    unread: int
    days: int


class Node:
    """Everything the node does, behind one object.

    Parameters
    ----------
    settings : Settings
        Validated settings; the database is opened and the store created.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.database = open_database(settings.resolved_database_url)
        #: Page views' small writes (audit events, read marks) share commits.
        self.group_commit = GroupCommitter(self.database)
        self.store = FileStore(settings.store_dir, settings.tmp_dir, durable=settings.fsync)
        self.ingester = Ingester(
            self.store, replace_duplicates=settings.duplicate_policy == "replace",
            max_inflated=settings.max_inflated_mb << 20,
        )
        # hardening (issue 13): frames decoded at once in this process (each is whole
        # in memory while it is rendered).
        rendering.set_concurrency(settings.render_concurrency)
        self._secret: bytes | None = None
        self._admin: StaffSide | None = None
        self._messenger: Messenger | None = None

    def close(self) -> None:
        """Return this thread's database connection to the pool (call when a thread is done)."""
        if not self.database.is_closed():
            self.database.close()

    # -- peers ---------------------------------------------------------------------------

    def authorize(self, calling_ae: str, peer_host: str | None) -> RemoteAE:
        """Check that a calling AE is registered and connects from its address.

        Raises
        ------
        NotAuthorized
            If the AE title is unknown or the peer address differs.
        """
        ae = registry.get_remote_ae(calling_ae.strip())
        if ae is None:
            raise NotAuthorized(f"calling AE title {calling_ae.strip()!r} is not registered")
        if peer_host is not None and not _same_host(ae.host, peer_host):
            raise NotAuthorized(
                f"calling AE {ae.ae_title!r} connected from {peer_host}, registered as {ae.host}"
            )
        return ae

    def require_service(self, calling_ae: str, service: str) -> None:
        """Raise :class:`NotAuthorized` unless ``calling_ae`` may use ``service``."""
        ae = registry.get_remote_ae(calling_ae.strip())
        if ae is None or service not in ae.allowed:
            raise NotAuthorized(f"{calling_ae.strip()!r} is not allowed {service}")

    def move_destination(self, ae_title: str) -> RemoteAE:
        """Return the registered AE a C-MOVE may send to.

        Raises
        ------
        UnknownDestination
            If no remote AE with that title is registered.
        """
        ae = registry.get_remote_ae(ae_title.strip())
        if ae is None:
            raise UnknownDestination(f"move destination {ae_title.strip()!r} is not registered")
        return ae

    # -- ingest --------------------------------------------------------------------------

    def store_received(
        self, stream: bytes, transfer_syntax: str, *, calling_ae: str, sop_class: str,
        sop_uid: str,
    ) -> StoreResult:
        """Store one C-STORE dataset; see :meth:`Ingester.ingest`."""
        return self.ingester.ingest(
            stream, transfer_syntax, source_ae=calling_ae, expected_sop_class=sop_class,
            expected_sop_uid=sop_uid,
        )

    # -- query / retrieve ----------------------------------------------------------------

    def find(self, identifier: Dataset, root: Root) -> Iterator[Dataset]:
        """Yield a C-FIND response identifier per match.

        Raises
        ------
        BadQuery
            If the identifier cannot be answered.
        """
        query = parse_identifier(identifier, root)
        for values in iter_matches(query):
            yield self._response(query, values)

    def _response(self, query: Query, values: dict[str, object]) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = query.level.name
        ds.RetrieveAETitle = self.settings.ae_title
        non_ascii = False
        for keyword in query.return_keys:
            value = values.get(keyword)
            value = "" if value is None else value
            if isinstance(value, str):
                non_ascii = non_ascii or not value.isascii()
                if "\\" in value:
                    value = value.split("\\")
            setattr(ds, keyword, value)
        for keyword in query.unsupported_keys:
            setattr(ds, keyword, None)
        if non_ascii:
            ds.SpecificCharacterSet = "ISO_IR 192"
        return ds

    def retrieve(self, identifier: Dataset, root: Root) -> list[RetrieveItem]:
        """Return the stored instances a C-MOVE/C-GET identifier selects.

        Raises
        ------
        BadQuery
            If the identifier lacks its level's unique key (see
            :func:`~iepnode.archive.query.parse_retrieve_identifier`).
        """
        query = parse_retrieve_identifier(identifier, root)
        return [
            RetrieveItem(key, sop_class, sop_uid, ts)
            for key, sop_class, sop_uid, ts in iter_instance_keys(query)
        ]

    def retrieved_dataset(self, item: RetrieveItem) -> Dataset:
        """The stored instance of a C-MOVE/C-GET sub-operation, its values read lazily.

        Raises
        ------
        BadDataset
            The stored file cannot serve (missing, unreadable, cut short...): the
            reason is :func:`storage.stored_file.unreadable_reason`'s, in plain words.
        """
        from pydicom import dcmread

        from storage.stored_file import unreadable_reason

        path = self.store.path(item.key)
        reason = unreadable_reason(path)
        if reason is not None:
            raise BadDataset(reason)
        return dcmread(path)

    def counts(self) -> dict[str, int]:
        """Return how many patients, studies and instances are indexed."""
        from storage.models import Instance, Patient

        with self.database.connection_context():
            return {
                "patients": Patient.select().count(),
                "studies": Study.select().count(),
                "instances": Instance.select().count(),
            }

    # -- studies & file-sets -------------------------------------------------------------

    def study(self, study_uid: str) -> Study | None:
        """Return the indexed study with this Study Instance UID, or ``None``."""
        return Study.get_or_none(Study.study_uid == study_uid)

    def fileset_path(self, study: Study) -> Path:
        """Folder of the study's DICOMDIR file-set (named by generated key)."""
        return self.settings.fileset_dir / study.key

    def build_fileset(self, study_uid: str) -> Path:
        """Build (or rebuild) the study's DICOMDIR file-set now; return its folder.

        Instances whose stored files cannot be read are left out (see
        :meth:`_write_fileset`).

        Raises
        ------
        KeyError
            If no such study is indexed.
        storage.fileset.FilesetError
            If none of its files can be read, or the folder cannot be written.
        OSError
            If the file system fails.
        """
        return self._write_fileset(study_uid)[0]

    def _write_fileset(self, study_uid: str) -> tuple[Path, list[str]]:
        """Build the study's file-set; return its folder and the store keys left out.

        Each instance left out (its file missing, unreadable, empty, not DICOM or cut
        short) gets a warning line and a Security Alert audit event (DCM 110113,
        minor failure) naming the study, the SOP Instance UID, the store key and the
        reason, once per build.
        """
        from storage.fileset import NoUsableMember, write_fileset

        study = self.study(study_uid)
        if study is None:
            raise KeyError(study_uid)
        built_from = study.last_received
        rows = {self.store.path(i.key): i for i in index.study_files(study)}
        dest = self.fileset_path(study)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            plan = write_fileset(dest, list(rows))
        except NoUsableMember as exc:
            self._report_left_out(study, [(rows[m.path], m.reason) for m in exc.left_out])
            raise
        self._report_left_out(study, [(rows[m.path], m.reason) for m in plan.left_out])
        index.mark_fileset_built(study.id, built_from)
        log.info("file-set built for study %s: %d instances in %s%s", study_uid,
                 len(plan.files), dest,
                 f" ({len(plan.left_out)} unreadable left out)" if plan.left_out else "")
        return dest, [rows[m.path].key for m in plan.left_out]

    def _report_left_out(self, study: Study, left_out: list[tuple[Any, str]]) -> None:
        """Log and audit the instances a file-set build leaves out."""
        if not left_out:
            return
        patient_id = study.patient.patient_id
        for instance, reason in left_out:
            log.warning("file-set of study %s: left out instance %s (file %s): %s",
                        study.study_uid, instance.sop_uid, instance.key, reason)
            audit.record(audit.SECURITY_ALERT, "stored-file-unreadable",
                         audit.Actor("system", "file-set"), outcome=audit.MINOR_FAILURE,
                         patient_id=patient_id, study_uid=study.study_uid,
                         detail=f"instance {instance.sop_uid} (file {instance.key}) left out "
                                f"of the study's file-set: {reason}")

    # -- transactions and recipient login (issue 3) ---------------------------------------

    @property
    def admin(self) -> StaffSide:
        """Staff-side services for the /admin pages and the CLI's admin commands."""
        if self._admin is None:
            self._admin = build_staff_side(self.settings, lambda: self.secret,
                                           self.messenger)
        return self._admin

    @property
    def secret(self) -> bytes:
        """The node's secret key (``DATA_DIR/secret.key``), created on first use."""
        if self._secret is None:
            self._secret = load_or_create_secret(self.settings.data_dir)
        return self._secret

    @property
    def messenger(self) -> Messenger:
        """Outgoing mail and SMS (SMTP / gateway, or the outbox folder)."""
        if self._messenger is None:
            self._messenger = Messenger(self.settings)
        return self._messenger

    def contact_for(self, user: StaffUser | None) -> Contact:
        """The hospital contact shown with a transaction created by ``user``."""
        if user is None:
            return Contact(name=self.settings.institution)
        return Contact(user.display_name or user.username, user.department, user.email,
                       user.phone)

    async def share(self, request: NewTransfer, *, actor: Actor,
                    user: StaffUser | None = None) -> Transaction:
        """Create a transfer, email its link to the recipient, and audit both.

        Raises
        ------
        InvalidRequest
            The request breaks a rule (see :func:`iepnode.sharing.transactions.create_transfer`).
        DeliveryError
            The email could not be sent (the transaction stays; staff can resend).
        """
        transaction, token = await asyncio.to_thread(
            transactions.create_transfer, request, contact=self.contact_for(user),
            institution=self.settings.institution, created_by=actor.name,
        )
        await asyncio.to_thread(
            audit.record, audit.EXPORT, "transfer-create", actor,
            patient_id=transaction.patient_id, transaction=transaction.public_id,
            study_uid=",".join(request.study_uids)[:64],
            detail=f"to {transaction.recipient.email}"
                   f"{_channel_note(transaction.recipient, request.otp_mobile, request.otp_email)}",
        )
        subject, text = notifications.transfer_email(
            transaction, f"{self.settings.public_url}/t/{token}", self.settings.zone)
        await self.messenger.send_email(transaction.recipient.email, subject, text,
                                        kind="transfer-link")
        return transaction

    async def send_passcode(self, token: str, source_ip: str = "") -> PasscodeToSend:
        """Start a login from an emailed link: send a passcode to the second channel.

        Raises
        ------
        NotFound
            The link is unknown or expired.
        RecipientLocked, RateLimited
            No passcode is sent.
        DeliveryError
            The SMS/email could not be sent: the attempt is discarded (so asking
            again is not rate-limited) and the failure audited.
        """
        transaction = await asyncio.to_thread(transactions.by_link_token, token)
        ttl = self.settings.passcode_ttl_minutes * 60.0
        sent = await asyncio.to_thread(logins.start_attempt, transaction, self.secret, ttl)
        text = notifications.passcode_text(sent.code, self.settings.institution,
                                           self.settings.passcode_ttl_minutes)
        try:
            if sent.channel == "sms":
                await self.messenger.send_sms(sent.destination, text)
            else:
                await self.messenger.send_email(sent.destination, "Your passcode", text,
                                                kind="passcode")
        except DeliveryError as exc:
            await asyncio.to_thread(self._passcode_not_sent, sent, transaction, source_ip, exc)
            raise
        return sent

    def _passcode_not_sent(self, sent: PasscodeToSend, transaction: Transaction,
                           source_ip: str, exc: Exception) -> None:
        logins.discard_attempt(sent)
        audit.record(audit.USER_AUTHENTICATION, "passcode-not-sent",
                     audit.Actor("recipient", transaction.recipient.email, source_ip),
                     outcome=audit.SERIOUS_FAILURE, transaction=transaction.public_id,
                     patient_id=transaction.patient_id, detail=f"{sent.channel}: {exc}"[:500])

    def resume_session(self, token: str) -> WebSession:
        """Return the live session for a cookie value (see :func:`logins.resume_session`)."""
        return logins.resume_session(token, run_write=self.group_commit.run)

    def log_in(self, token: str, attempt_id: int, code: str, source_ip: str = "") -> NewSession:
        """Check a passcode typed on the page a link opened; open a session.

        Raises
        ------
        NotFound
            The link is unknown or expired.
        LoginRefused
            Wrong/expired/reused passcode, dead attempt or locked recipient (audited).
        """
        transaction = transactions.by_link_token(token)
        attempt = LoginAttempt.get_or_none(LoginAttempt.id == attempt_id)
        actor = audit.Actor("recipient", transaction.recipient.email, source_ip)
        if attempt is None or attempt.transaction_id != transaction.id:
            audit.record(audit.USER_AUTHENTICATION, "login-failed", actor,
                         outcome=audit.MINOR_FAILURE, transaction=transaction.public_id,
                         detail="attempt does not belong to this link")
            raise PasscodeRejected("this login has expired: ask for a new passcode")
        try:
            recipient = logins.verify_passcode(attempt_id, code, self.secret)
        except LoginRefused as exc:
            audit.record(audit.USER_AUTHENTICATION, "login-failed", actor,
                         outcome=audit.MINOR_FAILURE, transaction=transaction.public_id,
                         patient_id=transaction.patient_id, detail=type(exc).__name__)
            raise
        audit.record(audit.USER_AUTHENTICATION, "login", actor,
                     transaction=transaction.public_id, patient_id=transaction.patient_id)
        return logins.open_session(recipient)

    # -- recipient pages (issue 3): thin wrappers the web views call in a thread ---------

    def link_login(self, token: str) -> LinkLogin:
        """Where a link's passcode goes, its latest usable attempt, and the hospital contact.

        Raises
        ------
        NotFound
            The link is unknown or expired.
        """
        transaction = transactions.by_link_token(token)
        recipient = Recipient.get_by_id(transaction.recipient_id)
        attempt = (
            LoginAttempt.select()
            .where((LoginAttempt.transaction == transaction.id)
                   & LoginAttempt.used_at.is_null() & (LoginAttempt.dead == False)  # noqa: E712
                   & (LoginAttempt.expires_at > time.time()))
            .order_by(LoginAttempt.created_at.desc(), LoginAttempt.id.desc())
            .first()
        )
        channel = recipients.channel_of(recipient)
        return LinkLogin(attempt.id if attempt else None, channel.kind, channel.destination,
                         _contact(transaction), totp=bool(recipient.totp_secret),
                         locked=recipient.locked_at is not None)

    def end_session(self, token: str) -> None:
        """Log out: the session cookie value is dead from now on."""
        logins.end_session(token)

    def recipient_dashboard(self, recipient_id: int, tab: str,
                            source_ip: str = "") -> RecipientDashboard:
        """A recipient's dashboard: ``home`` (counts only), ``action`` or ``all``.

        Every transaction shown with its details is audited as viewed, and its
        messages are marked read (``unread`` still counts them for this page).
        """
        # Reads run outside any transaction; the page's writes (read marks, audit
        # events) commit together at the end in a short write transaction, so the
        # database's single write lock is held for those statements only.
        recipient = hot_queries.recipient(recipient_id)
        if recipient is None:
            raise NotFound("no such recipient")
        days = self.settings.dashboard_days
        everything = transactions.for_recipient(recipient, action_required=False, days=days)
        now = time.time()
        action = [t for t in everything if transactions.is_open(t, now)]
        unread = hot_queries.unread_messages([t.id for t in everything])
        shown = {"action": action, "all": everything}.get(tab, [])
        views = self._views(shown, recipient, source_ip, f"dashboard {tab}")
        return RecipientDashboard(recipient, views, len(action), len(everything), unread, days)

    def recipient_transaction(self, recipient_id: int, public_id: str,
                              source_ip: str = "") -> RecipientView:
        """One of the recipient's transactions with its studies and thread (audited).

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        """
        recipient = Recipient.get_by_id(recipient_id)
        transaction = transactions.get_for_recipient(recipient, public_id)
        return self._views([transaction], recipient, source_ip, "transaction page")[0]

    def decline(self, recipient_id: int, public_id: str, reason: str,
                source_ip: str = "") -> None:
        """Decline one of the recipient's transactions with a reason (audited).

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        InvalidRequest
            No reason, or the transaction can no longer be declined.
        """
        recipient = Recipient.get_by_id(recipient_id)
        transaction = transactions.get_for_recipient(recipient, public_id)
        transactions.decline(transaction, reason)
        audit.record(PATIENT_RECORD, "decline", audit.Actor("recipient", recipient.email,
                                                            source_ip),
                     patient_id=transaction.patient_id, transaction=transaction.public_id)

    def post_message(self, recipient_id: int, public_id: str, body: str,
                     source_ip: str = "") -> None:
        """Add the recipient's message to one of their transactions (audited, body not).

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        InvalidRequest
            An empty or too long message.
        """
        recipient = Recipient.get_by_id(recipient_id)
        transaction = transactions.get_for_recipient(recipient, public_id)
        transactions.add_message(transaction, "recipient", recipient.email, body)
        audit.record(PATIENT_RECORD, "message", audit.Actor("recipient", recipient.email,
                                                            source_ip),
                     patient_id=transaction.patient_id, transaction=transaction.public_id)

    # -- recipient authenticator app (TOTP): enrol, remove, log in with a code -----------

    @property
    def _totp_issuer(self) -> str:
        return self.settings.institution.replace(":", " ").strip() or "iepnode"

    def recipient_authenticator(self, recipient_id: int, session_id: int,
                                ) -> tuple[Recipient, logins.TotpEnrolment | None]:
        """The recipient and, unless an app is enrolled, a new secret to enrol."""
        recipient = Recipient.get_by_id(recipient_id)
        if recipient.totp_secret:
            return recipient, None
        return recipient, logins.totp_enrolment(recipient, session_id, self.secret,
                                                 self._totp_issuer)

    def recipient_contact(self, recipient_id: int) -> Contact:
        """Whom the recipient asks for help: the contact of their newest transaction."""
        newest = transactions.newest_for(recipient_id)
        return _contact(newest) if newest else Contact(name=self.settings.institution)

    def check_totp_enrolment(self, recipient_id: int, session_id: int, totp_secret: str,
                             signature: str) -> logins.TotpEnrolment:
        """The enrolment an enrolment form sent back, if made for this session.

        Raises
        ------
        InvalidRequest
            The secret or its signature was changed, or belongs to another session.
        """
        return logins.check_totp_enrolment(Recipient.get_by_id(recipient_id), session_id,
                                           self.secret, self._totp_issuer, totp_secret,
                                           signature)

    def enrol_totp(self, recipient_id: int, enrolment: logins.TotpEnrolment, code: str,
                   source_ip: str = "") -> None:
        """Save the recipient's authenticator app once a code from it checks out (audited).

        Raises
        ------
        InvalidRequest
            A wrong code, or an app is enrolled already.
        """
        recipient = Recipient.get_by_id(recipient_id)
        actor = audit.Actor("recipient", recipient.email, source_ip)
        try:
            logins.enrol_totp(recipient_id, enrolment, code)
        except InvalidRequest as exc:
            audit.record(audit.SECURITY_ALERT, "recipient-totp-enrol", actor,
                         outcome=audit.MINOR_FAILURE, detail=f"refused: {exc}"[:200])
            raise
        audit.record(audit.SECURITY_ALERT, "recipient-totp-enrol", actor)

    def remove_totp(self, recipient_id: int, code: str, source_ip: str = "") -> None:
        """Remove the recipient's authenticator app; needs a current code (audited).

        Raises
        ------
        PasscodeRejected, RecipientLocked
            A wrong or reused code (it counts towards the lockout), or a locked recipient.
        """
        recipient = Recipient.get_by_id(recipient_id)
        actor = audit.Actor("recipient", recipient.email, source_ip)
        try:
            logins.remove_totp(recipient_id, code)
        except LoginRefused as exc:
            audit.record(audit.SECURITY_ALERT, "recipient-totp-remove", actor,
                         outcome=audit.MINOR_FAILURE, detail=type(exc).__name__)
            raise
        audit.record(audit.SECURITY_ALERT, "recipient-totp-remove", actor)

    def log_in_app(self, token: str, code: str, source_ip: str = "") -> NewSession:
        """Check a code from the link recipient's authenticator app; open a session.

        Raises
        ------
        NotFound
            The link is unknown or expired.
        LoginRefused
            No app enrolled, a wrong or reused code, or a locked recipient (audited;
            wrong codes count towards the lockout).
        """
        transaction = transactions.by_link_token(token)
        actor = audit.Actor("recipient", transaction.recipient.email, source_ip)
        try:
            recipient = logins.verify_totp(transaction.recipient_id, code)
        except LoginRefused as exc:
            audit.record(audit.USER_AUTHENTICATION, "login-failed", actor,
                         outcome=audit.MINOR_FAILURE, transaction=transaction.public_id,
                         patient_id=transaction.patient_id,
                         detail=f"totp {type(exc).__name__}")
            raise
        audit.record(audit.USER_AUTHENTICATION, "login", actor, detail="totp",
                     transaction=transaction.public_id, patient_id=transaction.patient_id)
        return logins.open_session(recipient)

    def _views(self, shown: list[Transaction], recipient: Recipient, source_ip: str,
               where: str) -> list[RecipientView]:
        """Load what the recipient sees of ``shown`` in a few batched queries (audited).

        One query each for the studies, the images held and the messages of all
        shown transactions, one update marking their messages read and one insert
        of their audit events: a dashboard costs the same handful of statements
        whatever the number of rows.
        """
        if not shown:
            return []
        ids = [t.id for t in shown]
        studies: dict[int, list[TransactionStudy]] = {i: [] for i in ids}
        for row in hot_queries.studies_of(ids):
            studies[row.transaction_id].append(row)
        held = hot_queries.images_held(sorted({r.study_uid for rows in studies.values()
                                               for r in rows}))
        messages: dict[int, list[TransactionMessage]] = {i: [] for i in ids}
        for message in hot_queries.messages_of(ids):
            messages[message.transaction_id].append(message)
        unread_ids = [m.id for ms in messages.values() for m in ms if not m.read_by_recipient]
        actor = audit.Actor("recipient", recipient.email, source_ip)
        viewed = [(t.patient_id, t.public_id, where) for t in shown]

        def note_viewed() -> None:
            hot_queries.mark_read(unread_ids)
            audit.record_many(PATIENT_RECORD, "view-transaction", actor, viewed)

        self.group_commit.run(note_viewed)
        now = time.time()
        views = []
        for transaction in shown:
            expired = transactions.is_expired(transaction, now)
            rows = studies[transaction.id]
            views.append(RecipientView(
                transaction,
                [StudyRow(r, 0 if transaction.purged_at else held.get(r.study_uid, 0))
                 for r in rows],
                messages[transaction.id],
                sum(not m.read_by_recipient for m in messages[transaction.id]),
                expired, transactions.is_open(transaction, now),
                _contact(transaction), recipient,
            ))
        return views

    def purge_expired(self) -> int:
        """Expire due transactions and delete studies no live transaction holds.

        Returns
        -------
        int
            The number of instances deleted.
        """
        transactions.expire_due()
        uids, expired = transactions.studies_to_purge()
        removed = 0
        for uid in uids:
            for key in index.delete_study(uid):
                self.store.remove(key)
                removed += 1
            log.info("purged study %s: every transaction holding it has expired", uid)
        transactions.mark_purged(expired)
        for key in attachments.purge_held(t.id for t in expired):
            self.store.remove(key)
        self.sweep_protected_downloads()
        for transaction in expired:
            audit.record(audit.EXPORT, "purge", audit.Actor("system", "retention"),
                         outcome=audit.SUCCESS, transaction=transaction.public_id,
                         patient_id=transaction.patient_id, detail="expired package purged")
        return removed

    def remove_orphan_filesets(self) -> int:
        """Delete file-set folders whose study is no longer indexed; return how many.

        A study disappears when its last instance is deleted or replaced by one of
        another study; its folder of hard links would otherwise stay forever.
        Hidden staging folders of builds in progress are left alone.
        """
        root = self.settings.fileset_dir
        if not root.is_dir():
            return 0
        names = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        if not names:
            return 0
        known = {s.key for s in Study.select(Study.key).where(Study.key.in_(list(names)))}
        removed = 0
        for name in sorted(names - known):
            shutil.rmtree(root / name, ignore_errors=True)
            log.info("removed file-set %s: its study is no longer stored", name)
            removed += 1
        return removed

    def remote_aes(self) -> list[RemoteAE]:
        """Return the registered remote AEs."""
        return registry.list_remote_aes()

    def build_stable_filesets(self) -> int:
        """Build file-sets of studies stable for ``stable_age`` seconds; return how many.

        A study whose build fails (any exception) is tried again after
        ``fileset_retry_seconds``, doubling after each further failure up to
        ``fileset_retry_max_seconds``; the attempts and the next retry time are kept
        in the study's row (:func:`storage.index.claim_fileset_build`), so the back-off
        holds across restarts and processes. Each failure is one warning line (with
        the traceback only for the first); a success clears the back-off.
        """
        backoff = sending.RetryPolicy(self.settings.fileset_retry_seconds,
                                      self.settings.fileset_retry_max_seconds)
        built = 0
        for study in index.studies_due_for_fileset(self.settings.stable_age, time.time()):
            delay = backoff.delay(study.fileset_attempts + 1)
            attempt = index.claim_fileset_build(study, time.time(), delay)
            if attempt is None:
                continue  # another process took it, or it is not due any more
            try:
                _, left_out = self._write_fileset(study.study_uid)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                index.record_fileset_failure(study.id, reason)
                log.warning("file-set build of study %s failed (attempt %d; next in %g s): "
                            "%s", study.study_uid, attempt, delay, reason,
                            exc_info=attempt == 1)
                continue
            built += 1
            try:
                checksums.cache_study(study.study_uid, self.store.path, exclude=left_out)
            except Exception:
                log.exception("checksums of study %s not cached", study.study_uid)
        return built

    # -- forward to a person (issue 6) ---------------------------------------------------

    def forward_states(self, rows: list[Any]) -> dict[str, forwarding.ForwardState]:
        """Whether each transaction (model or dashboard row) may be forwarded now."""
        return forwarding.states(rows, max_forwards=self.settings.max_forwards,
                                 now=time.time())

    def _forwardable(self, recipient_id: int, public_id: str,
                     source_ip: str) -> tuple[Recipient, Transaction, forwarding.ForwardState]:
        """The recipient's package and its forward state; refusals are audited and raised."""
        forwarder = Recipient.get_by_id(recipient_id)
        source = transactions.get_for_recipient(forwarder, public_id)
        state = self.forward_states([source])[public_id]
        if not state.allowed:
            audit.record(audit.EXPORT, "forward-refused",
                         audit.Actor("recipient", forwarder.email, source_ip),
                         outcome=audit.MINOR_FAILURE, patient_id=source.patient_id,
                         transaction=public_id, detail=state.reason)
            raise forwarding.ForwardRefused(state.reason)
        return forwarder, source, state

    def forward_dialog(self, recipient_id: int, public_id: str,
                       source_ip: str = "") -> forwarding.ForwardDialog:
        """What the forward dialog of one of the recipient's packages shows (audited).

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        ForwardRefused
            The rules do not allow forwarding it (audited).
        """
        forwarder, source, state = self._forwardable(recipient_id, public_id, source_ip)
        audit.record(PATIENT_RECORD, "view-transaction",
                     audit.Actor("recipient", forwarder.email, source_ip),
                     patient_id=source.patient_id, transaction=public_id,
                     detail="forward dialog")
        return forwarding.ForwardDialog(
            source, forwarder, state, forwarding.known_recipients(forwarder.id),
            forwarding.periods(source.expires_at, time.time(),
                               default_days=self.settings.transaction_expiry_days))

    def forward_history(self, recipient_id: int, public_id: str) -> forwarding.ForwardHistory:
        """The forwarded copies of one of the recipient's packages.

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        """
        forwarder = Recipient.get_by_id(recipient_id)
        source = transactions.get_for_recipient(forwarder, public_id)
        return forwarding.ForwardHistory(source, forwarder,
                                         self.forward_states([source])[public_id],
                                         forwarding.forwards_of(source.id))

    def _create_forward(self, recipient_id: int, public_id: str,
                        request: forwarding.ForwardRequest, source_ip: str,
                        ) -> tuple[forwarding.Forwarded, forwarding.CheckedForward, Recipient]:
        forwarder, source, _ = self._forwardable(recipient_id, public_id, source_ip)
        actor = audit.Actor("recipient", forwarder.email, source_ip)
        checked = forwarding.check_request(
            request, forwarder_email=forwarder.email,
            known=set(forwarding.known_recipients(forwarder.id)))
        try:
            forwarded = forwarding.create_copy(
                source.id, forwarder, checked, max_forwards=self.settings.max_forwards,
                default_days=self.settings.transaction_expiry_days, actor=actor)
        except forwarding.ForwardRefused as exc:
            audit.record(audit.EXPORT, "forward-refused", actor, outcome=audit.MINOR_FAILURE,
                         patient_id=source.patient_id, transaction=public_id,
                         detail=f"to {checked.email}: {exc}")
            raise
        return forwarded, checked, forwarder

    async def forward_to_person(self, recipient_id: int, public_id: str,
                                request: forwarding.ForwardRequest,
                                source_ip: str = "") -> forwarding.Forwarded:
        """Forward one of the recipient's packages to another person.

        The copy is created and audited, its link emailed to the new recipient (who
        logs in with a passcode like any recipient), and the hospital contact of the
        package is told (the notice is audited; failing to send it does not undo the
        forward).

        Raises
        ------
        NotFound
            No such transaction, or it is someone else's.
        ForwardRefused
            The rules do not allow it (audited).
        ForwardInvalid
            Something typed in the dialog is wrong.
        DeliveryError
            The link email could not be sent: the copy is deleted again (it does not
            count) and the failure audited.
        """
        forwarded, checked, forwarder = await asyncio.to_thread(
            self._create_forward, recipient_id, public_id, request, source_ip)
        actor = audit.Actor("recipient", forwarder.email, source_ip)
        who = f"{forwarder.name} ({forwarder.email})" if forwarder.name else forwarder.email
        subject, text = forward_mail.forwarded_email(
            forwarded, who, f"{self.settings.public_url}/t/{forwarded.token}")
        try:
            await self.messenger.send_email(forwarded.recipient.email, subject, text,
                                            kind="forward-link")
        except DeliveryError as exc:
            await asyncio.to_thread(self._forward_not_sent, forwarded, actor, exc)
            raise
        await self._tell_hospital(forwarded, checked, forwarder.email)
        return forwarded

    def _forward_not_sent(self, forwarded: forwarding.Forwarded, actor: Actor,
                          exc: Exception) -> None:
        forwarding.undo(forwarded)
        audit.record(audit.EXPORT, "forward-not-sent", actor, outcome=audit.SERIOUS_FAILURE,
                     patient_id=forwarded.source.patient_id,
                     transaction=forwarded.source.public_id,
                     detail=f"link to {forwarded.recipient.email} not sent, copy "
                            f"{forwarded.copy.public_id} deleted: {exc}"[:500])

    async def _tell_hospital(self, forwarded: forwarding.Forwarded,
                             checked: forwarding.CheckedForward, forwarder_email: str) -> None:
        """Email the source package's hospital contact about a forward (audited)."""
        source = forwarded.source
        to = source.contact_email
        outcome, detail = audit.SUCCESS, f"hospital contact {to} told of {forwarded.copy.public_id}"
        if not to:
            outcome, detail = audit.MINOR_FAILURE, "no hospital contact email: not told"
        else:
            subject, text = forward_mail.hospital_notice(
                forwarded, checked, forwarder_email,
                f"{self.settings.public_url}/admin/transactions/{source.public_id}")
            try:
                await self.messenger.send_email(to, subject, text, kind="forward-notice")
            except DeliveryError as exc:
                outcome, detail = audit.MINOR_FAILURE, f"hospital contact {to} not told: {exc}"
        await asyncio.to_thread(
            audit.record, audit.EXPORT, "forward-notice", audit.Actor("system", "forwarding"),
            outcome=outcome, patient_id=source.patient_id, transaction=source.public_id,
            detail=detail[:500])

    # -- download (issue 5) --
    # The zip package of a transaction or study (iepnode.sharing.package), its CRC cache
    # (iepnode.sharing.checksums), the download rules and password-protected copies
    # (iepnode.sharing.downloads). Web views and the CLI call these in a thread.

    @functools.cached_property
    def _packages(self) -> package.PackageCache:
        return package.PackageCache()

    @functools.cached_property
    def _protected(self) -> downloads.ProtectedStore:
        return downloads.ProtectedStore(self.settings.data_dir / "downloads")

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
            return package.build_package(source, files, checksums.crcs_for, key,
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
        recipient = Recipient.get_by_id(recipient_id)
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
        transaction = Transaction.get_or_none(Transaction.public_id == public_id)
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
        recipient = Recipient.get_by_id(recipient_id)
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
        recipient = Recipient.get_by_id(recipient_id)
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
        recipient = Recipient.get_by_id(recipient_id)
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
            transaction = Transaction.get_or_none(Transaction.public_id == meta.get("public_id"))
            return transaction is not None and downloads.is_downloadable(transaction)

        return self._protected.sweep(keep)

    # -- send to a DICOM node (issue 6) --
    # Sends are jobs in the database (iepnode.outbound.sending); a JobRunner (a thread of the
    # serve main process, or of `iepnode send`) works on them through a transport the
    # composition root provides (scp.sender). Auto-routing rules: iepnode.outbound.routing.

    def send_destinations(self) -> list[RemoteAE]:
        """The remote AEs the node may send studies to."""
        return registry.send_destinations()

    def queue_send(self, study_uids: list[str], ae_title: str, actor: Actor, *,
                   transaction: str = "") -> SendJob:
        """Queue a send of stored studies to a remote AE; see :func:`sending.queue_job`."""
        return sending.queue_job(study_uids, ae_title, actor, transaction=transaction)

    def send_progress(self, job_id: int) -> sending.JobProgress:
        """One send job's progress.

        Raises
        ------
        NotFound
            No such job.
        """
        return sending.progress_of(sending.get_job(job_id))

    def send_jobs(self, transaction: str | None = None,
                  limit: int = 50) -> list[sending.JobProgress]:
        """Recent send jobs, newest first (only a transaction's when given)."""
        return [sending.progress_of(j) for j in sending.recent_jobs(transaction, limit)]

    def job_runner(self, transport: sending.Transport) -> sending.JobRunner:
        """A runner for send jobs that sends through ``transport``."""
        retry = sending.RetryPolicy(self.settings.send_retry_seconds,
                                    self.settings.send_retry_max_seconds,
                                    self.settings.send_max_attempts)
        return sending.JobRunner(self.store, transport, retry)

    def send_transaction(self, public_id: str, ae_title: str, actor: Actor) -> SendJob:
        """Staff: send a transaction's studies to a remote AE.

        Raises
        ------
        NotFound
            No such transaction.
        InvalidRequest, UnknownDestination
            Its images are gone, or the AE is not a send destination.
        """
        transaction = Transaction.get_or_none(Transaction.public_id == public_id)
        if transaction is None:
            raise NotFound(f"no transaction {public_id}")
        if transaction.purged_at:
            raise InvalidRequest("the images of this transaction have been removed")
        uids = [s.study_uid for s in transaction.studies.order_by(TransactionStudy.id)]
        return sending.queue_job(uids, ae_title, actor, transaction=public_id)

    def recipient_send_aes(self, public_id: str) -> list[str]:
        """The AEs staff let the recipient of a transaction send to."""
        transaction = Transaction.get_or_none(Transaction.public_id == public_id)
        if transaction is None:
            raise NotFound(f"no transaction {public_id}")
        return sending.transaction_send_aes(transaction.id)

    def set_recipient_send_aes(self, public_id: str, ae_titles: list[str],
                               actor: Actor) -> list[str]:
        """Staff: let the recipient send this transaction to ``ae_titles`` (audited).

        Raises
        ------
        NotFound
            No such transaction.
        UnknownDestination
            A title that is not a send destination.
        """
        transaction = Transaction.get_or_none(Transaction.public_id == public_id)
        if transaction is None:
            raise NotFound(f"no transaction {public_id}")
        titles = sending.set_transaction_send_aes(transaction.id, ae_titles)
        audit.record(audit.SECURITY_ALERT, "admin-change", actor,
                     patient_id=transaction.patient_id, transaction=public_id,
                     detail=f"recipient may send to: {', '.join(titles) or 'none'}")
        return titles

    def recipient_send_options(self, recipient_id: int,
                               public_ids: list[str]) -> dict[str, list[str]]:
        """For the recipient's transactions among ``public_ids``: where they may send."""
        rows = list(Transaction.select(Transaction.id, Transaction.public_id).where(
            (Transaction.recipient == recipient_id) & Transaction.public_id.in_(public_ids)
            & Transaction.purged_at.is_null() & (Transaction.expires_at > time.time())))
        options = sending.send_options([t.id for t in rows])
        return {t.public_id: options[t.id] for t in rows if t.id in options}

    def recipient_sends(self, recipient_id: int,
                        public_ids: list[str]) -> dict[str, list[sending.JobProgress]]:
        """The sends the recipient asked for, by transaction."""
        found: dict[str, list[sending.JobProgress]] = {}
        recipient = Recipient.get_by_id(recipient_id)
        for job in (SendJob.select().where(SendJob.transaction_public_id.in_(public_ids)
                                           & (SendJob.requester_kind == "recipient")
                                           & (SendJob.requested_by == recipient.email))
                    .order_by(SendJob.id.desc()).limit(100)):
            found.setdefault(job.transaction_public_id, []).append(sending.progress_of(job))
        return found

    def recipient_send(self, recipient_id: int, public_id: str, ae_title: str,
                       source_ip: str = "") -> SendJob:
        """A recipient sends their transaction's studies to an AE staff allowed (audited).

        Raises
        ------
        NotFound
            No such transaction, or someone else's.
        InvalidRequest
            The AE is not allowed for this transaction, or the images are gone.
        """
        recipient = Recipient.get_by_id(recipient_id)
        transaction = transactions.get_for_recipient(recipient, public_id)
        allowed = self.recipient_send_options(recipient_id, [public_id]).get(public_id, [])
        if ae_title.strip() not in allowed:
            raise InvalidRequest("choose one of the destinations offered for this transaction")
        uids = [s.study_uid for s in transaction.studies.order_by(TransactionStudy.id)]
        return sending.queue_job(uids, ae_title, audit.Actor("recipient", recipient.email,
                                                             source_ip),
                                 transaction=public_id)

    # -- web viewer (issue 4) --------------------------------------------------------------

    @functools.cached_property
    def viewing(self) -> ViewingService:
        """The web viewer's service (its frame cache lives as long as this process)."""
        return ViewingService(self.store)

    # -- end web viewer --------------------------------------------------------------------

    def route_stable_studies(self) -> int:
        """Queue sends for stable studies that routing rules match; return how many."""
        return routing.route_stable(self.settings.stable_age)

    def route_rules(self) -> list[RouteRule]:
        """The auto-routing rules."""
        return routing.list_rules()

    def add_route(self, destination: str, actor: Actor, *, calling_ae: str = "",
                  accession_prefix: str = "", modality: str = "") -> RouteRule:
        """Add an auto-routing rule; see :func:`routing.add_rule`."""
        return routing.add_rule(destination, actor, calling_ae=calling_ae,
                                accession_prefix=accession_prefix, modality=modality)

    def remove_route(self, rule_id: int, actor: Actor) -> None:
        """Delete an auto-routing rule; see :func:`routing.remove_rule`."""
        routing.remove_rule(rule_id, actor)

    # -- requests and uploads (issue 7) --
    # A request (iepnode.uploads.image_requests) asks an individual for images; they answer with
    # an upload staged by iepnode.uploads.staging (each file inspected by iepnode.uploads.intake);
    # on Send, send_upload has it checked by iepnode.uploads.review for staff.

    @functools.cached_property
    def uploads(self) -> uploads.UploadService:
        """Staging and the chunk protocol of uploads on request."""
        mib = uploads.MIB
        return uploads.UploadService(self.settings.staging_dir, uploads.Limits(
            self.settings.upload_max_file_mb * mib, self.settings.upload_max_total_mb * mib,
            inspections=self.settings.upload_inspections))

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
            image_requests.create_request, request, contact=self.contact_for(user),
            institution=self.settings.institution, created_by=actor.name)
        await asyncio.to_thread(
            audit.record, PATIENT_RECORD, "request-create", actor,
            patient_id=transaction.patient_id, transaction=transaction.public_id,
            detail=f"to {transaction.recipient.email}"
                   f"{_channel_note(transaction.recipient, request.otp_mobile, request.otp_email)}")
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


    # -- uploads on request: review, release, reject (issue 7, reconcile) ----------------
    # The domain is iepnode.uploads.review; the upload page calls intake_upload on Send.

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
                       exclude: frozenset[str] = frozenset()) -> upload_review.ReleaseResult:
        """Reconcile, store and (when configured) send a sent upload to the PACS."""
        return upload_review.release(
            upload_id, data_dir=self.settings.data_dir, ingester=self.ingester, actor=actor,
            exclude=exclude, modifying_system=self.settings.ae_title,
            default_issuer=self.settings.upload_issuer, pacs_ae=self.settings.upload_pacs_ae)

    def reject_upload(self, upload_id: int, actor: Actor, reason: str = "") -> None:
        """Refuse a sent upload; its staged files are deleted."""
        upload_review.reject(upload_id, data_dir=self.settings.data_dir, actor=actor,
                             reason=reason)

    def upload_rows(self) -> list[upload_review.UploadRow]:
        """Uploads for the staff list, those waiting first."""
        return upload_review.list_uploads()

    def upload_detail(self, upload_id: int) -> upload_review.UploadDetail:
        """One upload for the staff review page."""
        return upload_review.detail(upload_id)

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
        return upload_review.purge_abandoned(self.settings.data_dir,
                                             self.settings.upload_staging_hours * 3600)

    def recover_upload_releases(self) -> int:
        """Put uploads stuck releasing for over an hour back to SENT (housekeeping)."""
        return upload_review.recover_releases()
    # -- end uploads (reconcile) ----------------------------------------------------------
    # -- DICOMweb (issue 4) --
    # QIDO-RS/WADO-RS live in iepnode.viewing.dicomweb and .dicomweb_access (web/dicomweb.py
    # calls them); only the housekeeping of its tokens goes through the façade.

    def purge_dicomweb_tokens(self) -> int:
        """Delete DICOMweb tokens that expired or were revoked over a day ago."""
        from iepnode.viewing import dicomweb_access

        return dicomweb_access.purge_tokens()

    # -- reports and attachments (issue 4) --
    # Reports: a transaction's Encapsulated PDFs and SRs (iepnode.viewing.reports); attachments:
    # files wrapped as DICOM and held by the transaction that added them until staff file
    # them into the study through the ingest path (iepnode.viewing.attachments, issue 13).
    # Recipients reach only their own live transactions (someone else's: NotFound;
    # declined, expired, purged: Gone), staff any transaction whose files are stored.
    # Give ``recipient_id`` for a recipient, ``staff`` for a staff user.

    def _report_access(self, public_id: str, *, recipient_id: int | None = None,
                       staff: StaffUser | None = None,
                       source_ip: str = "") -> tuple[Transaction, Actor, str]:
        """The transaction, the audit actor and the name shown in the thread."""
        if recipient_id is not None:
            recipient = Recipient.get_by_id(recipient_id)
            transaction = transactions.get_for_recipient(recipient, public_id)
            downloads.check_downloadable(transaction)
            return (transaction, Actor("recipient", recipient.email, source_ip),
                    recipient.name or recipient.email)
        if staff is None:
            raise NotFound("no one asked")
        transaction = Transaction.get_or_none(Transaction.public_id == public_id)
        if transaction is None:
            raise NotFound(f"no transaction {public_id}")
        if transaction.purged_at:
            raise Gone("The images of this transaction have been removed: it has expired.")
        return (transaction, Actor("staff", staff.username, source_ip),
                staff.display_name or staff.username)

    @staticmethod
    def _study_uids_of(transaction: Transaction) -> list[str]:
        return [ts.study_uid for ts in TransactionStudy.select(TransactionStudy.study_uid)
                .where(TransactionStudy.transaction == transaction.id)
                .order_by(TransactionStudy.id)]

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
        audit.record(PATIENT_RECORD, "view-reports", actor, patient_id=transaction.patient_id,
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
            recipient = Recipient.get_by_id(recipient_id)
            transaction = transactions.get_for_recipient(recipient, public_id)
            closed = attachments.closed_for_recipient(transaction)
            actor = Actor("recipient", recipient.email, source_ip)
        else:
            transaction, actor, _ = self._report_access(public_id, staff=staff,
                                                        source_ip=source_ip)
            closed = ""
        audit.record(PATIENT_RECORD, "view-attachments", actor,
                     patient_id=transaction.patient_id, transaction=public_id)
        return attachments.view(transaction, closed, self.settings.max_attachments)

    def add_attachment(self, public_id: str, *, data: bytes, original_name: str,
                       title: str = "", study_uid: str = "", recipient_id: int | None = None,
                       staff: StaffUser | None = None, source_ip: str = "") -> Attachment:
        """Attach a PDF/JPEG/PNG to a transaction's study; see :func:`attachments.add`.

        Raises
        ------
        AttachmentRefused
            The file was refused (nothing stored); the message says why.
        NotFound, Gone, InvalidRequest
            As :meth:`open_report`; no study chosen when there are several.
        """
        transaction, actor, label = self._report_access(
            public_id, recipient_id=recipient_id, staff=staff, source_ip=source_ip)
        return attachments.add(self.store, transaction, data=data,
                               original_name=original_name, title=title, study_uid=study_uid,
                               actor=actor, author_label=label,
                               max_attachments=self.settings.max_attachments)

    def file_attachment(self, public_id: str, attachment_id: int, *, staff: StaffUser,
                        source_ip: str = "") -> Attachment:
        """File an attachment the transaction holds into the patient's study (staff).

        See :func:`attachments.file_into_study` (who may, once only, audited).

        Raises
        ------
        NotFound, Gone, NotAuthorized, InvalidRequest
            No such transaction or attachment; purged; not allowed; already filed.
        """
        transaction, actor, _ = self._report_access(public_id, staff=staff,
                                                    source_ip=source_ip)
        return attachments.file_into_study(self.ingester, transaction, attachment_id,
                                           user=staff, actor=actor)

    def remove_attachment(self, public_id: str, attachment_id: int, *, staff: StaffUser,
                          source_ip: str = "") -> Attachment:
        """Delete an attachment the transaction holds (not filed); see :func:`attachments.remove`.

        Raises
        ------
        NotFound, Gone, NotAuthorized, InvalidRequest
            As :meth:`file_attachment`; a filed one cannot be removed.
        """
        transaction, actor, _ = self._report_access(public_id, staff=staff,
                                                    source_ip=source_ip)
        return attachments.remove(self.store, transaction, attachment_id, user=staff,
                                  actor=actor)

    # -- boundary (issue 14) ------------------------------------------------------------
    # Entry points that keep the file store behind the domain (web/ never sees a path).

    def package_bytes(self, planned: package.Package, start: int,
                      stop: int) -> AsyncIterator[bytearray]:
        """Bytes ``start``-``stop`` of a planned package (see :mod:`.download_stream`)."""
        return download_stream.package_bytes(self.store, planned, start, stop)

    @functools.cached_property
    def dicomweb(self) -> DicomWebService:
        """DICOMweb's selection of stored instances, over this node's file store."""
        return DicomWebService(self.store)


def _channel_note(recipient: Recipient, otp_mobile: str, otp_email: str) -> str:
    """For the audit trail: the passcode channel given was not used (an existing account)."""
    kept = recipients.kept_instead(recipient, otp_mobile, otp_email)
    return f"; existing passcode channel {kept.masked} kept (the one given was not used)" \
        if kept else ""


def _contact(transaction: Transaction) -> Contact:
    return Contact(transaction.contact_name, transaction.contact_department,
                   transaction.contact_email, transaction.contact_phone)


def _same_host(registered: str, peer: str) -> bool:
    import socket

    if registered in ("*", peer):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(registered, None)}
    except OSError:
        return False
    return peer in addresses
