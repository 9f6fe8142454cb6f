"""Headless Chromium for the end-to-end tests: Debian's binary, driven by Playwright.

Launch it with ``playwright.chromium.launch(executable_path=str(CHROMIUM),
args=CHROMIUM_ARGS)``; Playwright's own browser downloads are never used.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage

from tests.support.peers import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def console_problem(message: ConsoleMessage, problems: list[str]) -> None:
    """Keep a page's console errors and warnings in ``problems`` (a ``page.on`` handler)."""
    if message.type in ("error", "warning"):
        problems.append(f"console {message.type}: {message.text}")


def require_chromium() -> None:
    """Fail the test (not skip it) when Debian's Chromium is not installed."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: run scripts/install-system-deps (Debian chromium)")


def portal_environment(monkeypatch: pytest.MonkeyPatch, smtp_port: int, institution: str) -> int:
    """Set ``IEPNODE_*`` so that the next ``iepnode serve`` mails through ``smtp_port``.

    Parameters
    ----------
    monkeypatch : pytest.MonkeyPatch
        The test's monkeypatch (the variables are unset after the test).
    smtp_port : int
        A plain-text SMTP server on 127.0.0.1.
    institution : str
        The institution named in mails and pages.

    Returns
    -------
    int
        A free HTTP port; the public URL is ``http://127.0.0.1:PORT``.
    """
    http_port = free_port()
    for name, value in {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp_port),
                        "SMTP_TLS": "none", "PUBLIC_URL": f"http://127.0.0.1:{http_port}",
                        "INSTITUTION": institution, "FSYNC": "false"}.items():
        monkeypatch.setenv(f"IEPNODE_{name}", value)
    return http_port
