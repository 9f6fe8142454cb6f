"""People: staff accounts and logins, passwords, and the audit trail.

:class:`~.staff_logins.StaffLogins` (login, lockout, steps after a reset),
:class:`~.staff_accounts.StaffAccounts` (own account, users), :class:`~.audit_trail.AuditTrail`
(the audit log page); the one password policy and hasher (:mod:`.passwords`), accounts
(:mod:`.staff`), and :func:`.audit.record` with the audit EventIDs. See
docs/architecture.md.
"""
