"""Load and validate iepnode settings.

Precedence, lowest first: built-in defaults, the TOML file (``--config``),
environment variables (``IEPNODE_<NAME>``), command-line flags.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import tzlocal

#: AE titles: 1-16 characters of the default character repertoire, no backslash. A
#: mirror of :data:`iepnode.rules.identifiers.AE_TITLE` (config imports nothing of the
#: project; tests/test_rules.py checks the two are the same).
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")
DUPLICATE_POLICIES = ("keep", "replace")
#: Bounds of ``max_pdu`` (bytes): PS3.8 lets a peer send PDUs up to the announced size.
MIN_PDU = 4096
MAX_PDU = 1 << 26
SMTP_TLS_MODES = ("starttls", "tls", "none")
SMS_GATEWAYS = ("outbox", "email", "http")
#: A DNS host name (for email-to-SMS domains): dot-separated labels.
_HOST_NAME = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
#: Characters never allowed in values that end up in mail headers or URLs: C0 and C1
#: controls, DEL. A mirror of :data:`iepnode.rules.text.CONTROL` (checked by a test).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Layout:
    """The data directory's layout: the one place that names what lies under it.

    Everyone else asks :class:`Settings` (``settings.store_dir``, ...) or, holding only
    the data directory, ``Layout(data_dir)``.

    Attributes
    ----------
    root : Path
        The data directory (``data_dir``).
    """

    root: Path

    @property
    def store(self) -> Path:
        """Received instances, by generated key."""
        return self.root / "objects"

    @property
    def filesets(self) -> Path:
        """Per-study DICOMDIR file-sets."""
        return self.root / "filesets"

    @property
    def tmp(self) -> Path:
        """Staging area on the same file system as the store (atomic renames)."""
        return self.root / "tmp"

    @property
    def staging(self) -> Path:
        """Uploads on request: one folder per upload, named by its random key."""
        return self.root / "staging"

    @property
    def downloads(self) -> Path:
        """Password-protected copies of packages, while they last."""
        return self.root / "downloads"

    @property
    def logs(self) -> Path:
        """The node's log files."""
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        """The node's log file."""
        return self.logs / "iepnode.log"

    @property
    def outbox(self) -> Path:
        """Outgoing mail and SMS written as files when no server/gateway is set."""
        return self.root / "outbox"

    @property
    def secret_file(self) -> Path:
        """The node's 32-byte secret (passcode hashes), created once, mode 0600."""
        return self.root / "secret.key"

    @property
    def database_file(self) -> Path:
        """The SQLite index, unless ``database_url`` names another database."""
        return self.root / "index.sqlite3"


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range."""


@dataclass(frozen=True)
class Settings:
    """The node's settings.

    Attributes
    ----------
    data_dir : Path
        Root of everything the node writes: index, file store, file-sets, logs.
    ae_title : str
        The node's own AE title; associations calling another title are rejected.
    bind : str
        Address the DICOM and HTTP listeners bind to.
    dicom_port, http_port : int
        Listening ports; ``0`` picks a free ephemeral port (printed at start-up).
    database_url : str
        ``sqlite:///PATH`` (default, under ``data_dir``) or ``postgresql://...``.
    http_workers : int
        Processes answering HTTP (they share the port with ``SO_REUSEPORT``).
    dicom_workers : int
        Number of SCP worker processes sharing the DICOM port (``SO_REUSEPORT``).
    max_pdu : int
        Largest P-DATA PDU the node accepts (and announces); larger PDUs mean fewer
        round trips. A peer sending a larger one is aborted before it is read.
    dicom_max_associations : int
        Associations one SCP worker serves at once (pending connections included);
        beyond it a request is rejected (transient, local limit exceeded).
    dicom_max_pending : int
        Connections one SCP worker holds whose A-ASSOCIATE-RQ has not fully arrived;
        beyond it a new connection is rejected at once, before anything is read.
    dicom_max_pending_per_address : int
        The same, from one peer address, so one address cannot take every slot.
    dicom_preassoc_timeout : float
        Seconds a connection has to deliver its whole A-ASSOCIATE-RQ (the ARTIM timer).
    dicom_max_associate_rq : int
        Largest A-ASSOCIATE-RQ PDU accepted (bytes); a larger one is aborted unread.
    stable_age : float
        Seconds without a new instance after which a study is "stable" and its
        DICOMDIR file-set is (re)built.
    duplicate_policy : str
        ``keep`` (first copy wins, later copies acknowledged and discarded) or
        ``replace`` (the newest copy replaces the stored one).
    fsync : bool
        Flush files and directories to disk before acknowledging a C-STORE.
    log_level : str
        Python logging level name.
    smtp_host : str
        SMTP server for outgoing mail; empty (default) writes every message to
        ``outbox_dir`` as an ``.eml`` file instead.
    smtp_port : int
        SMTP server port (587 for STARTTLS submission, 465 for implicit TLS).
    smtp_tls : str
        ``starttls`` (upgrade the connection, required), ``tls`` (TLS from the
        first byte) or ``none`` (plain text; only for a relay on a trusted network).
    smtp_user, smtp_password : str
        SMTP AUTH credentials; empty user means no AUTH. Never shown in ``repr``.
    mail_from : str
        The ``From`` address of outgoing mail (``addr`` or ``Name <addr>``).
    smtp_timeout : float
        Seconds allowed for each SMTP connect/command.
    sms_gateway : str
        ``outbox`` (write SMS to ``outbox_dir``), ``email`` (mail to
        ``<digits>@sms_email_domain``) or ``http`` (POST to ``sms_http_url``).
    sms_email_domain : str
        Domain of the email-to-SMS gateway (``sms_gateway = "email"``).
    sms_http_url, sms_http_token : str
        URL and bearer token of the HTTP SMS gateway (``sms_gateway = "http"``);
        the token is never shown in ``repr``.
    public_url : str
        Base URL of the web portal as recipients reach it; links in messages start
        with it. Normalised without a trailing slash.
    institution : str
        Name of the sending institution, shown in messages and pages.
    transaction_expiry_days : int
        Days a share (transaction) stays usable.
    dashboard_days : int
        Days a transaction is listed on the dashboard.
    passcode_ttl_minutes : int
        Minutes a one-time passcode stays valid.
    timezone : str
        IANA name of the time zone pages and messages show times in (``Europe/London``);
        empty: the server's local zone (see :attr:`zone`).
    trusted_proxies : tuple of str
        Addresses or networks (``10.0.0.5``, ``10.0.0.0/8``) of reverse proxies whose
        ``X-Forwarded-For`` / ``X-Forwarded-Proto`` headers are believed; empty
        (default): those headers are ignored. Normalised to network form.
    max_forwards : int
        How many times a recipient may forward a received package to other people
        (0 turns forwarding off); forwarded copies cannot be forwarded again.
    max_attachments : int
        (hardening, issue 13) Files (PDF, JPEG, PNG, each at most 32 MiB) that may be
        attached to one transaction, by its recipient and staff together; 0 turns
        attaching off. Counted in the database when each is added, so simultaneous
        uploads cannot pass it.
    send_retry_seconds : float
        Wait before the first retry of a send to a DICOM node that failed (peer
        down, association refused, failed C-STOREs); it doubles at each retry.
    send_retry_max_seconds : float
        Longest wait between two attempts of a send.
    send_max_attempts : int
        Attempts of a send before it is marked failed.
    upload_pacs_ae : str
        (uploads, issue 7) A registered send destination (``iepnode ae add ... --send-to``)
        that released uploads are sent to by C-STORE; empty (default): not sent.
    upload_auto_release : bool
        (uploads) Release an upload without staff review when its check raised no flag.
    upload_issuer : str
        (uploads) Issuer of Patient ID written into reconciled objects when the request
        names none.
    upload_staging_hours : float
        (uploads) Hours after which the staged files of an upload never sent are deleted.
    dicomweb_cors_origins : tuple of str
        Origins (``https://viewer.example.org``) of web viewers hosted elsewhere that
        may call the DICOMweb API from a browser (CORS); ``*`` allows any origin.
        Empty (default): no cross-origin access.
    dicomweb_ohif_url : str
        Address of an OHIF Viewer (``https://viewer.example.org``) for the ready-made
        "open in OHIF" links of DICOMweb tokens; empty: no OHIF link, only its data
        source address.
    upload_max_file_mb, upload_max_total_mb : int
        Largest single file, and largest whole upload, a recipient may upload in answer
        to a request (MiB).
    fileset_retry_seconds : float
        (hardening, issue 13) Wait before housekeeping tries again to build a study's
        file-set after a failed build; it doubles after each further failure.
    fileset_retry_max_seconds : float
        (hardening) Longest wait between two attempts to build a study's file-set.
    dicomweb_max_frames : int
        (hardening, issue 13) Most frame numbers one WADO-RS ``/frames/{list}`` request
        (or its ``/rendered``) may list, repeated numbers counted; a longer list is a 400.
    render_concurrency : int
        (hardening) Frames decoded at the same time in one process (viewer, WADO-RS
        rendered and thumbnails, previews); more requests wait for a turn. A decode
        holds the whole frame in memory.
    upload_inspections : int
        (hardening) Uploaded files inspected at the same time in one HTTP process (the
        check after a file's last chunk); more wait for a turn.
    http_max_connections : int
        (hardening, issue 13) Connections one HTTP process keeps open at once; beyond,
        a new one gets 503 and is closed before its request is read.
    http_max_connections_per_address : int
        (hardening) The same, from one client address (trusted proxies not counted).
    http_head_timeout : float
        (hardening) Seconds a new connection has to send its first request head.
    password_hash_concurrency : int
        (hardening, issue 13) Staff password hashes (argon2id, 64 MiB and ~0.1 s each)
        one HTTP process computes at once, on threads of their own (never those page
        views use).
    password_hash_queue : int
        (hardening) Password checks that may wait for one of those threads per HTTP
        process; a login beyond them is answered at once with 503 "try again shortly".
    max_inflated_mb : int
        (hardening, dataset check) Largest size a Deflated Explicit VR Little Endian
        dataset may inflate to when it is checked before being stored (MiB); a
        dataset inflating to more is refused (C-STORE 0xC000), so a deflate bomb
        costs at most this much memory.
    """

    data_dir: Path = Path("data")
    ae_title: str = "IEPNODE"
    bind: str = "0.0.0.0"
    dicom_port: int = 11112
    http_port: int = 8080
    database_url: str = ""
    dicom_workers: int = 2
    http_workers: int = 1
    max_pdu: int = 1 << 20
    # -- hardening (issue 13): DICOM pre-association limits --
    dicom_max_associations: int = 64
    dicom_max_pending: int = 32
    dicom_max_pending_per_address: int = 8
    dicom_preassoc_timeout: float = 5.0
    dicom_max_associate_rq: int = 1 << 16
    stable_age: float = 60.0
    duplicate_policy: str = "keep"
    fsync: bool = True
    log_level: str = "INFO"
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_tls: str = "starttls"
    smtp_user: str = ""
    smtp_password: str = field(default="", repr=False)
    mail_from: str = "iepnode@localhost"
    smtp_timeout: float = 30.0
    sms_gateway: str = "outbox"
    sms_email_domain: str = ""
    sms_http_url: str = ""
    sms_http_token: str = field(default="", repr=False)
    public_url: str = "http://localhost:8080"
    institution: str = "iepnode"
    transaction_expiry_days: int = 14
    dashboard_days: int = 28
    passcode_ttl_minutes: int = 10
    timezone: str = ""
    trusted_proxies: tuple[str, ...] = ()
    max_forwards: int = 3
    # -- hardening (issue 13): attachments --
    max_attachments: int = 20
    send_retry_seconds: float = 10.0
    send_retry_max_seconds: float = 900.0
    send_max_attempts: int = 20
    # -- uploads: review and release (issue 7, reconcile) --
    upload_pacs_ae: str = ""
    upload_auto_release: bool = False
    upload_issuer: str = ""
    upload_staging_hours: float = 48.0
    # -- end uploads (reconcile) --
    # -- DICOMweb (issue 4) --
    dicomweb_cors_origins: tuple[str, ...] = ()
    dicomweb_ohif_url: str = ""
    # -- uploads on request (issue 7)
    upload_max_file_mb: int = 4096
    upload_max_total_mb: int = 16384
    # -- hardening (issue 13): bad files --
    fileset_retry_seconds: float = 60.0
    fileset_retry_max_seconds: float = 3600.0
    # -- hardening (issue 13): amplification --
    dicomweb_max_frames: int = 100
    render_concurrency: int = 2
    upload_inspections: int = 2
    # -- end hardening: amplification --
    # -- hardening (issue 13): HTTP connections --
    http_max_connections: int = 512
    http_max_connections_per_address: int = 128
    http_head_timeout: float = 10.0
    # -- hardening (issue 13): limits --
    password_hash_concurrency: int = 1
    password_hash_queue: int = 16
    # -- hardening (issue 13): dataset check --
    max_inflated_mb: int = 512
    config_file: Path | None = field(default=None, compare=False)

    @property
    def layout(self) -> Layout:
        """What lies where under :attr:`data_dir`."""
        return Layout(self.data_dir)

    @property
    def store_dir(self) -> Path:
        """Where received instances are kept, by generated key."""
        return self.layout.store

    @property
    def fileset_dir(self) -> Path:
        """Where per-study DICOMDIR file-sets are built."""
        return self.layout.filesets

    @property
    def tmp_dir(self) -> Path:
        """Staging area on the same file system as the store (atomic renames)."""
        return self.layout.tmp

    @property
    def staging_dir(self) -> Path:
        """Uploads on request: one folder per upload, named by its random key."""
        return self.layout.staging

    @property
    def downloads_dir(self) -> Path:
        """Where password-protected copies of packages are written."""
        return self.layout.downloads

    @property
    def log_dir(self) -> Path:
        """Where the node's log file lives."""
        return self.layout.logs

    @property
    def log_file(self) -> Path:
        """The node's log file."""
        return self.layout.log_file

    @property
    def outbox_dir(self) -> Path:
        """Where outgoing mail and SMS are written when no server/gateway is set."""
        return self.layout.outbox

    @property
    def secret_file(self) -> Path:
        """The node's secret key file."""
        return self.layout.secret_file

    @property
    def zone(self) -> ZoneInfo:
        """The time zone of :attr:`timezone`, or the server's local zone when it is empty.

        Raises
        ------
        ConfigError
            The name is not a known IANA zone (``load_settings`` checks this once).
        """
        name = self.timezone or local_zone_name()
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            where = "timezone" if self.timezone else "the server's local time zone"
            raise ConfigError(
                f"{where} {name!r}: not a known IANA time zone name such as Europe/London "
                "or America/New_York ([portal] timezone, IEPNODE_TIMEZONE)") from exc

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite inside ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.layout.database_file.resolve()}"


# TOML layout: section -> {toml key: Settings attribute}
_TOML_KEYS: dict[str, dict[str, str]] = {
    "node": {"data_dir": "data_dir", "log_level": "log_level"},
    "dicom": {
        "ae_title": "ae_title",
        "bind": "bind",
        "port": "dicom_port",
        "workers": "dicom_workers",
        "max_pdu": "max_pdu",
        "max_associations": "dicom_max_associations",
        "max_pending": "dicom_max_pending",
        "max_pending_per_address": "dicom_max_pending_per_address",
        "preassoc_timeout": "dicom_preassoc_timeout",
        "max_associate_rq": "dicom_max_associate_rq",
        "duplicate_policy": "duplicate_policy",
        "fsync": "fsync",
        "send_retry_seconds": "send_retry_seconds",
        "send_retry_max_seconds": "send_retry_max_seconds",
        "send_max_attempts": "send_max_attempts",
        # -- hardening (issue 13): dataset check --
        "max_inflated_mb": "max_inflated_mb",
    },
    "http": {"bind": "bind", "port": "http_port", "workers": "http_workers",
             "trusted_proxies": "trusted_proxies",
             "dicomweb_cors_origins": "dicomweb_cors_origins",
             "dicomweb_ohif_url": "dicomweb_ohif_url",
             # -- hardening (issue 13): amplification --
             "dicomweb_max_frames": "dicomweb_max_frames",
             "render_concurrency": "render_concurrency",
             # -- hardening (issue 13): HTTP connections --
             "max_connections": "http_max_connections",
             "max_connections_per_address": "http_max_connections_per_address",
             "head_timeout": "http_head_timeout",
             # -- hardening (issue 13): limits --
             "password_hash_concurrency": "password_hash_concurrency",
             "password_hash_queue": "password_hash_queue"},
    "storage": {
        "database_url": "database_url",
        "stable_age": "stable_age",
        # -- hardening (issue 13): bad files --
        "fileset_retry_seconds": "fileset_retry_seconds",
        "fileset_retry_max_seconds": "fileset_retry_max_seconds",
    },
    "mail": {
        "smtp_host": "smtp_host",
        "smtp_port": "smtp_port",
        "smtp_tls": "smtp_tls",
        "smtp_user": "smtp_user",
        "smtp_password": "smtp_password",
        "from_address": "mail_from",
        "timeout": "smtp_timeout",
    },
    "sms": {
        "gateway": "sms_gateway",
        "email_domain": "sms_email_domain",
        "http_url": "sms_http_url",
        "http_token": "sms_http_token",
    },
    "portal": {
        "public_url": "public_url",
        "institution": "institution",
        "expiry_days": "transaction_expiry_days",
        "dashboard_days": "dashboard_days",
        "passcode_minutes": "passcode_ttl_minutes",
        "timezone": "timezone",
        "max_forwards": "max_forwards",
        # -- hardening (issue 13): attachments --
        "max_attachments": "max_attachments",
        # uploads: review and release (issue 7, reconcile)
        "upload_pacs_ae": "upload_pacs_ae",
        "upload_auto_release": "upload_auto_release",
        "upload_issuer": "upload_issuer",
        "upload_staging_hours": "upload_staging_hours",
        "upload_max_file_mb": "upload_max_file_mb",
        "upload_max_total_mb": "upload_max_total_mb",
        # -- hardening (issue 13): amplification --
        "upload_inspections": "upload_inspections",
    },
}


def local_zone_name() -> str:
    """IANA name of the server's local time zone; ``UTC`` when it has none.

    ``TZ``, ``/etc/timezone`` or the ``/etc/localtime`` symlink name it (read by
    tzlocal). A server whose zone has no name shows times in UTC, labelled so.
    """
    try:
        return tzlocal.get_localzone_name() or "UTC"
    except ZoneInfoNotFoundError as exc:  # conflicting configuration files
        raise ConfigError(f"the server's local time zone is unclear ({exc}); set "
                          "[portal] timezone") from exc


def _coerce(name: str, value: Any) -> Any:
    """Convert a raw value (TOML, env or CLI) to the type of setting ``name``."""
    types = {f.name: f.type for f in fields(Settings)}
    kind = types[name]
    try:
        if kind == "tuple[str, ...]":
            # A TOML array, or text separated by commas/spaces (environment variables).
            items = value.replace(",", " ").split() if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(
                    isinstance(i, str) for i in items):
                raise TypeError("a list of strings")
            return tuple(items)
        if kind == "Path":
            return Path(value).expanduser()
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        reason = str(exc) or "wrong type"
        raise ConfigError(f"setting {name!r}: cannot use {value!r} ({reason})") from exc


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for section, table in raw.items():
        if section not in _TOML_KEYS or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, value in table.items():
            if key not in _TOML_KEYS[section]:
                raise ConfigError(f"{path}: unknown key {key!r} in [{section}]")
            values[_TOML_KEYS[section][key]] = value
    if "data_dir" in values:
        if not isinstance(values["data_dir"], str):
            raise ConfigError(f"{path}: data_dir must be a string, not {values['data_dir']!r}")
        data_dir = Path(values["data_dir"]).expanduser()
        values["data_dir"] = data_dir if data_dir.is_absolute() else path.parent / data_dir
    return values


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        key = f"IEPNODE_{f.name.upper()}"
        if key in environ and f.name != "config_file":
            values[f.name] = environ[key]
    return values


def _http_url(name: str, value: str, *, query: bool) -> str:
    """Check that ``value`` is an ``http(s)://host[:port][/path]`` URL; drop a trailing slash.

    ``query`` allows a query string (some SMS gateways carry parameters there).
    """
    problem = f"{name} {value!r}: an http:// or https:// URL with a host"
    if not value or _CONTROL.search(value) or any(c.isspace() for c in value):
        raise ConfigError(problem)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(f"{problem} ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(problem)
    if "@" in parts.netloc:
        raise ConfigError(f"{name} {value!r}: no user or password in the URL")
    if parts.fragment or (parts.query and not query):
        raise ConfigError(f"{name} {value!r}: no query string or fragment")
    tail = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}{tail}"


def _validate_messaging(s: Settings) -> dict[str, Any]:
    """Validate the mail, SMS and portal settings; return normalised values."""
    if (any(c.isspace() or c in "/@" for c in s.smtp_host) or _CONTROL.search(s.smtp_host)
            or s.smtp_host.count(":") == 1):
        raise ConfigError(f"smtp_host {s.smtp_host!r}: a host name or IP address only "
                          "(no scheme, user or port; the port is smtp_port)")
    if not 1 <= s.smtp_port <= 65535:
        raise ConfigError(f"smtp_port {s.smtp_port}: must be 1-65535")
    if s.smtp_tls not in SMTP_TLS_MODES:
        raise ConfigError(f"smtp_tls {s.smtp_tls!r}: one of {', '.join(SMTP_TLS_MODES)}")
    if s.smtp_password and not s.smtp_user:
        raise ConfigError("smtp_password is set but smtp_user is empty")
    if _CONTROL.search(s.smtp_user) or _CONTROL.search(s.smtp_password):
        raise ConfigError("smtp_user/smtp_password: no control characters")
    if not s.smtp_timeout > 0:
        raise ConfigError(f"smtp_timeout {s.smtp_timeout}: must be more than 0 seconds")
    address = parseaddr(s.mail_from)[1]
    if (_CONTROL.search(s.mail_from) or address.count("@") != 1
            or not all(address.split("@")) or any(c.isspace() for c in address)):
        raise ConfigError(f"mail_from {s.mail_from!r}: an address like "
                          "iepnode@example.org or 'Name <iepnode@example.org>'")

    if s.sms_gateway not in SMS_GATEWAYS:
        raise ConfigError(f"sms_gateway {s.sms_gateway!r}: one of {', '.join(SMS_GATEWAYS)}")
    domain = s.sms_email_domain.strip()
    if domain and not _HOST_NAME.match(domain):
        raise ConfigError(f"sms_email_domain {domain!r}: a domain name like sms.example.org "
                          "(messages go to <digits>@domain)")
    if s.sms_gateway == "email" and not domain:
        raise ConfigError('sms_gateway "email" needs sms_email_domain ([sms] email_domain)')
    http_url = s.sms_http_url.strip()
    if http_url:
        http_url = _http_url("sms_http_url", http_url, query=True)
    elif s.sms_gateway == "http":
        raise ConfigError('sms_gateway "http" needs sms_http_url ([sms] http_url)')
    if _CONTROL.search(s.sms_http_token) or " " in s.sms_http_token:
        raise ConfigError("sms_http_token: no spaces or control characters")

    public_url = _http_url("public_url", s.public_url.strip(), query=False)
    institution = s.institution.strip()
    if not institution or _CONTROL.search(institution) or len(institution) > 200:
        raise ConfigError(f"institution {s.institution!r}: 1-200 characters, no line breaks")
    for name, low, high in (("transaction_expiry_days", 1, 3650), ("dashboard_days", 1, 3650),
                            ("passcode_ttl_minutes", 1, 60), ("max_forwards", 0, 100),
                            # -- hardening (issue 13): attachments --
                            ("max_attachments", 0, 1000),
                            ("upload_max_file_mb", 1, 1 << 20),
                            ("upload_max_total_mb", 1, 1 << 22)):
        value = getattr(s, name)
        if not low <= value <= high:
            raise ConfigError(f"{name} {value}: must be {low}-{high}")
    return {"sms_email_domain": domain, "sms_http_url": http_url, "public_url": public_url,
            "institution": institution}


def _validate_proxies(values: tuple[str, ...]) -> tuple[str, ...]:
    """Check trusted proxy addresses/networks; return them as networks (``10.0.0.5/32``)."""
    networks = []
    for value in values:
        try:
            networks.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError as exc:
            raise ConfigError(f"trusted_proxies {value!r}: an IP address or network such as "
                              "10.0.0.5, 10.0.0.0/8 or fd00::/8") from exc
    return tuple(dict.fromkeys(networks))


def _validate_origins(values: tuple[str, ...]) -> tuple[str, ...]:
    """Check DICOMweb CORS origins: ``*`` or ``scheme://host[:port]`` (no path)."""
    out = []
    for value in values:
        value = value.strip().rstrip("/")
        if value != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", value):
            raise ConfigError(f"dicomweb_cors_origins {value!r}: an origin such as "
                              "https://viewer.example.org (scheme, host, optional port), or *")
        out.append(value)
    return tuple(dict.fromkeys(out))


def _validate_amplification(s: Settings) -> None:
    """Check the per-request and per-process work bounds (hardening, issue 13)."""
    for name, low, high in (("dicomweb_max_frames", 1, 10_000), ("render_concurrency", 1, 64),
                            ("upload_inspections", 1, 64)):
        value = getattr(s, name)
        if not low <= value <= high:
            raise ConfigError(f"{name} {value}: must be {low}-{high}")


def _validate(s: Settings) -> Settings:
    if not _AE_TITLE.fullmatch(s.ae_title) or not s.ae_title.strip():
        raise ConfigError(f"ae_title {s.ae_title!r}: 1-16 printable characters, no backslash")
    for name in ("dicom_port", "http_port"):
        port = getattr(s, name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{name} {port}: must be 0-65535")
    if s.dicom_workers < 1 or s.dicom_workers > 64:
        raise ConfigError(f"dicom_workers {s.dicom_workers}: must be 1-64")
    if s.http_workers < 1 or s.http_workers > 64:
        raise ConfigError(f"http_workers {s.http_workers}: must be 1-64")
    if not MIN_PDU <= s.max_pdu <= MAX_PDU:
        raise ConfigError(f"max_pdu {s.max_pdu}: must be {MIN_PDU}-{MAX_PDU} (every PDU "
                          "is read into memory whole, so there is no unlimited setting)")
    if not 1 <= s.dicom_max_associations <= 1000:
        raise ConfigError(f"dicom_max_associations {s.dicom_max_associations}: must be 1-1000")
    if not 1 <= s.dicom_max_pending <= s.dicom_max_associations:
        raise ConfigError(f"dicom_max_pending {s.dicom_max_pending}: must be 1 to "
                          f"dicom_max_associations ({s.dicom_max_associations})")
    if not 1 <= s.dicom_max_pending_per_address <= s.dicom_max_pending:
        raise ConfigError(f"dicom_max_pending_per_address {s.dicom_max_pending_per_address}: "
                          f"must be 1 to dicom_max_pending ({s.dicom_max_pending})")
    if not 0.5 <= s.dicom_preassoc_timeout <= 120:
        raise ConfigError(f"dicom_preassoc_timeout {s.dicom_preassoc_timeout}: must be "
                          "0.5-120 seconds")
    if not 4096 <= s.dicom_max_associate_rq <= 1 << 24:
        raise ConfigError(f"dicom_max_associate_rq {s.dicom_max_associate_rq}: must be "
                          f"4096-{1 << 24} bytes")
    if s.stable_age < 0:
        raise ConfigError(f"stable_age {s.stable_age}: must not be negative")
    if s.duplicate_policy not in DUPLICATE_POLICIES:
        raise ConfigError(
            f"duplicate_policy {s.duplicate_policy!r}: one of {', '.join(DUPLICATE_POLICIES)}"
        )
    if not 0 < s.send_retry_seconds <= s.send_retry_max_seconds:
        raise ConfigError(f"send_retry_seconds {s.send_retry_seconds}: more than 0 and at most "
                          f"send_retry_max_seconds ({s.send_retry_max_seconds})")
    if not 1 <= s.send_max_attempts <= 1000:
        raise ConfigError(f"send_max_attempts {s.send_max_attempts}: must be 1-1000")
    # -- hardening (issue 13): bad files --
    if not 0 < s.fileset_retry_seconds <= s.fileset_retry_max_seconds <= 7 * 86400:
        raise ConfigError(f"fileset_retry_seconds {s.fileset_retry_seconds} and "
                          f"fileset_retry_max_seconds {s.fileset_retry_max_seconds}: more "
                          "than 0, the first at most the second, the second at most a week")
    # -- hardening (issue 13): HTTP connections --
    if not 2 <= s.http_max_connections <= 100_000:
        raise ConfigError(f"http_max_connections {s.http_max_connections}: must be 2-100000")
    if not 1 <= s.http_max_connections_per_address <= s.http_max_connections:
        raise ConfigError(f"http_max_connections_per_address "
                          f"{s.http_max_connections_per_address}: must be 1 to "
                          f"http_max_connections ({s.http_max_connections})")
    if not 0.5 <= s.http_head_timeout <= 300:
        raise ConfigError(f"http_head_timeout {s.http_head_timeout}: must be 0.5-300 seconds")
    # -- hardening (issue 13): limits --
    if not 1 <= s.password_hash_concurrency <= 16:
        raise ConfigError(f"password_hash_concurrency {s.password_hash_concurrency}: "
                          "must be 1-16 (each hash takes 64 MiB)")
    if not 0 <= s.password_hash_queue <= 1000:
        raise ConfigError(f"password_hash_queue {s.password_hash_queue}: must be 0-1000")
    # -- hardening (issue 13): dataset check --
    if not 1 <= s.max_inflated_mb <= 16384:
        raise ConfigError(f"max_inflated_mb {s.max_inflated_mb}: must be 1-16384")
    # uploads: review and release (issue 7, reconcile)
    if s.upload_pacs_ae.strip() and not _AE_TITLE.fullmatch(s.upload_pacs_ae.strip()):
        raise ConfigError(f"upload_pacs_ae {s.upload_pacs_ae!r}: an AE title (1-16 "
                          "printable characters, no backslash) or empty")
    if _CONTROL.search(s.upload_issuer) or len(s.upload_issuer) > 64:
        raise ConfigError(f"upload_issuer {s.upload_issuer!r}: at most 64 characters")
    if not 0 < s.upload_staging_hours <= 24 * 365:
        raise ConfigError(f"upload_staging_hours {s.upload_staging_hours}: more than 0 and "
                          "at most a year")
    _validate_amplification(s)
    url = s.resolved_database_url
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(f"database_url {url!r}: sqlite:///PATH or postgresql://...")
    messaging = _validate_messaging(s)
    timezone = s.timezone.strip()
    replace(s, timezone=timezone).zone  # noqa: B018 - raises ConfigError for an unknown zone
    return replace(s, ae_title=s.ae_title.strip(), data_dir=s.data_dir.resolve(),
                   upload_pacs_ae=s.upload_pacs_ae.strip(), upload_issuer=s.upload_issuer.strip(),
                   timezone=timezone, trusted_proxies=_validate_proxies(s.trusted_proxies),
                   dicomweb_cors_origins=_validate_origins(s.dicomweb_cors_origins),
                   dicomweb_ohif_url=_http_url("dicomweb_ohif_url", s.dicomweb_ohif_url.strip(),
                                               query=False) if s.dicomweb_ohif_url.strip()
                   else "",
                   **messaging)


def load_settings(
    config_file: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build validated settings from defaults, a TOML file, env and overrides.

    Parameters
    ----------
    config_file : Path or str, optional
        A TOML file (see ``config/iepnode.example.toml``).
    overrides : dict, optional
        Values from command-line flags; ``None`` values are ignored.
    environ : dict, optional
        The environment to read ``IEPNODE_*`` variables from (default ``os.environ``).

    Returns
    -------
    Settings
        The frozen, validated settings.

    Raises
    ------
    ConfigError
        If a value is malformed or out of range.
    """
    values: dict[str, Any] = {}
    env = dict(os.environ if environ is None else environ)
    if config_file is None and env.get("IEPNODE_CONFIG"):
        config_file = env["IEPNODE_CONFIG"]
    if config_file is not None:
        values.update(_from_toml(Path(config_file)))
    values.update(_from_env(env))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    coerced = {k: _coerce(k, v) for k, v in values.items()}
    if config_file is not None:
        coerced["config_file"] = Path(config_file)
    return _validate(Settings(**coerced))
