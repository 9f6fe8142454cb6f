"""The domain's record types: the rows the services hand to the edges (web/, scp/).

``web`` and ``scp`` never import ``storage`` or ``peewee`` (tests/test_layering.py
says so); where they name a record, in a type hint or to read its fields, they name
it from here. These are the index's row classes themselves, re-exported as what the
domain returns: read their attributes, do not query or save them at the edges
(the queries belong to the service that owns the table, see docs/architecture.md).

- :class:`WebSession`: a signed-in browser session (recipient or staff);
- :class:`Recipient`: a person a transaction was shared with;
- :class:`StaffUser`: a hospital user of the staff pages;
- :class:`Transaction`: one sharing of studies with a recipient;
- :class:`UploadFile`: one file of a patient's upload.

:data:`SERVICES` lists the DICOM services a remote AE record may allow beyond
C-ECHO (the vocabulary of ``RemoteAE.allow``).
"""

from __future__ import annotations

from storage.models import Recipient, StaffUser, Transaction, UploadFile, WebSession
from storage.registry import SERVICES

__all__ = ["SERVICES", "Recipient", "StaffUser", "Transaction", "UploadFile", "WebSession"]
