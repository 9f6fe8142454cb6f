"""Index tables: remote AEs and the patient / study / series / instance hierarchy.

Names and other text are stored decoded (Unicode), whatever SpecificCharacterSet the
instance used; ``*_key`` columns hold the upper-cased form used for matching.
Counters on study and series rows are kept up to date at ingest, so C-FIND never
has to count a million instance rows.
"""

from __future__ import annotations

import peewee

database_proxy = peewee.DatabaseProxy()


class BaseModel(peewee.Model):
    class Meta:
        database = database_proxy


class RemoteAE(BaseModel):
    """A DICOM peer allowed to associate with the node."""

    ae_title = peewee.CharField(max_length=16, unique=True)
    host = peewee.CharField(max_length=255)
    port = peewee.IntegerField()
    #: Comma-separated services beyond C-ECHO: store, find, move, get.
    allow = peewee.CharField(max_length=64, default="")
    created_at = peewee.DoubleField()
    #: The node may send studies to it by C-STORE (``iepnode send``, routing, web).
    send_to = peewee.BooleanField(default=False)
    #: Sends use DICOM TLS (PS3.15 BCP 195); the paths are PEM files on the node.
    tls = peewee.BooleanField(default=False)
    tls_ca = peewee.CharField(max_length=1024, default="")
    tls_cert = peewee.CharField(max_length=1024, default="")
    tls_key = peewee.CharField(max_length=1024, default="")

    @property
    def allowed(self) -> frozenset[str]:
        """Services this AE may use (C-ECHO is always allowed)."""
        return frozenset(s for s in self.allow.split(",") if s)


class Patient(BaseModel):
    patient_id = peewee.CharField(max_length=64, index=True)
    issuer = peewee.CharField(max_length=64, default="")
    name = peewee.CharField(max_length=324, default="")
    name_key = peewee.CharField(max_length=324, default="", index=True)
    birth_date = peewee.CharField(max_length=8, default="", index=True)
    sex = peewee.CharField(max_length=16, default="")
    num_studies = peewee.IntegerField(default=0)

    class Meta:
        indexes = ((("patient_id", "issuer"), True),)


class Study(BaseModel):
    study_uid = peewee.CharField(max_length=64, unique=True)
    patient = peewee.ForeignKeyField(Patient, backref="studies", on_delete="CASCADE")
    #: Generated 8-character name of the study's file-set folder.
    key = peewee.CharField(max_length=8, unique=True)
    study_date = peewee.CharField(max_length=8, default="", index=True)
    study_time = peewee.CharField(max_length=16, default="")
    accession = peewee.CharField(max_length=16, default="", index=True)
    study_id = peewee.CharField(max_length=16, default="")
    description = peewee.CharField(max_length=64, default="")
    referring_physician = peewee.CharField(max_length=324, default="")
    institution = peewee.CharField(max_length=64, default="")
    charset = peewee.CharField(max_length=128, default="")
    modalities = peewee.CharField(max_length=128, default="")
    num_series = peewee.IntegerField(default=0)
    num_instances = peewee.IntegerField(default=0)
    size_bytes = peewee.BigIntegerField(default=0)
    first_received = peewee.DoubleField()
    last_received = peewee.DoubleField(index=True)
    #: ``last_received`` value the current file-set was built from (None: never built).
    fileset_built_from = peewee.DoubleField(null=True)
    # -- hardening (issue 13): file-set builds that fail are retried with back-off --
    #: File-set build attempts since the last success (one is counted when it starts).
    fileset_attempts = peewee.IntegerField(default=0)
    #: No housekeeping build before this time (None: none is waiting to be retried).
    fileset_retry_at = peewee.DoubleField(null=True)
    #: Why the last attempt failed ("" when the last build succeeded).
    fileset_error = peewee.TextField(default="")


class Series(BaseModel):
    series_uid = peewee.CharField(max_length=64, unique=True)
    study = peewee.ForeignKeyField(Study, backref="series", on_delete="CASCADE")
    modality = peewee.CharField(max_length=16, default="", index=True)
    series_number = peewee.CharField(max_length=12, default="")
    description = peewee.CharField(max_length=64, default="")
    body_part = peewee.CharField(max_length=16, default="")
    num_instances = peewee.IntegerField(default=0)
    size_bytes = peewee.BigIntegerField(default=0)


