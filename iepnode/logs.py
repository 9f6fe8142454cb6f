"""Logging an admin can read: one line per association and per failure."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
import time
from collections import Counter

from config import Settings

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


def setup_logging(settings: Settings, *, process_name: str | None = None,
                  to_stderr: bool = True) -> None:
    """Send log lines to ``DATA_DIR/logs/iepnode.log`` (and stderr).

    Parameters
    ----------
    settings : Settings
        For the log folder and level.
    process_name : str, optional
        Shown in each line (e.g. ``scp-0``) to tell worker processes apart.
    to_stderr : bool, optional
        Also write to standard error (default ``True``).
    """
    if process_name:
        import multiprocessing

        multiprocessing.current_process().name = process_name
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(FORMAT)
    file_handler = logging.handlers.WatchedFileHandler(settings.log_file)
    file_handler.setFormatter(formatter)
    root.addHandler(file_handler)
    if to_stderr:
        stream_handler = logging.StreamHandler(sys.stderr)
        stream_handler.setFormatter(formatter)
        root.addHandler(stream_handler)
    root.setLevel(settings.log_level.upper())
    # pynetdicom logs every PDU at INFO/DEBUG; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("peewee").setLevel(logging.WARNING)


#: Seconds between two lines of one kind from a :class:`RateLimitedLog`.
LOG_EVERY = 10.0


class RateLimitedLog:
    """Log each kind of warning at most every :data:`LOG_EVERY` seconds, counting the rest.

    For events a hostile peer can cause at will (refused or timed-out connections):
    a flood of them must not be able to fill the log. The kind is the message's
    format string; the next line of a kind says how many were left out.

    Parameters
    ----------
    logger : logging.Logger
        Where the lines go.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, message: str, *args: object) -> None:
        """Log ``message % args`` now, or count it if a line of its kind went out recently."""
        with self._lock:
            now = time.monotonic()
            if now - self._last.get(message, -LOG_EVERY) < LOG_EVERY:
                self._suppressed[message] += 1
                return
            self._last[message] = now
            suppressed = self._suppressed.pop(message, 0)
        if suppressed:
            message += f" (and {suppressed} more such since the last line)"
        self.logger.warning(message, *args)
