"""The human-readable parts of a download package (IHE RAD TF PDI media content).

IHE Portable Data for Imaging puts beside the DICOM file-set:

- ``README.TXT``: what is on the media, who made it, how to use it;
- ``INDEX.HTM`` and the ``IHE_PDI/`` folder: web content a browser opens offline,
  XHTML and JPEG only, no scripts, ISO 9660 8.3 upper-case file names.

This module renders those from plain values (already decoded text from the
index). Pages are pure ASCII: anything else is written as a character reference,
so any browser shows names correctly whatever its default encoding. README.TXT is
UTF-8 with CRLF line ends (Windows Notepad opens it as well as any other editor).
Nothing here names a file after a DICOM value.
"""

from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass, field
from datetime import UTC, datetime

from iepnode import __version__, dicomtext


@dataclass(frozen=True)
class SeriesEntry:
    """A series as the pages show it; ``preview`` is the JPEG's path in the package."""

    number: str
    modality: str
    description: str
    instances: int
    preview: str


@dataclass(frozen=True)
class StudyEntry:
    """A study as the pages show it; ``page`` is its HTML page's path in the package."""

    date: str
    time: str
    description: str
    accession: str
    modalities: str
    uid: str
    page: str
    series: list[SeriesEntry] = field(default_factory=list)


@dataclass(frozen=True)
class ReportEntry:
    """A PDF report extracted from an Encapsulated PDF instance."""

    path: str
    title: str
    study_uid: str


@dataclass(frozen=True)
class LeftOutEntry:
    """A stored instance the package leaves out because its file cannot be read.

    ``reason`` is in plain words, without paths (e.g. "the stored file is cut short
    (truncated)").
    """

    series_number: str
    modality: str
    instance_number: str
    sop_uid: str
    reason: str

    def describe(self) -> str:
        """One line naming the instance and why it is missing."""
        series = f"Series {self.series_number or '-'}"
        if self.modality:
            series += f" ({self.modality})"
        return (f"{series}, image {self.instance_number or '-'}, SOP Instance UID "
                f"{self.sop_uid}: {self.reason}")


@dataclass(frozen=True)
class AttachedEntry:
    """A file added to the transaction by its recipient or staff (``ATTACHED/``)."""

    path: str
    #: The title the person who added it gave (never the hospital's).
    title: str
    #: ``the recipient jane@example.org`` or ``staff Dr A. Smith``.
    added_by: str
    added_at: float


@dataclass(frozen=True)
class Contents:
    """Everything the README and the pages say about a package."""

    institution: str
    reference: str
    created_at: float
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    contact: tuple[str, ...]
    studies: list[StudyEntry]
    reports: list[ReportEntry]
    instances: int
    dicom_bytes: int
    left_out: list[LeftOutEntry] = field(default_factory=list)
    #: Files added to the transaction, not part of the hospital's record.
    attached: list[AttachedEntry] = field(default_factory=list)


# -- formatting ------------------------------------------------------------------------


def person_name(value: str) -> str:
    """``Doe^Jane^Ann`` -> ``DOE, Jane Ann`` (first non-empty component group)."""
    return dicomtext.person_name(value, empty="(no name)")


def dicom_date(value: str) -> str:
    """``20240105`` -> ``5 Jan 2024``; other text as given, ``-`` when empty."""
    return dicomtext.dicom_date(value, empty="-")


def _epoch_date(value: float) -> str:
    moment = datetime.fromtimestamp(value, UTC)
    return f"{moment.day} {moment:%b %Y}"


def _sex(value: str) -> str:
    return {"F": "Female", "M": "Male", "O": "Other"}.get((value or "").strip().upper(),
                                                         value or "-")


def size_text(size: int) -> str:
    """``123456789`` -> ``123.5 MB``; below a megabyte in kB (``4 kB``)."""
    if size < 1_000_000:
        return f"{max(1, round(size / 1000))} kB"
    return f"{size / 1e6:,.1f} MB"


# -- README.TXT ------------------------------------------------------------------------


