"""Sending studies to remote DICOM nodes: jobs in the database, a runner, retries.

A send is a :class:`~storage.models.SendJob` with one :class:`~storage.models.SendItem`
per instance, written when the send is asked for (web page, ``iepnode send``,
auto-routing). A :class:`JobRunner` works on jobs in the background (a thread of
the ``iepnode serve`` main process, or of ``iepnode send`` when no node runs):

- **Claim.** A runner takes the oldest due job in one write transaction with a
  conditional ``UPDATE ... WHERE lease_until < now``; of two runners (processes,
  machines sharing PostgreSQL) only one gets a row back. The lease is renewed
  while the job runs; a runner that dies leaves a lease that runs out, and the
  job is taken over (a restarted node frees its own dead leases at once).
- **Send.** All pending items go over one association (the transport, given by
  the composition root: :func:`scp.sender.make_transport`), each reported as it
  is answered. Results are written in batches every :data:`FLUSH_SECONDS`: after
  a crash, the instances answered in the last batch window are sent again
  (peers keep the first copy of a SOP Instance UID or overwrite it).
- **Retry.** Unreachable peers, refused associations and transient C-STORE
  failures (``0xA7xx`` out of resources) leave items pending; the job is retried
  after ``send_retry_seconds``, doubling up to ``send_retry_max_seconds``, and
  marked failed after ``send_max_attempts``. Items that cannot succeed (no longer
  stored, a stored file that cannot be read or is cut short, a syntax the peer
  refuses and the node cannot convert, a refusal such as ``0xA900``) fail at once
  and are not retried; the rest of the job goes on.
- **Audit.** Queueing is an Export (110106) event, the outcome a DICOM Instances
  Transferred (110104) event per study: who asked, to which AE, what, the result.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from peewee import JOIN, chunked, fn

from iepnode.errors import InvalidRequest, NotFound, PeerUnavailable, UnknownDestination
from iepnode.people import audit
from iepnode.people.audit import Actor
from storage.db import write_transaction
from storage.filestore import FileStore
from storage.models import (
    Instance,
    Patient,
    RemoteAE,
    SendItem,
    SendJob,
    SendRunnerBeat,
    Series,
    Study,
    TransactionSendAE,
)
from storage.stored_file import unreadable_reason

log = logging.getLogger("iepnode.sending")

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
ACTIVE = (QUEUED, RUNNING)
PENDING, SENT, ITEM_FAILED = "pending", "sent", "failed"

#: Seconds a claimed job stays with its runner without a renewal.
LEASE_SECONDS = 30.0
#: Item results are written (and the lease renewed) at least this often.
FLUSH_SECONDS = 0.25
#: How often an idle runner looks for due jobs, and notes that it is alive.
POLL_SECONDS = 0.5
BEAT_SECONDS = 5.0
#: A runner seen within this many seconds counts as alive (``iepnode send`` leaves
#: its job to it).
RUNNER_FRESH_SECONDS = 15.0
#: The most studies one send may hold.
MAX_STUDIES = 200
#: The error of an instance during which the peer dropped the association.
DROPPED = "no C-STORE response: the peer dropped the association"
#: An instance during which the peer dropped the association this often fails for good
#: (a peer that aborts on one object would otherwise block the rest of the job forever).
MAX_DROPS = 3


@dataclass(frozen=True)
class Destination:
    """Where a job goes: a registered remote AE, with its TLS files when it uses TLS."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def __str__(self) -> str:
        return f"{self.ae_title} at {self.host}:{self.port}{' (TLS)' if self.tls else ''}"


@dataclass(frozen=True)
class Outgoing:
    """One stored instance to send.

    ``open`` opens the stored file for reading (the file store's
    :meth:`~storage.filestore.FileStore.open` of its key): the transport reads it
    through that, never by path.
    """

    item_id: int
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    open: Callable[[], BinaryIO]


@dataclass(frozen=True)
class ItemResult:
    """What happened to one instance.

    ``sent``: the peer answered Success or a Warning. Otherwise ``permanent`` says
    whether retrying could help (``False``: the item stays pending).
    """

    item_id: int
    sent: bool
    status: int | None = None
    error: str = ""
    permanent: bool = False


