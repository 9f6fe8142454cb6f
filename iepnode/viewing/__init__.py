"""Viewing: the web viewer, reports and attachments, and DICOMweb.

:class:`~.service.ViewingService` (what a person may view; frames by :mod:`.rendering`),
:class:`~.report_service.ReportService` (PDFs and SRs of :mod:`.reports`; attachments
of :mod:`.attachments`, wrapped as DICOM by :mod:`.wrapping`),
:class:`~.dicomweb.DicomWebService` (QIDO-RS / WADO-RS; scopes and tokens in
:mod:`.dicomweb_access`). See docs/architecture.md.
"""
