"""The runner of send jobs: claim a due job under a lease, send, record, retry, audit.

A :class:`JobRunner` works in a thread of ``iepnode serve`` (or of ``iepnode send``
when no node runs). What a job is, how it is queued and the rules it follows are told
in :mod:`iepnode.outbound.sending`; this module holds the atomic claim
(:func:`claim_job`), the freeing of leases whose runner died
(:func:`free_dead_leases`) and the runner itself.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time

from peewee import JOIN, chunked, fn

from iepnode.errors import PeerUnavailable, UnknownDestination
from iepnode.outbound.sending import (
    ACTIVE,
    DONE,
    DROPPED,
    FAILED,
    ITEM_FAILED,
    MAX_DROPS,
    PENDING,
    QUEUED,
    RUNNING,
    SENT,
    Destination,
    ItemResult,
    Outgoing,
    RetryPolicy,
    Transport,
    destination_ae,
)
from iepnode.people import audit
from iepnode.people.audit import Actor
from storage.db import write_transaction
from storage.filestore import FileStore
from storage.models import Instance, SendItem, SendJob, SendRunnerBeat
from storage.stored_file import unreadable_reason

log = logging.getLogger("iepnode.sending")

#: Seconds a claimed job stays with its runner without a renewal.
LEASE_SECONDS = 30.0
#: Item results are written (and the lease renewed) at least this often.
FLUSH_SECONDS = 0.25
#: How often an idle runner looks for due jobs, and notes that it is alive.
POLL_SECONDS = 0.5
BEAT_SECONDS = 5.0


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
