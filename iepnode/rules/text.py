"""What typed or received text may contain: control characters, email addresses, phones.

One rule for control characters everywhere: C0 controls (``\\x00``-``\\x1f``, line
breaks and tabs included), DEL and the C1 controls (``\\x80``-``\\x9f``) are never part
of a one-line value (a name, a header, a setting); multi-line text (a postal address)
may hold line feeds and nothing else of them.
"""

from __future__ import annotations

import re

_CONTROL_CHARS = r"\x00-\x1f\x7f-\x9f"

#: Any C0 or C1 control character, or DEL.
CONTROL = re.compile(f"[{_CONTROL_CHARS}]")
#: The same, but a line feed: for text that may have several lines.
CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
#: What a form field's or file's name may never hold: control characters, and lone
#: surrogates (bytes that were not UTF-8, as Python decodes them).
UNSAFE_NAME = re.compile(f"[{_CONTROL_CHARS}\ud800-\udfff]")

#: A deliberately simple email address: one ``@``; no white space, quotes, brackets,
#: separators or control characters (so one header value is one recipient); at most
#: 64 characters before the ``@``; a domain with a dot and a 2+ character last part.
_ADDRESS_CHAR = rf"[^@\s{_CONTROL_CHARS}<>()\[\],;:\"\\]"
EMAIL = re.compile(rf"{_ADDRESS_CHAR}{{1,64}}@{_ADDRESS_CHAR}{{1,190}}\.{_ADDRESS_CHAR}{{2,}}")

#: A phone number once spaces and separators are removed: optional ``+``, 7-15 digits.
PHONE = re.compile(r"\+?[0-9]{7,15}")


def has_control(value: str, *, multiline: bool = False) -> bool:
    """Whether ``value`` holds a control character (a line feed is allowed if ``multiline``)."""
    return (CONTROL_BUT_NEWLINE if multiline else CONTROL).search(value) is not None


def without_control(value: str) -> str:
    """``value`` with every control character (:data:`CONTROL`) removed."""
    return CONTROL.sub("", value)


def is_email(value: str) -> bool:
    """Whether ``value`` (already stripped) is one email address (:data:`EMAIL`)."""
    return EMAIL.fullmatch(value) is not None


def is_phone(value: str) -> bool:
    """Whether ``value`` (separators removed) looks like an E.164 number (:data:`PHONE`)."""
    return PHONE.fullmatch(value) is not None