class Instance(BaseModel):
    sop_uid = peewee.CharField(max_length=64, unique=True)
    series = peewee.ForeignKeyField(Series, backref="instances", on_delete="CASCADE")
    sop_class = peewee.CharField(max_length=64)
    instance_number = peewee.CharField(max_length=12, default="")
    transfer_syntax = peewee.CharField(max_length=64)
    #: Generated file-store key: the file's only name on disk.
    key = peewee.CharField(max_length=32, unique=True)
    size_bytes = peewee.BigIntegerField()
    received_at = peewee.DoubleField()
    source_ae = peewee.CharField(max_length=16, default="")


class StaffUser(BaseModel):
    """Hospital staff who log in to /admin (password + TOTP)."""

    username = peewee.CharField(max_length=64, unique=True)
    display_name = peewee.CharField(max_length=128, default="")
    email = peewee.CharField(max_length=254, default="")
    department = peewee.CharField(max_length=128, default="")
    phone = peewee.CharField(max_length=32, default="")
    #: argon2id hash (argon2-cffi's encoded form).
    password_hash = peewee.CharField(max_length=255)
    #: Base32 TOTP secret once enrolled. ``None`` after an admin reset it: the password
    #: alone then opens only the enrolment page (StaffLogins.pending_step).
    totp_secret = peewee.CharField(max_length=64, null=True)
    #: Set when an admin gave a temporary password: the next login must choose a new one.
    must_change_password = peewee.BooleanField(default=False)
    is_admin = peewee.BooleanField(default=False)
    disabled = peewee.BooleanField(default=False)
    created_at = peewee.DoubleField()


class Recipient(BaseModel):
    """A person who receives transactions and logs in with one-time passcodes."""

    #: Lower-cased; the identity of the recipient.
    email = peewee.CharField(max_length=254, unique=True)
    name = peewee.CharField(max_length=128, default="")
    #: Where passcodes go: a mobile number (SMS) or a second email address.
    otp_mobile = peewee.CharField(max_length=32, default="")
    otp_email = peewee.CharField(max_length=254, default="")
    #: Postal address and contact telephone (given when someone forwards a package to them).
    address = peewee.TextField(default="")
    phone = peewee.CharField(max_length=32, default="")
    #: Base32 secret of the recipient's authenticator app (TOTP), once enrolled.
    totp_secret = peewee.CharField(max_length=64, null=True)
    #: The last TOTP time step accepted: each code is accepted once (RFC 6238 5.2).
    totp_last_step = peewee.IntegerField(null=True)
    consecutive_failures = peewee.IntegerField(default=0)
    #: Set after too many consecutive failed passcodes; cleared by staff.
    locked_at = peewee.DoubleField(null=True)
    created_at = peewee.DoubleField()
    #: When the last passcode message was claimed (Unix time; 0: never): a new one is
    #: sent only where this is old enough (iepnode.sharing.logins.start_attempt).
    last_passcode_at = peewee.DoubleField(default=0.0)


class Transaction(BaseModel):
    """Studies of one patient packaged for one recipient."""

    public_id = peewee.CharField(max_length=16, unique=True)
    kind = peewee.CharField(max_length=16)
    direction = peewee.CharField(max_length=3)
    recipient = peewee.ForeignKeyField(Recipient, backref="transactions", on_delete="CASCADE")
    status = peewee.CharField(max_length=16, index=True)
    priority = peewee.CharField(max_length=8, default="NORMAL")
    created_at = peewee.DoubleField(index=True)
    expires_at = peewee.DoubleField(index=True)
    patient_name = peewee.CharField(max_length=324, default="")
    patient_birth_date = peewee.CharField(max_length=8, default="")
    patient_sex = peewee.CharField(max_length=16, default="")
    patient_id = peewee.CharField(max_length=64, default="")
    nhs_number = peewee.CharField(max_length=16, default="")
    institution = peewee.CharField(max_length=128, default="")
    contact_name = peewee.CharField(max_length=128, default="")
    contact_department = peewee.CharField(max_length=128, default="")
    contact_email = peewee.CharField(max_length=254, default="")
    contact_phone = peewee.CharField(max_length=32, default="")
    created_by = peewee.CharField(max_length=64, default="")
    #: SHA-256 of the emailed link token (the token itself is never stored).
    link_token_hash = peewee.CharField(max_length=64, unique=True)
    decline_reason = peewee.TextField(default="")
    purged_at = peewee.DoubleField(null=True)
    #: The received package this one is a forwarded copy of (copies cannot be forwarded).
    forwarded_from = peewee.ForeignKeyField("self", null=True, backref="forwards",
                                            on_delete="CASCADE")
    #: Requests (kind REQUEST, issue 7): why the hospital asks for images, and the issuer
    #: of ``patient_id`` (Issuer of Patient ID) the upload is reconciled to.
    request_reason = peewee.TextField(default="")
    patient_id_issuer = peewee.CharField(max_length=64, default="")


