"""Every query the domain runs, as named functions grouped by area.

The domain (``iepnode``) decides what is allowed; these modules say how it is
read from and written to the index. A limit the database decides atomically is
one statement here (a conditional ``UPDATE`` whose row count says who won), never
split into a read and a write. Callers that need several statements to commit
together wrap them in :func:`storage.db.write_transaction`.
"""
