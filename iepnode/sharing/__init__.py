"""Sharing: transactions with recipients, their logins, forwards and downloads.

:class:`~.service.SharingService` (share, dashboard, decline, messages, expiry),
:class:`~.login_service.RecipientLogins` (link, passcode, session, authenticator app;
the atomic limits in :mod:`.logins`), :class:`~.forward_service.ForwardService`
(:mod:`.forwarding`'s limits), :class:`~.download_service.DownloadService` (the IHE PDI
zip of :mod:`.package` planned by :mod:`.package_plan`, :mod:`.pdi`, :mod:`.previews`,
:mod:`.zipstream`, its bytes streamed by :mod:`.download_stream`, CRCs in
:mod:`.checksums`, rules in
:mod:`.downloads`), and the staff side's :class:`~.staff_transactions.StaffTransactions`
and :class:`~.passcode_channels.PasscodeChannels`. See docs/architecture.md.
"""