class TransactionStudy(BaseModel):
    """A study in a transaction, with what the recipient is shown about it."""

    transaction = peewee.ForeignKeyField(Transaction, backref="studies", on_delete="CASCADE")
    study_uid = peewee.CharField(max_length=64, index=True)
    modality = peewee.CharField(max_length=128, default="")
    exam_date = peewee.CharField(max_length=8, default="")
    description = peewee.CharField(max_length=64, default="")
    accession = peewee.CharField(max_length=16, default="")
    images_expected = peewee.IntegerField(default=0)


class TransactionMessage(BaseModel):
    """One message in a transaction's thread."""

    transaction = peewee.ForeignKeyField(Transaction, backref="messages", on_delete="CASCADE")
    #: "staff" or "recipient".
    author_kind = peewee.CharField(max_length=16)
    author = peewee.CharField(max_length=128)
    body = peewee.TextField()
    created_at = peewee.DoubleField()
    read_by_recipient = peewee.BooleanField(default=False)


class LoginAttempt(BaseModel):
    """A passcode sent for one login through one transaction link."""

    transaction = peewee.ForeignKeyField(Transaction, on_delete="CASCADE")
    recipient = peewee.ForeignKeyField(Recipient, on_delete="CASCADE")
    #: HMAC-SHA256 of the passcode, keyed by the node secret and bound to this attempt.
    code_hash = peewee.CharField(max_length=64)
    channel = peewee.CharField(max_length=8)
    created_at = peewee.DoubleField()
    expires_at = peewee.DoubleField()
    tries = peewee.IntegerField(default=0)
    used_at = peewee.DoubleField(null=True)
    dead = peewee.BooleanField(default=False)


class WebSession(BaseModel):
    """A logged-in browser: recipient or staff."""

    #: SHA-256 of the cookie value.
    token_hash = peewee.CharField(max_length=64, unique=True)
    recipient = peewee.ForeignKeyField(Recipient, null=True, on_delete="CASCADE")
    staff = peewee.ForeignKeyField(StaffUser, null=True, on_delete="CASCADE")
    csrf_token = peewee.CharField(max_length=64)
    created_at = peewee.DoubleField()
    last_seen = peewee.DoubleField()
    ended = peewee.BooleanField(default=False)


class AuditEvent(BaseModel):
    """One audited access, shaped after DICOM PS3.15 A.5 audit messages."""

    at = peewee.DoubleField(index=True)
    #: EventID code (DCM): 110114 User Authentication, 110103 Instances Accessed, ...
    event_code = peewee.CharField(max_length=16)
    event_name = peewee.CharField(max_length=64)
    action = peewee.CharField(max_length=32)
    #: EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure.
    outcome = peewee.IntegerField(default=0)
    actor_kind = peewee.CharField(max_length=16)
    actor = peewee.CharField(max_length=254)
    source_ip = peewee.CharField(max_length=64, default="")
    patient_id = peewee.CharField(max_length=64, default="", index=True)
    study_uid = peewee.CharField(max_length=64, default="")
    transaction_public_id = peewee.CharField(max_length=16, default="", index=True)
    detail = peewee.TextField(default="")


class StaffLoginFailures(BaseModel):
    """Failed staff logins per username (known or not), shared by all web processes."""

    username = peewee.CharField(max_length=64, unique=True)
    failures = peewee.IntegerField(default=0)
    #: Start of the current counting window (Unix time).
    window_start = peewee.DoubleField()
    #: The username is refused until then (0: not locked).
    locked_until = peewee.DoubleField(default=0.0)


