"""Uploads on request: a hospital asks an individual for images and receives them.

:class:`~.service.RequestService` (requests of :mod:`.image_requests`; sent uploads
inspected by :mod:`.intake`, reviewed, released or rejected by :mod:`.review`) and
:class:`~.staging.UploadService` (the staging area and resumable chunk protocol). See
docs/architecture.md.
"""
