"""Helpers for iepnode's tests: real peers (PostgreSQL, dcmtk, dicom3tools)."""
