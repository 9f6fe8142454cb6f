"""Logging an admin can read: one line per association and per failure."""

from __future__ import annotations

import logging
import logging.handlers
import sys

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
    file_handler = logging.handlers.WatchedFileHandler(settings.log_dir / "iepnode.log")
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