def readme_txt(c: Contents) -> bytes:
    """Render ``README.TXT`` (UTF-8, CRLF)."""
    sender = c.institution or "the sending hospital"
    ref = f" (reference {c.reference})" if c.reference else ""
    series = sum(len(s.series) for s in c.studies)
    lines = [
        f"IMAGES FROM {sender.upper()}",
        "=" * min(78, len(f"IMAGES FROM {sender}")),
        "",
        *textwrap.wrap(
            f"This package holds medical images sent by {sender}{ref}, prepared "
            f"{_epoch_date(c.created_at)}. It is laid out like a DICOM CD/DVD (IHE "
            "Portable Data for Imaging, DICOM PS3.10/PS3.12 General Purpose media).", 78),
        "",
        f"Patient:        {person_name(c.patient_name)}",
        f"Date of birth:  {dicom_date(c.birth_date)}",
        f"Patient ID:     {c.patient_id or '-'}",
        "",
        f"{len(c.studies)} {'study' if len(c.studies) == 1 else 'studies'}, {series} series, "
        f"{c.instances} DICOM files ({size_text(c.dicom_bytes)}):",
    ]
    for study in c.studies:
        text = " ".join(x for x in (dicom_date(study.date), study.modalities,
                                    study.description) if x)
        if study.accession:
            text += f" (accession {study.accession})"
        lines.append(f"  - {text}")
    if c.left_out:
        count = len(c.left_out)
        lines += [
            "",
            "LEFT OUT",
            *textwrap.wrap(
                f"{count} DICOM {'file' if count == 1 else 'files'} of "
                f"{'this study' if len(c.studies) == 1 else 'these studies'} could not be "
                "read at the sending hospital and "
                f"{'is' if count == 1 else 'are'} not in this package. Ask the sender "
                "for them, quoting the reference and the UIDs below:", 78),
            *[line for entry in c.left_out
              for line in textwrap.wrap(entry.describe(), 76, initial_indent="  - ",
                                        subsequent_indent="    ", break_long_words=False,
                                        break_on_hyphens=False)],
        ]
    lines += [
        "",
        "WHAT IS INSIDE",
        "  DICOMDIR     the index of the DICOM files; DICOM viewers and PACS read it",
        "  DICOM/       the images and reports as DICOM files, exactly as received",
        "  INDEX.HTM    an overview for a web browser: patient, studies, series, previews",
        "  IHE_PDI/     the pages and JPEG previews that INDEX.HTM shows",
    ]
    if c.reports:
        lines.append("  REPORTS/     reports as PDF files")
    if c.attached:
        lines.append("  ATTACHED/    files added to this transaction by people who received it")
        lines.append("               or by staff: NOT part of the hospital's record (below)")
    lines += [
        "  README.TXT   this file",
        "",
        *_attached_txt(c, sender),
        "HOW TO OPEN IT",
        "  1. Unzip the whole package first, keeping its folders.",
        "  2. For a quick look, open INDEX.HTM in a web browser.",
        "  3. To see the images in full, open the unzipped folder (or its DICOMDIR)",
        "     with any DICOM viewer.",
        "  4. To add the images to a PACS or another hospital system, use its",
        "     \"import media\" or \"import DICOMDIR\" function on the unzipped folder.",
        "  5. To make a CD or DVD, copy the unzipped contents to the root of the disc",
        "     (DICOMDIR at the top).",
        "",
        "NOT FOR DIAGNOSTIC USE",
        *textwrap.wrap(
            "The previews in INDEX.HTM and IHE_PDI/ are reduced JPEG copies, for "
            "orientation only: not for diagnostic use. The DICOM files are the originals "
            f"as received by the image exchange of {sender}. This package contains no "
            "programs.", 78),
        "",
        "QUESTIONS",
        *[f"  {line}" for line in (c.contact or (sender,))],
        "",
        f"Made by iepnode {__version__}, an open-source DICOM image exchange node.",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


def _attached_txt(c: Contents, sender: str) -> list[str]:
    """The README.TXT section on ``ATTACHED/`` (empty without attachments)."""
    if not c.attached:
        return []
    lines = [
        "ADDED TO THIS TRANSACTION - NOT PART OF THE HOSPITAL'S RECORD",
        *textwrap.wrap(
            f"The files in ATTACHED/ were added to this transaction after {sender} sent "
            "it, by the people named below. They are not part of the hospital's record "
            "of the patient, not in the DICOMDIR, and their titles are those the person "
            "who added them gave.", 78),
    ]
    for entry in c.attached:
        lines += textwrap.wrap(
            f"{entry.path} \u201c{entry.title or 'Untitled'}\u201d: added by "
            f"{entry.added_by} on {_epoch_date(entry.added_at)}, not part of the "
            "hospital's record", 78, initial_indent="  ", subsequent_indent="      ")
    return [*lines, ""]


# -- pages -------------------------------------------------------------------------------

_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:60em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #bbb;padding:.3em .6em;text-align:left;vertical-align:top}"
    ".warn{background:#fff4d6;border:1px solid #e0b84c;padding:.6em}"
    "img{max-width:256px;height:auto;border:1px solid #888}"
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str) -> bytes:
    text = (
        '<?xml version="1.0" encoding="US-ASCII"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
        '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        "<head>\n"
        '<meta http-equiv="Content-Type" content="text/html; charset=US-ASCII" />\n'
        f"<title>{_e(title)}</title>\n"
        f'<style type="text/css">{_STYLE}</style>\n'
        "</head>\n<body>\n"
        f"{body}"
        "</body>\n</html>\n"
    )
    return text.encode("ascii", "xmlcharrefreplace")


