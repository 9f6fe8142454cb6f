"""Sends to DICOM nodes (issue 6) and auto-routing rules.

Sends are jobs in the database (:mod:`iepnode.outbound.sending`); a JobRunner (a thread
of the serve main process, or of ``iepnode send``) works on them through a transport
the composition root provides (``scp.sender``). Auto-routing rules:
:mod:`iepnode.outbound.routing`.
"""

from __future__ import annotations

import time

from config import Settings
from iepnode.errors import InvalidRequest, NotFound
from iepnode.outbound import routing, send_runner, sending, transaction_sends
from iepnode.people import audit
from iepnode.people.audit import Actor
from iepnode.sharing import transactions
from storage import registry
from storage.filestore import FileStore
from storage.models import RemoteAE, RouteRule, SendJob
from storage.queries import outbound as queries
from storage.queries import recipients as recipients_q
from storage.queries import transactions as transactions_q


class SendService:
    """Staff's and recipients' sends, their progress, and the routing rules.

    Parameters
    ----------
    settings : Settings
        The retry policy of send jobs.
    store : FileStore
        Where the runner reads the instances it sends.
    """

    def __init__(self, settings: Settings, store: FileStore) -> None:
        self.settings = settings
        self.store = store

    def send_destinations(self) -> list[RemoteAE]:
        """The remote AEs the node may send studies to."""
        return registry.send_destinations()

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

    def job_runner(self, transport: sending.Transport) -> send_runner.JobRunner:
        """A runner for send jobs that sends through ``transport``."""
        retry = sending.RetryPolicy(self.settings.send_retry_seconds,
                                    self.settings.send_retry_max_seconds,
                                    self.settings.send_max_attempts)
        return send_runner.JobRunner(self.store, transport, retry)

    def send_transaction(self, public_id: str, ae_title: str, actor: Actor) -> SendJob:
        """Staff: send a transaction's studies to a remote AE.

        Raises
        ------
        NotFound
            No such transaction.
        InvalidRequest, UnknownDestination
            Its images are gone, or the AE is not a send destination.
        """
        transaction = transactions_q.transaction_with_public_id(public_id)
        if transaction is None:
            raise NotFound(f"no transaction {public_id}")
        if transaction.purged_at:
            raise InvalidRequest("the images of this transaction have been removed")
        uids = transactions_q.study_uids_of(transaction.id, ordered=True)
        return sending.queue_job(uids, ae_title, actor, transaction=public_id)

    def recipient_send_aes(self, public_id: str) -> list[str]:
        """The AEs staff let the recipient of a transaction send to."""
        transaction = transactions_q.transaction_with_public_id(public_id)
        if transaction is None:
            raise NotFound(f"no transaction {public_id}")
        return transaction_sends.transaction_send_aes(transaction.id)

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
        transaction = transactions_q.transaction_with_public_id(public_id)
        if transaction is None:
            raise NotFound(f"no transaction {public_id}")
        titles = transaction_sends.set_transaction_send_aes(transaction.id, ae_titles)
        audit.record(audit.SECURITY_ALERT, "admin-change", actor,
                     patient_id=transaction.patient_id, transaction=public_id,
                     detail=f"recipient may send to: {', '.join(titles) or 'none'}")
        return titles

    def recipient_send_options(self, recipient_id: int,
                               public_ids: list[str]) -> dict[str, list[str]]:
        """For the recipient's transactions among ``public_ids``: where they may send."""
        rows = queries.live_transactions_of(recipient_id, public_ids, time.time())
        options = transaction_sends.send_options([t.id for t in rows])
        return {t.public_id: options[t.id] for t in rows if t.id in options}

    def recipient_sends(self, recipient_id: int,
                        public_ids: list[str]) -> dict[str, list[sending.JobProgress]]:
        """The sends the recipient asked for, by transaction."""
        found: dict[str, list[sending.JobProgress]] = {}
        recipient = recipients_q.recipient_by_id(recipient_id)
        for job in queries.recipient_send_jobs(recipient.email, public_ids, 100):
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
        recipient = recipients_q.recipient_by_id(recipient_id)
        transaction = transactions.get_for_recipient(recipient, public_id)
        allowed = self.recipient_send_options(recipient_id, [public_id]).get(public_id, [])
        if ae_title.strip() not in allowed:
            raise InvalidRequest("choose one of the destinations offered for this transaction")
        uids = transactions_q.study_uids_of(transaction.id, ordered=True)
        return sending.queue_job(uids, ae_title, audit.Actor("recipient", recipient.email,
                                                             source_ip),
                                 transaction=public_id)

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