class UsedStaffCode(BaseModel):
    """A staff TOTP code already accepted (each is accepted once, RFC 6238 5.2)."""

    staff = peewee.ForeignKeyField(StaffUser, on_delete="CASCADE")
    code = peewee.CharField(max_length=16)
    #: When the code can no longer verify and the row may go.
    expires_at = peewee.DoubleField(index=True)

    class Meta:
        indexes = ((("staff", "code"), True),)


class InstanceChecksum(BaseModel):
    """CRC-32 of a stored file, for download zips (their headers carry it up front).

    Keyed by the file-store key: a key's file is never rewritten, so its CRC never
    changes; the row goes when the instance row goes (``ON DELETE CASCADE``).
    """

    instance = peewee.ForeignKeyField(Instance, field=Instance.key, column_name="instance_key",
                                      unique=True, on_delete="CASCADE")
    crc32 = peewee.BigIntegerField()
# -- sending to DICOM nodes (issue 6) -----------------------------------------------------


class SendJob(BaseModel):
    """Studies to send to a remote AE by C-STORE, worked on by a background runner.

    ``state`` is ``queued`` (waiting for a runner, or for ``next_try_at`` after a
    failed attempt), ``running`` (a runner holds the lease until ``lease_until``),
    ``done`` or ``failed``.
    """

    ae_title = peewee.CharField(max_length=16)
    #: Study Instance UIDs, backslash-separated (as a DICOM multi-value).
    study_uids = peewee.TextField()
    patient_id = peewee.CharField(max_length=64, default="")
    transaction_public_id = peewee.CharField(max_length=16, default="", index=True)
    #: The routing rule that queued the job (``None``: asked for by a person).
    route_id = peewee.IntegerField(null=True)
    #: Who asked for it: ``staff``, ``recipient``, ``cli`` or ``system``, and their name.
    requester_kind = peewee.CharField(max_length=16)
    requested_by = peewee.CharField(max_length=254)
    source_ip = peewee.CharField(max_length=64, default="")
    state = peewee.CharField(max_length=16, index=True)
    attempts = peewee.IntegerField(default=0)
    next_try_at = peewee.DoubleField()
    lease_owner = peewee.CharField(max_length=128, default="")
    lease_until = peewee.DoubleField(default=0.0)
    total = peewee.IntegerField(default=0)
    sent = peewee.IntegerField(default=0)
    failed = peewee.IntegerField(default=0)
    error = peewee.TextField(default="")
    created_at = peewee.DoubleField(index=True)
    started_at = peewee.DoubleField(null=True)
    finished_at = peewee.DoubleField(null=True)

    @property
    def study_uid_list(self) -> list[str]:
        """The job's Study Instance UIDs."""
        return [u for u in self.study_uids.split("\\") if u]


class SendItem(BaseModel):
    """One instance of a send job: ``pending`` until ``sent`` or ``failed``."""

    job = peewee.ForeignKeyField(SendJob, backref="items", on_delete="CASCADE")
    sop_uid = peewee.CharField(max_length=64)
    state = peewee.CharField(max_length=8, default="pending")
    attempts = peewee.IntegerField(default=0)
    #: The peer's last C-STORE status (``None``: not answered yet).
    last_status = peewee.IntegerField(null=True)
    error = peewee.CharField(max_length=255, default="")

    class Meta:
        indexes = ((("job", "state"), False),)


class SendRunnerBeat(BaseModel):
    """A job runner that is alive: ``iepnode send`` leaves jobs to a fresh one."""

    owner = peewee.CharField(max_length=128, unique=True)
    seen_at = peewee.DoubleField()


class TransactionSendAE(BaseModel):
    """A remote AE the recipient of a transaction may send its studies to."""

    transaction = peewee.ForeignKeyField(Transaction, on_delete="CASCADE")
    ae_title = peewee.CharField(max_length=16)

    class Meta:
        indexes = ((("transaction", "ae_title"), True),)