def _patient_table(c: Contents) -> str:
    return (
        "<table>\n"
        f"<tr><th>Patient</th><td>{_e(person_name(c.patient_name))}</td></tr>\n"
        f"<tr><th>Date of birth</th><td>{_e(dicom_date(c.birth_date))}</td></tr>\n"
        f"<tr><th>Sex</th><td>{_e(_sex(c.sex))}</td></tr>\n"
        f"<tr><th>Patient ID</th><td>{_e(c.patient_id or '-')}</td></tr>\n"
        f"<tr><th>Sent by</th><td>{_e(c.institution or '-')}</td></tr>\n"
        + (f"<tr><th>Reference</th><td>{_e(c.reference)}</td></tr>\n" if c.reference else "")
        + "</table>\n"
    )


_WARNING = ('<p class="warn">The pictures on these pages are reduced previews: '
            "<strong>not for diagnostic use</strong>. Open the DICOM files (the DICOMDIR) "
            "in a DICOM viewer to see the images in full.</p>\n")


def index_htm(c: Contents) -> bytes:
    """Render ``INDEX.HTM``: the patient, the studies (linking their pages), the reports."""
    rows = "".join(
        f'<tr><td>{_e(dicom_date(s.date))}</td><td>{_e(s.modalities or "-")}</td>'
        f'<td><a href="{_e(s.page)}">{_e(s.description or "Study")}</a></td>'
        f"<td>{_e(s.accession or '-')}</td><td>{len(s.series)}</td>"
        f"<td>{sum(x.instances for x in s.series)}</td></tr>\n"
        for s in c.studies
    )
    reports = ""
    if c.reports:
        reports = "<h2>Reports</h2>\n<ul>\n" + "".join(
            f'<li><a href="{_e(r.path)}">{_e(r.title or "Report")}</a> (PDF)</li>\n'
            for r in c.reports) + "</ul>\n"
    left_out = ""
    if c.left_out:
        left_out = (f'<p class="warn">{len(c.left_out)} DICOM '
                    f"{'file' if len(c.left_out) == 1 else 'files'} could not be read at the "
                    "sending hospital and "
                    f"{'is' if len(c.left_out) == 1 else 'are'} not in this package: see "
                    '<a href="README.TXT">README.TXT</a>.</p>\n')
    attached = ""
    if c.attached:
        attached = (
            "<h2>Added to this transaction: not part of the hospital&#8217;s record</h2>\n"
            '<p class="warn">These files were added by the people named, not by '
            f"{_e(c.institution or 'the hospital')}. Their titles are theirs.</p>\n<ul>\n"
            + "".join(
                f'<li><a href="{_e(a.path)}">{_e(a.title or "Untitled")}</a>: added by '
                f"{_e(a.added_by)} on {_e(_epoch_date(a.added_at))}</li>\n"
                for a in c.attached) + "</ul>\n")
    body = (
        f"<h1>Images from {_e(c.institution or 'the hospital')}</h1>\n"
        + _WARNING + left_out + _patient_table(c)
        + "<h2>Studies</h2>\n<table>\n<tr><th>Date</th><th>Modality</th><th>Description</th>"
        "<th>Accession</th><th>Series</th><th>Files</th></tr>\n" + rows + "</table>\n"
        + reports + attached
        + '<p>How to use this package: <a href="README.TXT">README.TXT</a>. The DICOM files '
        "are indexed by the DICOMDIR at the top of this folder.</p>\n"
    )
    return _page(f"Images from {c.institution or 'the hospital'}", body)


def study_htm(c: Contents, study: StudyEntry) -> bytes:
    """Render a study's page in ``IHE_PDI/``: its series with one preview each."""
    rows = "".join(
        f'<tr><td>{_e(s.number or "-")}</td><td>{_e(s.modality or "-")}</td>'
        f'<td>{_e(s.description or "-")}</td><td>{s.instances}</td>'
        f'<td><img src="{_e(s.preview.rsplit("/", 1)[-1])}" '
        f'alt="Preview of series {_e(s.number)}" /></td></tr>\n'
        for s in study.series
    )
    reports = [r for r in c.reports if r.study_uid == study.uid]
    report_list = ""
    if reports:
        report_list = "<h2>Reports</h2>\n<ul>\n" + "".join(
            f'<li><a href="../{_e(r.path)}">{_e(r.title or "Report")}</a> (PDF)</li>\n'
            for r in reports) + "</ul>\n"
    body = (
        '<p><a href="../INDEX.HTM">All studies</a></p>\n'
        f"<h1>{_e(study.description or 'Study')} &#8212; {_e(dicom_date(study.date))}</h1>\n"
        + _WARNING + _patient_table(c)
        + "<table>\n"
        f"<tr><th>Modality</th><td>{_e(study.modalities or '-')}</td></tr>\n"
        f"<tr><th>Accession</th><td>{_e(study.accession or '-')}</td></tr>\n"
        f"<tr><th>Study Instance UID</th><td>{_e(study.uid)}</td></tr>\n"
        "</table>\n"
        "<h2>Series</h2>\n<table>\n<tr><th>Number</th><th>Modality</th><th>Description</th>"
        "<th>Files</th><th>Preview</th></tr>\n" + rows + "</table>\n" + report_list
    )
    return _page(study.description or "Study", body)
