"""Times as people read them: in the hospital's time zone, with its abbreviation.

The node stores Unix times; pages and messages show them in ``[portal] timezone``
(``Settings.zone``). Wherever a time of day is shown the zone's abbreviation
follows it (``23 Nov 2026 14:05 GMT``; ``BST`` in summer), so a reader in another
zone is never misled. Dates alone carry no abbreviation.
"""

from __future__ import annotations

from datetime import datetime, tzinfo


def local(epoch: float, zone: tzinfo) -> datetime:
    """The moment ``epoch`` (Unix seconds) as an aware datetime in ``zone``."""
    return datetime.fromtimestamp(epoch, zone)


def day(epoch: float, zone: tzinfo) -> str:
    """``23 Nov 2026``."""
    moment = local(epoch, zone)
    return f"{moment.day} {moment:%b %Y}"


def long_day(epoch: float, zone: tzinfo) -> str:
    """``23 November 2026`` (for emails)."""
    moment = local(epoch, zone)
    return f"{moment.day} {moment:%B %Y}"


def day_time(epoch: float, zone: tzinfo) -> str:
    """``23 Nov 2026 14:05 GMT``."""
    moment = local(epoch, zone)
    return f"{moment.day} {moment:%b %Y %H:%M %Z}"


def iso_day(epoch: float, zone: tzinfo) -> str:
    """``2026-11-23`` (staff pages)."""
    return f"{local(epoch, zone):%Y-%m-%d}"


def iso_minute(epoch: float, zone: tzinfo) -> str:
    """``2026-11-23 14:05 GMT`` (staff pages)."""
    return f"{local(epoch, zone):%Y-%m-%d %H:%M %Z}"


def iso_second(epoch: float, zone: tzinfo) -> str:
    """``2026-11-23 14:05:09 GMT`` (audit events)."""
    return f"{local(epoch, zone):%Y-%m-%d %H:%M:%S %Z}"