class RouteRule(BaseModel):
    """Auto-routing: stable studies that match are sent to ``destination``.

    Empty conditions match anything; a study is routed once per rule.
    """

    calling_ae = peewee.CharField(max_length=16, default="")
    accession_prefix = peewee.CharField(max_length=16, default="")
    modality = peewee.CharField(max_length=16, default="")
    destination = peewee.CharField(max_length=16)
    enabled = peewee.BooleanField(default=True)
    created_by = peewee.CharField(max_length=254, default="")
    created_at = peewee.DoubleField()


class RoutedStudy(BaseModel):
    """A study a routing rule has queued (so it is routed only once)."""

    rule = peewee.ForeignKeyField(RouteRule, on_delete="CASCADE")
    study_uid = peewee.CharField(max_length=64)
    job_id = peewee.IntegerField(null=True)
    routed_at = peewee.DoubleField()

    class Meta:
        indexes = ((("rule", "study_uid"), True),)


# -- DICOMweb access tokens (issue 4) -----------------------------------------------------


class DicomwebToken(BaseModel):
    """A short-lived bearer token for the DICOMweb API (``Authorization: Bearer ...``).

    A recipient's token opens one transaction (``transaction`` set); a staff token
    opens every study. Only the SHA-256 of the token is stored.
    """

    token_hash = peewee.CharField(max_length=64, unique=True)
    recipient = peewee.ForeignKeyField(Recipient, null=True, on_delete="CASCADE")
    staff = peewee.ForeignKeyField(StaffUser, null=True, on_delete="CASCADE")
    transaction = peewee.ForeignKeyField(Transaction, null=True, on_delete="CASCADE")
    created_at = peewee.DoubleField()
    expires_at = peewee.DoubleField(index=True)
    revoked_at = peewee.DoubleField(null=True)
# -- uploads in answer to a request (issue 7) ---------------------------------------------


class Upload(BaseModel):
    """Files a recipient uploads in answer to a request (a REQUEST transaction).

    ``status``: ``STAGING`` (files arriving in ``DATA_DIR/staging/<key>/``), ``SENT``
    (the uploader confirmed; waiting for staff), ``RELEASED`` (reconciled into the
    store), ``REJECTED`` (staff refused it; staged data deleted) or ``CANCELLED``
    (the uploader cancelled; staged data deleted).
    """

    transaction = peewee.ForeignKeyField(Transaction, backref="uploads", on_delete="CASCADE")
    #: Random name of the staging folder (never from user input).
    key = peewee.CharField(max_length=32, unique=True)
    status = peewee.CharField(max_length=16, index=True)
    #: The recipient who uploads (their email) and the message they wrote.
    uploader = peewee.CharField(max_length=254, default="")
    message = peewee.TextField(default="")
    #: The patient details the uploader confirmed on the page (PN ``Family^Given``,
    #: DA ``YYYYMMDD``, ``F``/``M``/``O``).
    confirmed_name = peewee.CharField(max_length=324, default="")
    confirmed_birth_date = peewee.CharField(max_length=8, default="")
    confirmed_sex = peewee.CharField(max_length=16, default="")
    total_bytes = peewee.BigIntegerField(default=0)
    created_at = peewee.DoubleField(index=True)
    updated_at = peewee.DoubleField()
    sent_at = peewee.DoubleField(null=True)
    released_at = peewee.DoubleField(null=True)
    #: Staff username who released or rejected it.
    released_by = peewee.CharField(max_length=64, default="")
    #: Whole-upload check result of ``intake`` (JSON text; owned by the reconciliation).
    review = peewee.TextField(default="")


