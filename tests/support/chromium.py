"""Headless Chromium for the end-to-end tests: Debian's binary, driven by Playwright.

Launch it with ``playwright.chromium.launch(executable_path=str(CHROMIUM),
args=CHROMIUM_ARGS)``; Playwright's own browser downloads are never used.
"""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import ConsoleMessage

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def console_problem(message: ConsoleMessage, problems: list[str]) -> None:
    """Keep a page's console errors and warnings in ``problems`` (a ``page.on`` handler)."""
    if message.type in ("error", "warning"):
        problems.append(f"console {message.type}: {message.text}")
