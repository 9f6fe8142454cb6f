"""Every query the domain runs, as named functions grouped by area.

The domain (``iepnode``) decides what is allowed; these modules say how it is
read from and written to the index. A limit the database decides atomically is
one statement here (a conditional ``UPDATE`` whose row count says who won), never
split into a read and a write. Callers that need several statements to commit
together wrap them in :func:`storage.db.write_transaction`.
"""

from __future__ import annotations

import peewee

#: Raised by a write that breaks a unique or foreign-key constraint (e.g. a row
#: another process inserted just now): peewee's ``IntegrityError``, named here so
#: that the domain need not import peewee.
Conflict = peewee.IntegrityError

#: The type of the index database (for annotations; it is built by the composition root).
Database = peewee.Database
#: Any error of the index database (peewee's ``DatabaseError``), and the one for
#: "the database or disk is full" and lost connections (``OperationalError``).
DatabaseError = peewee.DatabaseError
OperationalError = peewee.OperationalError
