"""What the process table says (Linux /proc): whether a process runs, its parent, children, command line, and
which processes belong to a FARM_HOME. One home for these reads: `farm up`'s stop, the Redis keeper, leases
(is a holder gone?), `farm bench` (memory per process), `farm chaos` and the tests all ask the same things.
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first, then the parent pid); empty when
    there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def alive(pid: int) -> bool:
    """``pid`` runs: it exists and is not a zombie (a dead process its parent has not reaped yet)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def parent_of(pid: int) -> int:
    """The parent pid of ``pid``; 0 when there is no such process."""
    fields = _stat(pid)
    return int(fields[1]) if len(fields) > 1 else 0


def children(pid: int) -> list[int]:
    """The direct children of ``pid``, whichever of its threads started them."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:  # gone meanwhile
        pass
    return sorted(found)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: children, their children, and so on."""
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def cmdline(pid: int) -> str:
    """The command line of ``pid`` with spaces between its arguments; empty when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def leftovers(home: Path | str) -> list[int]:
    """Live processes (zombies aside) whose environment names this FARM_HOME: what a stack must not leave
    behind when it is gone. The caller's own process is not counted."""
    mine = f"FARM_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mine not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)