class UploadFile(BaseModel):
    """One file of an upload, stored flat as ``DATA_DIR/staging/<upload.key>/<disk_name>``.

    ``display_name`` and ``relpath`` are what the browser sent: shown (escaped) and used
    to resolve DICOMDIR references inside the upload, never as names on disk.
    """

    upload = peewee.ForeignKeyField(Upload, backref="files", on_delete="CASCADE")
    display_name = peewee.CharField(max_length=255)
    #: Folder path of the file within what was dropped (``CD/DICOM/ST000``), or "".
    relpath = peewee.CharField(max_length=1024, default="")
    #: Server-chosen file name in the staging folder.
    disk_name = peewee.CharField(max_length=32)
    #: Size announced when the upload of this file began; ``received`` counts bytes on disk.
    size = peewee.BigIntegerField()
    received = peewee.BigIntegerField(default=0)
    created_at = peewee.DoubleField()
    completed_at = peewee.DoubleField(null=True)
    #: Accepted kind (``dicom``, ``dicomdir``, ``zip``, ``pdf``, ``image``), ``skipped``,
    #: or "" while not yet inspected.
    verdict = peewee.CharField(max_length=16, default="")
    #: Why it was skipped (shown to the uploader).
    reason = peewee.TextField(default="")
    #: DICOM objects found in the file (a zip or DICOMDIR tree counts its members).
    objects = peewee.IntegerField(default=0)
    #: The inspection's findings (JSON text: original patients, studies; reconciliation's).
    detail = peewee.TextField(default="")

    class Meta:
        indexes = ((("upload", "disk_name"), True),)


# -- attachments (issue 4) ----------------------------------------------------------------


class Attachment(BaseModel):
    """A document or picture someone attached to a transaction, stored as DICOM.

    The wrapped DICOM object belongs to the transaction that added it (issue 13): it
    is kept in the file store under :attr:`key` and is *not* an indexed instance of
    the hospital's study, so no other transaction sharing the study, no C-FIND,
    DICOMweb, file-set or send sees it. Staff may file it into the study
    (:attr:`filed_at`); it is then ingested as an ordinary instance and :attr:`key`
    is cleared. Rows made before issue 13 have neither ``key`` nor ``filed_at``:
    those attachments were ingested into the study when added.
    """

    transaction = peewee.ForeignKeyField(Transaction, backref="attachments",
                                         on_delete="CASCADE")
    study_uid = peewee.CharField(max_length=64)
    sop_uid = peewee.CharField(max_length=64, unique=True)
    sop_class = peewee.CharField(max_length=64)
    title = peewee.CharField(max_length=64, default="")
    #: The uploader's file name, for display only (never used on disk).
    original_name = peewee.CharField(max_length=255, default="")
    media_type = peewee.CharField(max_length=32)
    size_bytes = peewee.BigIntegerField()
    #: ``staff`` or ``recipient``, and who (username or email).
    author_kind = peewee.CharField(max_length=16)
    author = peewee.CharField(max_length=254)
    created_at = peewee.DoubleField()
    #: File-store key of the wrapped object while only its transaction holds it.
    key = peewee.CharField(max_length=32, null=True, unique=True)
    #: When and by whom (staff username) it was filed into the patient's study.
    filed_at = peewee.DoubleField(null=True)
    filed_by = peewee.CharField(max_length=64, default="")


# -- hardening (issue 13): limits decided in the database -------------------------------


class ProtectedCopyBuild(BaseModel):
    """The password-protected copy of one transaction for its recipient: one at a time.

    A build is claimed by a conditional ``UPDATE`` of this row (``building`` only
    where it is not already, or its lease ran out) before the encryption starts
    (iepnode.sharing.downloads); the builder renews ``lease_until`` while it writes.
    """

    recipient = peewee.ForeignKeyField(Recipient, on_delete="CASCADE")
    transaction = peewee.ForeignKeyField(Transaction, on_delete="CASCADE")
    #: ``idle`` (no build running) or ``building``.
    state = peewee.CharField(max_length=16, default="idle")
    #: A ``building`` claim older than this (Unix time) was left by a crashed build.
    lease_until = peewee.DoubleField(default=0.0)
    #: Random name of the build holding the claim (only it renews or releases it).
    owner = peewee.CharField(max_length=32, default="")

    class Meta:
        indexes = ((("recipient", "transaction"), True),)


ALL_MODELS = [
    RemoteAE, Patient, Study, Series, Instance, StaffUser, Recipient, Transaction,
    TransactionStudy, TransactionMessage, LoginAttempt, WebSession, AuditEvent,
    StaffLoginFailures, UsedStaffCode, InstanceChecksum, SendJob, SendItem, SendRunnerBeat,
    TransactionSendAE, RouteRule, RoutedStudy,
    DicomwebToken,  # issue 4: DICOMweb
    Upload, UploadFile,
    Attachment,  # issue 4 (reports)
    ProtectedCopyBuild,  # issue 13 (hardening)
]
