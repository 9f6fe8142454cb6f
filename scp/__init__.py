"""The DICOM network edge: pynetdicom AE set-up and thin event handlers.

Imports ``iepnode`` (the domain); never ``web``.
"""
