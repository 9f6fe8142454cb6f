"""Uploads on request: a hospital asks an individual for images and receives them.

:class:`~.service.RequestService` (requests of :mod:`.image_requests`; sent uploads
inspected by :mod:`.intake`, reviewed by :mod:`.review`, released or rejected by
:mod:`.release`, listed by :mod:`.listing`, recovered or purged by :mod:`.housekeeping`)
and :class:`~.staging.UploadService` (the staging area and resumable chunk protocol; the
chunk writer in :mod:`.chunks`). See
docs/architecture.md.
"""
