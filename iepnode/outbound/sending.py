"""Sending studies to remote DICOM nodes: jobs in the database, a runner, retries.

A send is a :class:`~storage.models.SendJob` with one :class:`~storage.models.SendItem`
per instance, written when the send is asked for (web page, ``iepnode send``,
auto-routing). A :class:`~iepnode.outbound.send_runner.JobRunner` works on jobs in the
background (a thread of the ``iepnode serve`` main process, or of ``iepnode send`` when
no node runs):

- **Claim.** A runner takes the oldest due job in one write transaction with a
  conditional ``UPDATE ... WHERE lease_until < now``; of two runners (processes,
  machines sharing PostgreSQL) only one gets a row back. The lease is renewed
  while the job runs; a runner that dies leaves a lease that runs out, and the
  job is taken over (a restarted node frees its own dead leases at once).
- **Send.** All pending items go over one association (the transport, given by
  the composition root: :func:`scp.sender.make_transport`), each reported as it
  is answered. Results are written in batches every
  :data:`~iepnode.outbound.send_runner.FLUSH_SECONDS`: after
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

This module holds the jobs' states and types, queueing and progress; the runner is
:mod:`iepnode.outbound.send_runner`, the destinations a transaction's recipient may
send to are kept by :mod:`iepnode.outbound.transaction_sends`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from peewee import chunked

from iepnode.errors import InvalidRequest, NotFound, UnknownDestination
from iepnode.people import audit
from iepnode.people.audit import Actor
from storage.db import write_transaction
from storage.models import (
    Instance,
    Patient,
    RemoteAE,
    SendItem,
    SendJob,
    SendRunnerBeat,
    Series,
    Study,
)

log = logging.getLogger("iepnode.sending")

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
ACTIVE = (QUEUED, RUNNING)
PENDING, SENT, ITEM_FAILED = "pending", "sent", "failed"

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


# -- results of the transport -------------------------------------------------------------


def _transient(status: int) -> bool:
    """C-STORE failure statuses worth retrying: out of resources (0xA7xx, 0x0213)."""
    return 0xA700 <= status <= 0xA7FF or status == 0x0213


def failure_result(item_id: int, status: int, comment: str = "") -> ItemResult:
    """The result of a C-STORE answered with a failure ``status``."""
    what = f"peer answered 0x{status:04X}{f' ({comment})' if comment else ''}"
    return ItemResult(item_id, False, status, what, permanent=not _transient(status))

