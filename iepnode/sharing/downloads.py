"""Downloads: who may have a transaction's package, and password-protected copies.

Rules
    A recipient downloads only their own transactions (someone else's is "not
    found", never "forbidden"), and only while the transaction is live: not
    declined, not past its expiry, files not purged. Those end with
    :class:`~iepnode.errors.Gone` (HTTP 410), since the recipient knows the
    transaction exists.

Password-protected copies
    For recipients who will e-mail the package on. A zip encrypted with AES-256
    (WinZip AE-2, readable by 7-Zip, WinZip, macOS/Linux ``7z``; Windows Explorer
    cannot open AES zips) cannot be laid out ahead like the plain one: each entry
    gets a random salt, so its bytes are not known before they are written. The copy
    is therefore written once to ``DATA_DIR/downloads/`` (streaming, 1 MiB at a
    time, at ~190 MB/s) and served as a file (with Range support) under a random
    token for :data:`PROTECTED_TTL` seconds, then deleted. The password is generated
    here (CSPRNG, 4 groups of 5 unambiguous characters, ~99 bits), shown once, and
    stored nowhere. The trade-offs: the recipient waits for the copy to be written
    before the download starts, and it takes disk space (the build is refused when
    the disk lacks room for it).

One copy per recipient and transaction at a time
    Before the (expensive) encryption starts, the build is claimed in the database
    (:func:`claim_build`: a conditional ``UPDATE`` of the pair's
    :class:`~storage.models.ProtectedCopyBuild` row, ``building`` only where no build
    holds a live lease), so of any number of simultaneous requests one builds and the
    others are told a copy is being made already (:class:`~iepnode.errors.InProgress`).
    A build replaces the pair's earlier copy; it renews its lease as it writes
    (:data:`BUILD_LEASE`), so a build left by a crashed process blocks the next one
    for at most that long.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from iepnode.errors import Gone, InProgress, InvalidRequest, NotFound
from iepnode.rules.identifiers import is_token, new_token
from iepnode.sharing import transactions
from iepnode.sharing.package import AttachedFile, Package, PackageSource
from iepnode.sharing.zipstream import Member, ZipLayout, iter_batches, read_slice
from storage.models import Transaction
from storage.queries import downloads as queries

log = logging.getLogger("iepnode.downloads")

#: Seconds a password-protected copy stays downloadable.
PROTECTED_TTL = 6 * 3600.0
#: Password alphabet: no 0/O, 1/I/L (read aloud or copied from a screen).
PASSWORD_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
#: Free space kept beyond a protected copy's size when deciding whether to build it.
SPACE_MARGIN = 1 << 30
#: Seconds a build's claim lasts unless renewed; the builder renews it as it writes.
BUILD_LEASE = 120.0


# -- rules ------------------------------------------------------------------------------


def unavailable_reason(transaction: Transaction, now: float) -> str | None:
    """Why the transaction's package cannot be downloaded, or ``None`` if it can."""
    if transaction.purged_at:
        return "The images of this transaction have been removed: it has expired."
    if transaction.status == transactions.DECLINED:
        return "You declined this transaction, so its images can no longer be downloaded."
    if transactions.is_expired(transaction, now):
        return "This transaction has expired: its images can no longer be downloaded."
    return None


def is_downloadable(transaction: Transaction, now: float | None = None) -> bool:
    """Whether the recipient may download the transaction's package now."""
    return unavailable_reason(transaction, time.time() if now is None else now) is None


def check_downloadable(transaction: Transaction, now: float | None = None) -> None:
    """Raise :class:`Gone` with a reason unless the package may be downloaded."""
    reason = unavailable_reason(transaction, time.time() if now is None else now)
    if reason is not None:
        raise Gone(reason)


def source_for_transaction(transaction: Transaction, institution: str) -> PackageSource:
    """What the package of ``transaction`` holds and says (studies in the shared order).

    The attachments only this transaction holds go in too, apart (``ATTACHED/``): they
    are never in the package of another transaction sharing the studies.
    """
    from iepnode.viewing import attachments

    uids = queries.study_uids_of(transaction.id)
    attached = tuple(
        AttachedFile(e.row.key, e.row.title, e.row.media_type, e.added_by, e.row.created_at)
        for e in attachments.describe(attachments.held_by(transaction)))
    contact = tuple(line for line in (
        transaction.contact_name, transaction.contact_department,
        transaction.institution or institution, transaction.contact_email,
        transaction.contact_phone) if line)
    return PackageSource(
        reference=transaction.public_id, study_uids=uids,
        institution=transaction.institution or institution,
        created_at=transaction.created_at, patient_name=transaction.patient_name,
        patient_id=transaction.patient_id, birth_date=transaction.patient_birth_date,
        sex=transaction.patient_sex, contact=contact,
        filename=f"{transaction.public_id}.zip", attachments=attached,
    )