#: ``transport(destination, items, report)`` sends ``items`` over one association,
#: calling ``report`` with each result as it is known, and stops when ``report``
#: returns ``False``. It raises :class:`~iepnode.errors.PeerUnavailable` when no
#: association can be made or the association breaks.
Transport = Callable[[Destination, Sequence[Outgoing], Callable[[ItemResult], bool]], None]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off between attempts of a job."""

    first: float = 10.0
    cap: float = 900.0
    max_attempts: int = 20

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        return min(self.cap, self.first * 2 ** max(0, attempts - 1))


@dataclass(frozen=True)
class JobProgress:
    """A job as progress displays show it."""

    id: int
    ae_title: str
    state: str
    total: int
    sent: int
    failed: int
    attempts: int
    error: str
    next_try_at: float
    created_at: float
    finished_at: float | None
    requested_by: str
    study_uids: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Whether the job is done or failed for good."""
        return self.state in (DONE, FAILED)

    def as_json(self) -> dict[str, object]:
        """The job for a JSON progress endpoint."""
        return {"id": self.id, "ae_title": self.ae_title, "state": self.state,
                "total": self.total, "sent": self.sent, "failed": self.failed,
                "attempts": self.attempts, "error": self.error,
                "next_try_at": self.next_try_at, "finished": self.finished}


def progress_of(job: SendJob) -> JobProgress:
    """The :class:`JobProgress` of a job row."""
    return JobProgress(job.id, job.ae_title, job.state, job.total, job.sent, job.failed,
                       job.attempts, job.error, job.next_try_at, job.created_at,
                       job.finished_at, job.requested_by, job.study_uid_list)


# -- queueing ------------------------------------------------------------------------------


def destination_ae(ae_title: str) -> RemoteAE:
    """The registered remote AE ``ae_title`` if the node may send to it.

    Raises
    ------
    UnknownDestination
        No such AE, or it is not marked as a send destination (``--send-to``).
    """
    ae = RemoteAE.get_or_none(RemoteAE.ae_title == ae_title.strip())
    if ae is None:
        raise UnknownDestination(f"remote AE {ae_title.strip()!r} is not registered")
    if not ae.send_to:
        raise UnknownDestination(f"remote AE {ae.ae_title!r} is not a send destination "
                                 f"(iepnode ae add ... --send-to)")
    return ae


def queue_job(study_uids: Sequence[str], ae_title: str, actor: Actor, *,
              transaction: str = "", route_id: int | None = None,
              now: float | None = None) -> SendJob:
    """Queue a send of the stored instances of ``study_uids`` to a remote AE (audited).

    Parameters
    ----------
    study_uids : sequence of str
        Study Instance UIDs; their instances stored now are sent.
    ae_title : str
        A registered remote AE marked as a send destination.
    actor : Actor
        Who asks (kept on the job and in the audit trail).
    transaction : str, optional
        The transaction the send belongs to (shown on its pages).
    route_id : int, optional
        The routing rule that queued it.

    Returns
    -------
    SendJob
        The new job, ``queued``.

    Raises
    ------
    UnknownDestination
        The AE is unknown or not a destination.
    InvalidRequest
        No studies, too many, or none of their instances is stored.
    """
    now = time.time() if now is None else now
    uids = list(dict.fromkeys(u.strip() for u in study_uids if u and u.strip()))
    if not uids:
        raise InvalidRequest("choose at least one study to send")
    if len(uids) > MAX_STUDIES:
        raise InvalidRequest(f"at most {MAX_STUDIES} studies in one send")
    ae = destination_ae(ae_title)
    studies = list(Study.select(Study, Patient).join(Patient).where(Study.study_uid.in_(uids)))
    if not studies:
        raise InvalidRequest("none of these studies is stored on the node")
    sop_uids = [sop for (sop,) in (
        Instance.select(Instance.sop_uid).join(Series).join(Study)
        .where(Study.study_uid.in_(uids))
        .order_by(Study.id, Series.id, Instance.id)
        .tuples())]
    if not sop_uids:
        raise InvalidRequest("none of these studies has stored instances")
    found = [s.study_uid for s in studies]
    patient_id = studies[0].patient.patient_id
    with write_transaction():
        job = SendJob.create(
            ae_title=ae.ae_title, study_uids="\\".join(found), patient_id=patient_id,
            transaction_public_id=transaction, route_id=route_id,
            requester_kind=actor.kind, requested_by=actor.name[:254],
            source_ip=actor.source_ip[:64], state=QUEUED, next_try_at=now,
            total=len(sop_uids), created_at=now)
        for batch in chunked(sop_uids, 300):
            SendItem.insert_many([(job.id, sop) for sop in batch],
                                 fields=[SendItem.job, SendItem.sop_uid]).execute()
        for study in studies:
            audit.record(audit.EXPORT, "dicom-send-queued", actor, patient_id=patient_id,
                         study_uid=study.study_uid, transaction=transaction, now=now,
                         detail=f"job {job.id}: {study.num_instances} instances to "
                                f"{ae.ae_title} at {ae.host}:{ae.port}"
                                f"{' (TLS)' if ae.tls else ''}"
                                f"{f' by routing rule {route_id}' if route_id else ''}")
    log.info("send job %d queued by %s %s: %d instances of %d studies to %s", job.id,
             actor.kind, actor.name, len(sop_uids), len(found), ae.ae_title)
    return job


