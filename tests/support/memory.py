"""The memory of a running node's HTTP serving process, read from /proc (Linux).

The serving process is found by what it does, not by how ``iepnode serve`` is laid
out: among the node's process and its descendants, the owners of a socket that
*listens* on the HTTP port (``/proc/net/tcp*`` state ``0A``, matched by inode with
``/proc/PID/fd``). That is the supervisor today and a worker once HTTP moves to
worker processes; a process that only holds the port reserved (bound, not
listening) is not one.

:class:`PeakGrowth` measures what one piece of work costs: it resets each serving
process's peak resident size (``echo 5 > /proc/PID/clear_refs``, Linux 4.0+; when
that is not allowed, the peak so far is the baseline) and reads ``VmRSS`` before,
``VmHWM`` (the peak resident set) after.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_LISTEN = "0A"


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(_children(current))
    return found


def serving_pids(root_pid: int, port: int) -> list[int]:
    """The processes (``root_pid`` or below) with a socket listening on ``port``."""
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    owners = []
    for pid in descendants(root_pid):
        try:
            links = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:
            continue
        if links & sockets:
            owners.append(pid)
    return owners


def status_kb(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` value in kB (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PeakGrowth:
    """``with PeakGrowth(pids) as growth: ...`` then ``growth.mib``: the largest rise of
    a process's peak resident set over its resident set before the block (MiB)."""

    pids: list[int]
    before: dict[int, int] = field(default_factory=dict)
    peaks: dict[int, int] = field(default_factory=dict)
    exact: bool = True

    def __enter__(self) -> PeakGrowth:
        for pid in self.pids:
            reset = _reset_peak(pid)
            self.exact = self.exact and reset
            # Without a reset the baseline is the peak so far (work already done, e.g.
            # warm-up, may hide some of the growth: the test measures less, never more).
            self.before[pid] = status_kb(pid, "VmRSS" if reset else "VmHWM")
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in self.pids:
            self.peaks[pid] = status_kb(pid, "VmHWM")

    @property
    def mib(self) -> float:
        return max((self.peaks[p] - self.before[p]) / 1024 for p in self.pids)

    def __str__(self) -> str:
        rows = ", ".join(f"pid {p}: {self.before[p] / 1024:.0f} -> {self.peaks[p] / 1024:.0f} MiB"
                         for p in self.pids)
        return f"+{self.mib:.1f} MiB peak ({rows}{'' if self.exact else '; peak not reset'})"
