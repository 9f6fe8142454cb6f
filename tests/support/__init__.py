"""Helpers for iepnode's tests and benches: the served node and real peers.

``node`` (``iepnode serve`` as a subprocess, its CLI, polling), ``peers`` (dcmtk
storescp, Orthanc, free ports; also imported by ``bench/``), ``mail`` (aiosmtpd),
``chromium`` (Debian's Chromium for Playwright), ``postgres``, ``tools`` (absolute
paths of dcmtk and dicom3tools), ``scu`` (dcmtk/pynetdicom senders).
"""