def get_job(job_id: int) -> SendJob:
    """The job with this ID.

    Raises
    ------
    NotFound
        No such job.
    """
    job = SendJob.get_or_none(SendJob.id == job_id)
    if job is None:
        raise NotFound(f"no send job {job_id}")
    return job


def recent_jobs(transaction: str | None = None, limit: int = 50) -> list[SendJob]:
    """Newest jobs first; only a transaction's when ``transaction`` is given."""
    query = SendJob.select()
    if transaction is not None:
        query = query.where(SendJob.transaction_public_id == transaction)
    return list(query.order_by(SendJob.id.desc()).limit(limit))


def runner_alive(now: float | None = None) -> bool:
    """Whether a job runner (``iepnode serve``) noted that it was alive lately."""
    now = time.time() if now is None else now
    return SendRunnerBeat.select().where(
        SendRunnerBeat.seen_at > now - RUNNER_FRESH_SECONDS).exists()


# -- claiming --------------------------------------------------------------------------------


def claim_job(owner: str, *, job_id: int | None = None, now: float | None = None,
              lease: float = LEASE_SECONDS) -> SendJob | None:
    """Take the oldest due job (or job ``job_id`` if due) for ``owner``; ``None`` if none.

    The conditional update makes the claim atomic across processes and machines:
    of two runners that picked the same row, the second updates nothing.
    """
    now = time.time() if now is None else now
    with write_transaction():
        query = (SendJob.select(SendJob.id)
                 .where(SendJob.state.in_(ACTIVE) & (SendJob.next_try_at <= now)
                        & (SendJob.lease_until < now))
                 .order_by(SendJob.next_try_at, SendJob.id).limit(1))
        if job_id is not None:
            query = query.where(SendJob.id == job_id)
        row = query.first()
        if row is None:
            return None
        claimed = (SendJob.update(state=RUNNING, lease_owner=owner, lease_until=now + lease,
                                  attempts=SendJob.attempts + 1,
                                  started_at=fn.COALESCE(SendJob.started_at, now))
                   .where((SendJob.id == row.id) & SendJob.state.in_(ACTIVE)
                          & (SendJob.lease_until < now))
                   .execute())
    return SendJob.get_by_id(row.id) if claimed == 1 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_dead_leases(host: str | None = None) -> int:
    """Free the leases held by runners of this machine whose process has died.

    A node restarted after a crash thus resumes its jobs at once instead of
    waiting for their leases to run out. Returns how many were freed.
    """
    host = host or socket.gethostname()
    freed = 0
    for job in SendJob.select().where((SendJob.state == RUNNING)
                                      & SendJob.lease_owner.startswith(f"{host}/")):
        try:
            pid = int(job.lease_owner.split("/")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            with write_transaction():
                freed += SendJob.update(lease_until=0.0).where(
                    (SendJob.id == job.id) & (SendJob.lease_owner == job.lease_owner)).execute()
    return freed


# -- running ---------------------------------------------------------------------------------


def _transient(status: int) -> bool:
    """C-STORE failure statuses worth retrying: out of resources (0xA7xx, 0x0213)."""
    return 0xA700 <= status <= 0xA7FF or status == 0x0213


def failure_result(item_id: int, status: int, comment: str = "") -> ItemResult:
    """The result of a C-STORE answered with a failure ``status``."""
    what = f"peer answered 0x{status:04X}{f' ({comment})' if comment else ''}"
    return ItemResult(item_id, False, status, what, permanent=not _transient(status))


class _Batch:
    """Item results waiting to be written, and the job's running totals."""

    def __init__(self) -> None:
        self.results: list[ItemResult] = []
        self.last_flush = time.monotonic()
        self.last_error = ""


class JobRunner:
    """Works on send jobs: claims, sends through the transport, records, retries.

    Parameters
    ----------
    store : FileStore
        Where the instances' files are.
    transport : Transport
        Sends items over one association (see :data:`Transport`).
    retry : RetryPolicy
        Back-off and the attempt limit.
    owner : str, optional
        The lease owner name (default ``HOST/PID/RANDOM``).
    """

    def __init__(self, store: FileStore, transport: Transport, retry: RetryPolicy,
                 owner: str | None = None) -> None:
        self.store = store
        self.transport = transport
        self.retry = retry
        self.owner = owner or f"{socket.gethostname()}/{os.getpid()}/{os.urandom(3).hex()}"

    # -- loop ------------------------------------------------------------------------------

    def beat(self, now: float | None = None) -> None:
        """Note that this runner is alive (``iepnode send`` then leaves jobs to it)."""
        now = time.time() if now is None else now
        with write_transaction():
            updated = SendRunnerBeat.update(seen_at=now).where(
                SendRunnerBeat.owner == self.owner).execute()
            if not updated:
                SendRunnerBeat.create(owner=self.owner, seen_at=now)
            SendRunnerBeat.delete().where(SendRunnerBeat.seen_at < now - 3600).execute()

    def forget(self) -> None:
        """Remove this runner's beat (it stops)."""
        with write_transaction():
            SendRunnerBeat.delete().where(SendRunnerBeat.owner == self.owner).execute()

    def run_forever(self, stop: threading.Event) -> None:
        """Work on due jobs until ``stop`` is set (run it in a thread of its own)."""
        log.info("send runner %s started", self.owner)
        try:
            freed = free_dead_leases()
            if freed:
                log.info("resuming %d send jobs of a node that stopped mid-send", freed)
        except Exception:
            log.exception("could not free dead send leases")
        next_beat = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_beat:
                    self.beat()
                    next_beat = time.monotonic() + BEAT_SECONDS
                if self.run_one(stop) is not None:
                    continue
            except Exception:
                log.exception("send runner pass failed")
            stop.wait(POLL_SECONDS)
        try:
            self.forget()
        except Exception:
            log.exception("could not remove the send runner's beat")
        log.info("send runner %s stopped", self.owner)

    def run_one(self, stop: threading.Event | None = None,
                job_id: int | None = None) -> SendJob | None:
        """Claim one due job (or ``job_id``) and work on it; return it, or ``None``."""
        job = claim_job(self.owner, job_id=job_id)
        if job is None:
            return None
        stop = stop or threading.Event()
        log.info("send job %d: attempt %d to %s (%d of %d sent)", job.id, job.attempts,
                 job.ae_title, job.sent, job.total)
        error, stopped, give_up = "", False, False
        try:
            error, stopped = self._attempt(job, stop)
        except UnknownDestination as exc:
            error, give_up = str(exc), True
        except Exception as exc:
            log.exception("send job %d failed unexpectedly", job.id)
            error = f"internal error: {exc}"
        return self._finish(job, error, stopped, give_up=give_up)

    # -- one attempt -----------------------------------------------------------------------

    def _destination(self, job: SendJob) -> Destination:
        ae = destination_ae(job.ae_title)
        return Destination(ae.ae_title, ae.host, ae.port, ae.tls, ae.tls_ca, ae.tls_cert,
                           ae.tls_key)

    def _outgoing(self, job: SendJob, batch: _Batch) -> list[Outgoing]:
        rows = (SendItem.select(SendItem.id, SendItem.sop_uid, Instance.sop_class,
                                Instance.transfer_syntax, Instance.key)
                .join(Instance, JOIN.LEFT_OUTER, on=(SendItem.sop_uid == Instance.sop_uid))
                .where((SendItem.job == job.id) & (SendItem.state == PENDING))
                .order_by(SendItem.id).tuples())
        items = []
        for item_id, sop_uid, sop_class, ts, key in rows:
            if key is None:
                batch.results.append(ItemResult(item_id, False, None,
                                                "no longer stored on the node", True))
                continue
            path = self.store.path(key)
            # A damaged file (cut short, emptied, unreadable) is never sent: it fails
            # alone, with the reason, and the rest of the job goes on.
            reason = unreadable_reason(path)
            if reason is not None:
                log.warning("send job %d: instance %s (file %s) not sent: %s", job.id,
                            sop_uid, key, reason)
                batch.results.append(ItemResult(item_id, False, None, reason, True))
                continue
            items.append(Outgoing(item_id, sop_uid, sop_class, ts,
                                  functools.partial(self.store.open, key)))
        return items

    def _attempt(self, job: SendJob, stop: threading.Event) -> tuple[str, bool]:
        """Send the job's pending items once; return (last error, stopped early)."""
        batch = _Batch()
        destination = self._destination(job)
        items = self._outgoing(job, batch)
        lost = threading.Event()

        def report(result: ItemResult) -> bool:
            batch.results.append(result)
            if not result.sent:
                batch.last_error = result.error
            due = time.monotonic() - batch.last_flush >= FLUSH_SECONDS
            if due and not self._flush(job, batch):
                lost.set()
            return not (stop.is_set() or lost.is_set())

        error = ""
        if items:
            try:
                self.transport(destination, items, report)
            except PeerUnavailable as exc:
                error = str(exc)
        self._flush(job, batch)
        if lost.is_set():
            raise RuntimeError("the job's lease was lost to another runner")
        return error or batch.last_error, stop.is_set()

    def _flush(self, job: SendJob, batch: _Batch) -> bool:
        """Write the batched item results; renew the lease. ``False``: lease lost."""
        results, batch.results = batch.results, []
        batch.last_flush = time.monotonic()
        sent = [r for r in results if r.sent]
        failed = [r for r in results if not r.sent and r.permanent]
        pending = [r for r in results if not r.sent and not r.permanent]
        with write_transaction():
            by_status: dict[int | None, list[int]] = {}
            for r in sent:
                by_status.setdefault(r.status, []).append(r.item_id)
            for status, ids in by_status.items():
                for part in chunked(ids, 500):
                    SendItem.update(state=SENT, attempts=SendItem.attempts + 1,
                                    last_status=status, error="").where(
                        SendItem.id.in_(part)).execute()
            for r in failed + pending:
                SendItem.update(state=ITEM_FAILED if r.permanent else PENDING,
                                attempts=SendItem.attempts + 1, last_status=r.status,
                                error=r.error[:255]).where(SendItem.id == r.item_id).execute()
            dropped = [r.item_id for r in pending if r.error == DROPPED]
            if dropped:
                given_up = SendItem.update(
                    state=ITEM_FAILED,
                    error=f"the peer dropped the association {MAX_DROPS} times while "
                          f"receiving it").where(SendItem.id.in_(dropped)
                                                 & (SendItem.attempts >= MAX_DROPS)).execute()
                failed_count = len(failed) + given_up
            else:
                failed_count = len(failed)
            kept = (SendJob.update(sent=SendJob.sent + len(sent),
                                   failed=SendJob.failed + failed_count,
                                   lease_until=time.time() + LEASE_SECONDS)
                    .where((SendJob.id == job.id) & (SendJob.lease_owner == self.owner))
                    .execute())
        return kept == 1

    def _finish(self, job: SendJob, error: str, stopped: bool, *,
                give_up: bool = False) -> SendJob:
        """Mark the job done, failed, queued for a retry, or released (shutdown)."""
        now = time.time()
        counts = dict(SendItem.select(SendItem.state, fn.COUNT(SendItem.id))
                      .where(SendItem.job == job.id).group_by(SendItem.state).tuples())
        pending, failed = counts.get(PENDING, 0), counts.get(ITEM_FAILED, 0)
        first_failure = ""
        if failed:
            first_failure = (SendItem.select(SendItem.error)
                             .where((SendItem.job == job.id) & (SendItem.state == ITEM_FAILED))
                             .order_by(SendItem.id).scalar()) or ""
        changes: dict[str, object] = {"lease_owner": "", "lease_until": 0.0,
                                      "sent": counts.get(SENT, 0), "failed": failed}
        if stopped and pending:
            # The node is stopping: hand the job back untouched for the next runner.
            changes.update(state=QUEUED, next_try_at=now, attempts=max(0, job.attempts - 1))
        elif not pending:
            state = DONE if not failed else FAILED
            message = "" if not failed else (f"{failed} of {job.total} instances could not "
                                             f"be sent; first: {first_failure}")
            changes.update(state=state, error=message, finished_at=now)
        elif give_up:
            changes.update(state=FAILED, finished_at=now,
                           error=f"{error}; {pending} instances not sent")
        elif job.attempts >= self.retry.max_attempts:
            changes.update(state=FAILED, finished_at=now,
                           error=f"gave up after {job.attempts} attempts; {pending} instances "
                                 f"not sent: {error or 'no answer'}")
        else:
            delay = self.retry.delay(job.attempts)
            changes.update(state=QUEUED, next_try_at=now + delay,
                           error=f"attempt {job.attempts} failed ({error or 'no answer'}); "
                                 f"retrying in {delay:.0f} s")
        with write_transaction():
            SendJob.update(**changes).where((SendJob.id == job.id)
                                            & (SendJob.lease_owner == self.owner)).execute()
        job = SendJob.get_by_id(job.id)
        if job.state in (DONE, FAILED):
            self._audit(job)
            log.info("send job %d %s: %d sent, %d failed of %d to %s%s", job.id, job.state,
                     job.sent, job.failed, job.total, job.ae_title,
                     f" ({job.error})" if job.error else "")
        elif not stopped:
            log.warning("send job %d to %s: %s", job.id, job.ae_title, job.error)
        return job

    def _audit(self, job: SendJob) -> None:
        actor = Actor(job.requester_kind, job.requested_by, job.source_ip)
        outcome = (audit.SUCCESS if job.state == DONE
                   else audit.SERIOUS_FAILURE if job.sent == 0 else audit.MINOR_FAILURE)
        for study_uid in job.study_uid_list:
            audit.record(audit.INSTANCES_TRANSFERRED, "dicom-send", actor, outcome=outcome,
                         patient_id=job.patient_id, study_uid=study_uid,
                         transaction=job.transaction_public_id,
                         detail=f"job {job.id} to {job.ae_title}: {job.sent} of {job.total} "
                                f"instances sent, {job.failed} failed"
                                f"{f'; {job.error}' if job.error else ''}"[:2000])


# -- sends by the recipient of a transaction (allowed per transaction by staff) ------------


def transaction_send_aes(transaction_id: int) -> list[str]:
    """The AE titles the recipient of a transaction may send its studies to."""
    return [t for (t,) in TransactionSendAE.select(TransactionSendAE.ae_title)
            .where(TransactionSendAE.transaction == transaction_id)
            .order_by(TransactionSendAE.ae_title).tuples()]


def set_transaction_send_aes(transaction_id: int, ae_titles: Sequence[str]) -> list[str]:
    """Let the recipient of a transaction send to exactly ``ae_titles`` (none: not at all).

    Raises
    ------
    UnknownDestination
        A title that is not a registered send destination.
    """
    titles = sorted({t.strip() for t in ae_titles if t.strip()})
    for title in titles:
        destination_ae(title)
    with write_transaction():
        TransactionSendAE.delete().where(
            TransactionSendAE.transaction == transaction_id).execute()
        if titles:
            TransactionSendAE.insert_many(
                [(transaction_id, t) for t in titles],
                fields=[TransactionSendAE.transaction, TransactionSendAE.ae_title]).execute()
    return titles


def send_options(transaction_ids: Sequence[int]) -> dict[int, list[str]]:
    """For each transaction, the send destinations its recipient may use now."""
    if not transaction_ids:
        return {}
    rows = (TransactionSendAE.select(TransactionSendAE.transaction, TransactionSendAE.ae_title)
            .join(RemoteAE, on=(TransactionSendAE.ae_title == RemoteAE.ae_title))
            .where(TransactionSendAE.transaction.in_(list(transaction_ids))
                   & (RemoteAE.send_to == True))  # noqa: E712
            .order_by(TransactionSendAE.ae_title).tuples())
    options: dict[int, list[str]] = {}
    for transaction_id, title in rows:
        options.setdefault(transaction_id, []).append(title)
    return options
