"""DICOM values as people read them (person names and dates) and as staff type them."""

from __future__ import annotations

from datetime import date

from iepnode.rules.text import without_control


def person_name(value: str, empty: str = "—") -> str:
    """Format a DICOM PN value: ``Doe^Jane^Ann`` -> ``DOE, Jane Ann``.

    Only the first component group with content is used (alphabetic, else
    ideographic or phonetic); ``empty`` when there is none.
    """
    groups = [g for g in (value or "").split("=") if g.strip("^ ")]
    if not groups:
        return empty
    parts = [p.strip() for p in groups[0].split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    first = " ".join(p for p in (prefix, given, middle) if p)
    name = ", ".join(p for p in (family.upper(), first) if p)
    return f"{name} {suffix}".strip() if suffix else name


def dicom_date(value: str, empty: str = "—") -> str:
    """Format a DICOM DA value: ``20240105`` -> ``5 Jan 2024``; other text as given."""
    text = (value or "").strip()
    if len(text) == 8 and text.isdigit():
        try:
            day = date(int(text[:4]), int(text[4:6]), int(text[6:]))
        except ValueError:
            return text
        return f"{day.day} {day:%b %Y}"
    return text or empty




def typed_text(value: str, limit: int = 64) -> str:
    """What staff typed into a search or form field, safe to match or store.

    Strips, drops control characters and backslashes (the DICOM value separator), and
    cuts to ``limit`` characters.
    """
    return without_control(value).replace("\\", "").strip()[:limit]
