"""The lease a worker process holds on the candidates of the slice it runs, renewed from that process.

A slice's task takes the lease when it starts (``records.begin_stages``): every candidate it works on gets
the next generation of its lease, held by this process until FARM_LEASE_SECONDS from now. A thread of this
process (not the worker's main process, which lives on when its pool child dies, and the other way round)
renews it every FARM_HEARTBEAT_SECONDS while the task runs, including during a forward pass of minutes.
A process that stops renewing (killed, paused, cut off from the database) loses the lease when it runs
out: the reaper moves the candidates to a new generation and re-sends them. Every stage write is guarded
by the generation the task took (``records._GUARDED``), so a holder that comes back writes nothing; it
learns so from its next renewal, or from a write that touched no row, and drops those candidates.

Before a side effect that no guarded write can undo (an image written to the store or handed off), the task
asks ``keep``: that answers from the last renewal while it is recent enough that no one can have taken the
lease over (less than FARM_LEASE_SECONDS - FARM_HEARTBEAT_SECONDS ago: the margin allows for clocks that
differ by less than a heartbeat), and otherwise renews first.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from farm import logs, records
from farm.procs import alive

if TYPE_CHECKING:
    from farm.tasks.runtime import Runtime

log = logging.getLogger(__name__)


def owner_name(worker: str, pid: int | None = None) -> str:
    """How a lease names its holder: the worker (``cuda0@host``), the pid namespace its pid is a number in
    (``pid_namespace``) and the pid of the process that runs it."""
    return f"{worker} ns {pid_namespace()} pid {os.getpid() if pid is None else pid}"


@functools.cache
def pid_namespace() -> str:
    """This process's pid namespace, as ``<namespace inode>.<boot id>``: containers on one host share its
    hostname when they share its network (hostNetwork), yet each numbers its processes on its own, and a
    namespace inode is unique only until the host boots again. ``?`` where /proc does not say."""
    try:
        inode = os.stat("/proc/self/ns/pid").st_ino
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]  # with the host's name and the inode, enough to tell boots apart
    except OSError:
        return "?"
    return f"{inode}.{boot}"


def gone(owner: str) -> bool:
    """Whether the holder ``owner`` is a process of this host and pid namespace that no longer exists (a
    pool child killed while its slice ran: the requeued message then takes the slice at once). A holder on
    another host or in another pid namespace (another container), or one that cannot be told apart (a pid
    reused, an owner named without its namespace), counts as alive: its lease runs out instead. A zombie is
    gone: Celery may requeue a killed child's message before its parent has reaped it."""
    head, sep, pid = owner.rpartition(" pid ")
    worker, nsep, namespace = head.rpartition(" ns ")
    if not sep or not nsep or not pid.isdigit() or worker.rpartition("@")[2] != socket.gethostname():
        return False
    if namespace == "?" or namespace != pid_namespace():
        return False
    if int(pid) == os.getpid():
        return True  # this process: tasks run one after another here, so the run that took it is over
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return not alive(int(pid))


class Lease:
    """The lease of one task run on its candidates: generation ``token``, the ids still held."""

    def __init__(
        self, rt: Runtime, candidate_ids: Iterable[str], token: int, *, taken: float | None = None
    ) -> None:
        """``taken``: ``time.monotonic()`` read before the transaction that took the lease began. Its expiry
        counts from a clock read inside that transaction, which may have waited on row locks (PostgreSQL)
        longer than a heartbeat before it did; stamping the lease when this object is built, after the
        commit, would let ``keep`` trust a lease older than it assumes."""
        self.url = rt.settings.database_url
        self.seconds = float(rt.settings.lease_seconds)
        self.heartbeat = float(rt.settings.heartbeat_seconds)
        self.beat = rt.heartbeat.alive
        self.token = token
        self.held = set(candidate_ids)
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._renewed = time.monotonic() if taken is None else taken

    def due(self) -> bool:
        return bool(self.held) and time.monotonic() - self._renewed >= self.heartbeat

    def renew(self) -> set[str]:
        """Renew now; returns the ids lost since the last renewal (taken over by a newer generation)."""
        with self._lock:
            ids = sorted(self.held)
            if not ids:
                return set()
            t0 = time.monotonic()
            still = records.renew_lease(self.url, ids, self.token, seconds=self.seconds, also=self.beat())
            self._renewed = t0
            lost = set(ids) - still
            self.held -= lost
            self.lost |= lost
        if lost:
            logs.event(
                log,
                "lease lost: a newer holder has these candidates; dropping them",
                level=logging.WARNING,
                candidates=sorted(lost),
                generation=self.token,
            )
        return lost

    def keep(self, cands: list[Any]) -> list[Any]:
        """The candidates of ``cands`` this run still holds, renewing first unless the last renewal is
        recent enough that nobody can have taken the lease over since."""
        if time.monotonic() - self._renewed >= self.seconds - self.heartbeat:
            self.renew()
        return [c for c in cands if c.id in self.held]

    def drop(self, candidate_ids: Iterable[str]) -> None:
        """Stop renewing these (written to a status this task does not work on, or written by another)."""
        with self._lock:
            self.held -= set(candidate_ids)

    def release(self) -> None:
        """Give up what is still held (the task stopped on an error), so its retry takes it at once."""
        with self._lock:
            ids, self.held = sorted(self.held), set()
        if ids:
            records.release_lease(self.url, ids, self.token)


def keep_renewing(rt: Runtime) -> None:
    """Start, once per process, the thread that renews whatever lease this process's task holds."""
    if rt.renewer is not None and rt.renewer.is_alive():
        return
    rt.renewer = threading.Thread(target=_renew_forever, args=(rt,), daemon=True, name="farm-lease")
    rt.renewer.start()


def _renew_forever(rt: Runtime) -> None:
    tick = max(0.2, rt.settings.heartbeat_seconds / 5)
    while True:
        time.sleep(tick)
        lease = rt.lease
        if lease is None or not lease.due():
            continue
        try:
            lease.renew()
        except Exception as exc:  # the database is away: the next tick tries again, the lease may run out
            log.warning("could not renew the lease of %d candidates: %s", len(lease.held), exc)
