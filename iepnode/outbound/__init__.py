"""Outbound: studies sent to DICOM nodes, routing rules, mail and SMS.

:class:`~.service.SendService` (send jobs of :mod:`.sending` worked by
:mod:`.send_runner`, a transaction's send AEs in :mod:`.transaction_sends`, routing rules
of :mod:`.routing`) and :class:`~.messaging.Messenger` (SMTP, SMS gateways or the outbox
folder; texts in :mod:`.notifications`). The DICOM transport itself is the SCP
package's (``scp.sender``), handed in by the composition root. See docs/architecture.md.
"""