# -- writing zips to files ---------------------------------------------------------------


def write_zip(layout: ZipLayout, out: BinaryIO,
              progress: Callable[[int], None] | None = None) -> int:
    """Write the whole archive to ``out``; return the bytes written.

    Parameters
    ----------
    layout : ZipLayout
        The planned archive.
    out : binary file
        Where to write.
    progress : callable, optional
        Called with the size of each chunk written.
    """
    written = 0
    for chunk in iter_batches(layout):
        out.write(chunk)
        written += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return written


def new_password() -> str:
    """A random password like ``K7QMZ-9XRTB-HD3PA-W2NCE`` (~99 bits, CSPRNG)."""
    return "-".join("".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(5))
                    for _ in range(4))


def _member_chunks(member: Member) -> Iterator[bytes]:
    if isinstance(member.source, bytes):
        yield member.source
    else:
        yield from read_slice(member.source)


def write_protected(package: Package, dest: Path, password: str,
                    progress: Callable[[int], None] | None = None) -> int:
    """Write ``package`` as an AES-256 encrypted zip (WinZip AE-2, STORED) to ``dest``.

    The members and names are those of the plain package. Written to a ``.part``
    file beside ``dest`` and renamed when complete; return the size in bytes.
    """
    import pyzipper

    stamp = time.gmtime(max(package.layout.mtime, 315532800.0))  # DOS times start in 1980
    partial = dest.with_name(dest.name + ".part")
    try:
        with pyzipper.AESZipFile(partial, "w", compression=pyzipper.ZIP_STORED,
                                 encryption=pyzipper.WZ_AES) as archive:
            archive.setpassword(password.encode("ascii"))
            archive.setencryption(pyzipper.WZ_AES, nbits=256)
            for member in package.layout.members:
                info = archive.zipinfo_cls(member.name, date_time=stamp[:6])
                info.compress_type = pyzipper.ZIP_STORED
                info.external_attr = 0o100644 << 16
                with archive.open(info, "w", force_zip64=member.size >= 0xFFFFFFFF) as out:
                    for chunk in _member_chunks(member):
                        out.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
        os.replace(partial, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    return dest.stat().st_size


# -- one build at a time ------------------------------------------------------------------


class BuildClaim:
    """The claim of one build of a protected copy: renew it while writing, then release it.

    Obtained from :func:`claim_build`; only its holder (``owner``) renews or releases it.
    """

    def __init__(self, recipient_id: int, transaction_id: int, owner: str,
                 lease_until: float) -> None:
        self.recipient_id = recipient_id
        self.transaction_id = transaction_id
        self.owner = owner
        self.lease_until = lease_until

    def renew(self, now: float | None = None) -> None:
        """Extend the lease once half of it has passed (cheap to call for every chunk)."""
        now = time.time() if now is None else now
        if now < self.lease_until - BUILD_LEASE / 2:
            return
        self.lease_until = now + BUILD_LEASE
        queries.renew_build(self.recipient_id, self.transaction_id, self.owner, self.lease_until)

    def release(self) -> None:
        """End the build (finished or failed): the next request may build again."""
        queries.release_build(self.recipient_id, self.transaction_id, self.owner)


def claim_build(recipient_id: int, transaction_id: int, now: float | None = None) -> BuildClaim:
    """Claim the build of the recipient's protected copy of a transaction.

    The pair's row is created if missing, then one conditional ``UPDATE`` makes it
    ``building`` only where no build holds a live lease: of simultaneous callers
    exactly one wins (PostgreSQL re-checks the condition after waiting for the row's
    lock; SQLite's writers queue for one lock).

    Raises
    ------
    InProgress
        Another request is making this copy now.
    """
    now = time.time() if now is None else now
    owner = secrets.token_hex(16)
    if not queries.claim_build(recipient_id, transaction_id, owner, now, now + BUILD_LEASE):
        raise InProgress("A password-protected copy of this transaction is being made for "
                         "you already (its password is shown on the page that asked for "
                         "it). Please wait a minute, then ask again if you need a new one.")
    return BuildClaim(recipient_id, transaction_id, owner, now + BUILD_LEASE)


# -- protected copies on disk -------------------------------------------------------------


@dataclass(frozen=True)
class ProtectedCopy:
    """A password-protected copy ready to download (the password is shown once)."""

    token: str
    password: str
    size: int
    filename: str
    expires_at: float


class ProtectedStore:
    """Encrypted copies under ``folder``, named by the SHA-256 of their download token.

    Each copy has a ``.json`` sidecar (recipient, transaction, file name, expiry), so
    any of the node's processes can serve it. One copy per recipient and transaction,
    built one at a time (:func:`claim_build`): asking again replaces it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @staticmethod
    def _name(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def _metas(self) -> Iterator[tuple[Path, dict]]:
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.json")):
            try:
                yield path, json.loads(path.read_text())
            except (OSError, ValueError):
                continue

    def create(self, package: Package, *, recipient_id: int, transaction_id: int,
               public_id: str, ttl: float = PROTECTED_TTL,
               now: float | None = None) -> ProtectedCopy:
        """Write an encrypted copy of ``package`` and return its token and password.

        The build is claimed first (:func:`claim_build`); the pair's earlier copy is
        then removed and the new one written.

        Raises
        ------
        InProgress
            A copy for this recipient and transaction is being made already.
        InvalidRequest
            If the disk lacks room for the copy.
        """
        now = time.time() if now is None else now
        claim = claim_build(recipient_id, transaction_id, now)
        try:
            return self._write(package, claim, recipient_id=recipient_id,
                               public_id=public_id, expires=now + ttl)
        finally:
            claim.release()

    def _write(self, package: Package, claim: BuildClaim, *, recipient_id: int,
               public_id: str, expires: float) -> ProtectedCopy:
        self.folder.mkdir(parents=True, exist_ok=True)
        for path, meta in self._metas():
            if meta.get("recipient_id") == recipient_id and meta.get("public_id") == public_id:
                self._remove(path.with_suffix(""))
        if shutil.disk_usage(self.folder).free < package.size + SPACE_MARGIN:
            raise InvalidRequest("There is not enough room on the server to prepare a "
                                 "password-protected copy just now. Please use the plain "
                                 "download, or try again later.")
        token = new_token()
        base = self.folder / self._name(token)
        password = new_password()
        size = write_protected(package, base.with_suffix(".zip"), password,
                               progress=lambda _: claim.renew())
        meta = {"recipient_id": recipient_id, "public_id": public_id,
                "filename": package.filename, "expires_at": expires, "size": size}
        base.with_suffix(".json").write_text(json.dumps(meta))
        log.info("password-protected copy of %s written (%d bytes)", public_id, size)
        return ProtectedCopy(token, password, size, package.filename, expires)

    def find(self, token: str, recipient_id: int, now: float | None = None,
             ) -> tuple[Path, dict]:
        """The copy a token names, if it is this recipient's and not expired.

        Raises
        ------
        NotFound
            Unknown, expired or someone else's token.
        """
        now = time.time() if now is None else now
        if not is_token(token):
            raise NotFound("no such download")
        base = self.folder / self._name(token)
        try:
            meta = json.loads(base.with_suffix(".json").read_text())
        except (OSError, ValueError):
            raise NotFound("no such download") from None
        path = base.with_suffix(".zip")
        if (meta.get("recipient_id") != recipient_id or meta.get("expires_at", 0) <= now
                or not path.is_file()):
            raise NotFound("no such download")
        return path, meta

    def sweep(self, keep: Callable[[dict], bool], now: float | None = None) -> int:
        """Delete expired copies, and those ``keep`` rejects; return how many.

        Half-written ``.part`` files older than :data:`PROTECTED_TTL` go too.
        """
        now = time.time() if now is None else now
        removed = 0
        for path, meta in self._metas():
            if meta.get("expires_at", 0) <= now or not keep(meta):
                self._remove(path.with_suffix(""))
                removed += 1
        if self.folder.is_dir():
            for part in self.folder.glob("*.part"):
                with contextlib.suppress(OSError):
                    if part.stat().st_mtime < now - PROTECTED_TTL:
                        part.unlink()
        return removed

    @staticmethod
    def _remove(base: Path) -> None:
        for suffix in (".zip", ".json"):
            with contextlib.suppress(FileNotFoundError):
                base.with_suffix(suffix).unlink()


__all__ = [
    "BUILD_LEASE", "PROTECTED_TTL", "BuildClaim", "ProtectedCopy", "ProtectedStore",
    "check_downloadable", "claim_build",
    "is_downloadable", "new_password", "source_for_transaction", "unavailable_reason",
    "write_protected", "write_zip",
]
