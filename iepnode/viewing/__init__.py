"""Viewing: the web viewer, reports and attachments, and DICOMweb.

:class:`~.service.ViewingService` (what a person may view; frames by :mod:`.rendering`
over :mod:`.pixel_values`), :class:`~.report_service.ReportService` (PDFs and SRs of
:mod:`.reports`; attachments listed by :mod:`.attachments`, added by :mod:`.attaching`,
filed into the study by :mod:`.attachment_filing`, wrapped as DICOM by :mod:`.wrapping`,
:mod:`.image_wrapping` and :mod:`.wrapped_object`), :class:`~.dicomweb.DicomWebService`
(QIDO-RS / WADO-RS: frames in :mod:`.dicomweb_frames`, metadata in
:mod:`.dicomweb_metadata`, rendered images in :mod:`.dicomweb_rendered`; scopes and
tokens in :mod:`.dicomweb_access`). See docs/architecture.md.
"""
