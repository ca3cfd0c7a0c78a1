"""`farm chaos`: a seeded soak of a whole farm under random faults, then proof that nothing was lost.

Why: each recovery path has a test of its own, but a farm left running meets faults together and at the worst
moments (a worker killed while Redis restarts, a paused worker coming back after its slice was re-sent). The
soak starts a stack of its own (two CPU-backed devices, FARM_QC=worker on one of them, the control worker),
submits a stream of batches (mixed sizes, some with top-up rounds, some cancelled, failed candidates retried),
and for a while injects faults at seeded random intervals: SIGKILL and SIGSTOP/SIGCONT of device workers, pool
children, QC workers and the control worker, a Redis restart, ``pg_terminate_backend`` of the farm's
connections (PostgreSQL), and a restart of the whole stack. Then it lets every batch settle and audits from
SQL, the store and the process table: every candidate exactly once with a final status, files and rows one to
one, every item ranked, no batch stuck, no process left. The same seed gives the same faults at the same
offsets; what they hit depends on timing, so a failure prints the seed and what was injected.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select

from farm.config import Settings, load_settings
from farm.db import Batch, Candidate, Item, session_scope, utcnow
from farm.procs import children, cmdline, descendants, leftovers
from farm.stack import Proc, Stack
from farm.states import (
    BATCH_CLOSED,
    BATCH_OPEN,
    BATCH_STOPPED,
    CANDIDATE_FINAL,
    BatchStatus,
    CandidateStatus,
    ItemStatus,
)

#: Settings of the soak's own farm: the timeouts short enough that recovery happens within its settling time.
CHAOS_ENV = {
    "FARM_DEVICES": "cuda0=cpu,cuda1=cpu",
    "FARM_SLICE_SIZE": "2",
    "FARM_TASK_TIME_LIMIT": "60",
    "FARM_VISIBILITY_TIMEOUT": "90",
    "FARM_STALL_SECONDS": "75",
    "FARM_REAPER_INTERVAL": "5",
    "FARM_MAX_RESENDS": "10",
    "FARM_DRAIN_TIMEOUT": "30",
}
#: The device whose slices are checked by a QC worker beside it.
QC_DEVICE = "cuda0"
#: How many of each kind a deck of faults holds: process faults are the common case, whole-stack restarts
#: the rare one. Faults are dealt from shuffled decks, so even a short soak meets every kind.
DECK = {
    "kill_device_worker": 2,
    "kill_pool_child": 2,
    "kill_qc_worker": 1,
    "pause_worker": 2,
    "kill_control": 1,
    "restart_redis": 1,
    "terminate_db_connections": 1,
    "restart_farm": 1,
}
KINDS = tuple(DECK)


@dataclass
class Fault:
    kind: str
    offset: float
    target: str
    at: datetime = field(default_factory=utcnow)
    recovered_s: float | None = None


@dataclass
class Audit:
    """What the soak found. ``problems`` is empty when every promise held."""

    batches: int = 0
    candidates: int = 0
    statuses: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    unranked: list[str] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    processes_left: list[int] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        found = []
        names = ("lost", "doubled", "stuck", "unranked", "orphan_files", "missing_files", "processes_left")
        for name in names:
            values = getattr(self, name)
            if values:
                found.append(f"{name.replace('_', ' ')}: {len(values)} ({', '.join(map(str, values[:5]))})")
        return found


@dataclass
class Report:
    seed: int
    minutes: float
    faults: list[Fault]
    audit: Audit
    settled_s: float | None

    @property
    def ok(self) -> bool:
        return not self.audit.problems and self.settled_s is not None

    def table(self) -> str:
        """The one table the soak prints."""
        kinds = Counter(f.kind for f in self.faults)
        recovered = [f.recovered_s for f in self.faults if f.recovered_s is not None]
        a = self.audit
        statuses = ", ".join(f"{s} {n}" for s, n in sorted(a.statuses.items()))
        progress = (
            f"p50 {statistics.median(recovered):.1f} s, max {max(recovered):.1f} s, {len(recovered)} measured"
            if recovered
            else "not measured"
        )
        settled = f"{self.settled_s:.0f} s after the faults" if self.settled_s is not None else "NO"
        rows = [("faults injected", str(len(self.faults)))]
        rows += [(f"  {kind}", str(kinds[kind])) for kind in KINDS if kinds[kind]]
        rows += [
            ("batches", str(a.batches)),
            ("candidates", f"{a.candidates} ({statuses})"),
            ("lost", str(len(a.lost))),
            ("doubled", str(len(a.doubled))),
            ("stuck", str(len(a.stuck))),
            ("unranked items", str(len(a.unranked))),
            ("orphans", f"{len(a.orphan_files)} files, {len(a.missing_files)} rows naming a missing file"),
            ("processes left", str(len(a.processes_left))),
            ("fault -> next progress", progress),
            ("settled", settled),
            ("seed", str(self.seed)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


class Chaos:
    """One soak: its own FARM_HOME, stack, load and faults; :meth:`run` returns the report."""

    def __init__(
        self,
        home: Path,
        *,
        seed: int,
        minutes: float,
        settle_minutes: float,
        database_url: str | None = None,
        gap_s: tuple[float, float] = (4.0, 12.0),
        say: Callable[[str], None] = print,
    ) -> None:
        self.env = {**os.environ, **CHAOS_ENV, "FARM_HOME": str(home)}
        for name in ("FARM_BROKER_URL", "FARM_DATABASE_URL", "FARM_QC"):
            self.env.pop(name, None)
        if database_url:
            self.env["FARM_DATABASE_URL"] = database_url
        self.settings: Settings = load_settings(self.env)
        self.home = home
        self.seed, self.minutes, self.settle_minutes = seed, minutes, settle_minutes
        self.rng = random.Random(seed)
        self.load_rng = random.Random(seed + 1)
        self.gap_s = gap_s
        self.say = say
        self.stack = Stack(self.settings, env=self.env)
        self.faults: list[Fault] = []
        self.deck: list[str] = []
        self.batches: list[str] = []
        self.paused: list[tuple[float, list[int]]] = []
        self.next_submit = 0.0
        self.postgres = self.settings.database_url.startswith("postgresql")

    # -- the stack
    def start(self) -> None:
        self.stack.prepare()
        self.stack.start_worker(QC_DEVICE, {"FARM_QC": "worker"})
        for queue in self.settings.devices:
            if queue != QC_DEVICE:
                self.stack.start_worker(queue)
        self.stack.start_control()

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        logs = [self.stack.log_dir / f"{p.name}.log" for p in self.stack.procs]
        while time.monotonic() < deadline:
            if all(p.exists() and " ready." in p.read_text(errors="replace") for p in logs):
                return
            self.stack.supervise()
            time.sleep(1)
        raise RuntimeError(f"the soak's workers did not come up in {timeout}s (logs in {self.stack.log_dir})")

    def _proc(self, name: str) -> Proc | None:
        return next((p for p in self.stack.procs if p.name == name and p.popen.poll() is None), None)

    # -- load
    def feed(self, now: float) -> None:
        """Keep about two batches open; cancel some and retry the failed candidates of others."""
        from farm import actions, dispatch

        if now < self.next_submit:
            return
        self.next_submit = now + self.load_rng.uniform(3, 10)
        try:
            open_batches = self._open_batches()
            if len(open_batches) < 2:
                self.batches.append(dispatch.submit(self._manifest(), settings=self.settings).batch_id)
            roll = self.load_rng.random()
            if open_batches and roll < 0.04:  # about one batch in four or five is cancelled
                dispatch.cancel(self.load_rng.choice(open_batches), settings=self.settings)
            elif roll < 0.12:
                done = self._batches_with_failed()
                if done:
                    actions.retry_failed(self.load_rng.choice(done), settings=self.settings)
        except Exception as exc:  # the broker or database is down right now (a fault): next time
            self.say(f"  load: {type(exc).__name__}: {str(exc)[:120]}")

    def _manifest(self) -> str:
        r = self.load_rng
        n = len(self.batches)
        items, candidates = r.randint(2, 5), r.randint(2, 4)
        defaults = f"defaults: {{candidates: {candidates}, steps: 2, size: 64x64}}"
        lines = [f"name: chaos-{n}", "model: tiny", defaults]
        if r.random() < 0.3:  # top-up rounds: ask for more accepted candidates than one round may give
            lines.append(f"selection: {{min_accepted: {candidates}, max_topup_rounds: 1}}")
        lines.append("items:")
        lines += [f'  - "chaos {n} prompt {i}"' for i in range(items)]
        return "\n".join(lines) + "\n"

    def _open_batches(self) -> list[str]:
        with session_scope(self.settings.database_url, read_only=True) as s:
            return list(s.scalars(select(Batch.id).where(Batch.status.in_(BATCH_OPEN))))

    def _batches_with_failed(self) -> list[str]:
        with session_scope(self.settings.database_url, read_only=True) as s:
            return list(
                s.scalars(
                    select(Batch.id)
                    .join(Candidate, Candidate.batch_id == Batch.id)
                    .where(Batch.status == BatchStatus.DONE, Candidate.status == CandidateStatus.FAILED)
                    .distinct()
                )
            )

    # -- faults
    def inject(self, offset: float) -> Fault | None:
        if not self.deck:
            kinds = [k for k in KINDS if k != "terminate_db_connections" or self.postgres]
            self.deck = [k for k in kinds for _ in range(DECK[k])]
            self.rng.shuffle(self.deck)
        kind = self.deck.pop()
        device = self.rng.choice(sorted(self.settings.devices))
        target = getattr(self, f"_{kind}")(device)
        if target is None:
            return None
        fault = Fault(kind, offset, target)
        self.faults.append(fault)
        self.say(f"{offset:7.1f}s  {kind} {target}")
        return fault

    def _kill_device_worker(self, device: str) -> str | None:
        proc = self._proc(f"worker-{device}")
        if proc is None:
            return None
        os.kill(proc.popen.pid, signal.SIGKILL)
        return f"{device} pid {proc.popen.pid}"

    def _kill_pool_child(self, device: str) -> str | None:
        child = self._worker_child(device, qc=False)
        if child is None:
            return None
        _signal(child, signal.SIGKILL)
        return f"{device} pool child pid {child}"

    def _kill_qc_worker(self, _device: str) -> str | None:
        qc = self._worker_child(QC_DEVICE, qc=True)
        if qc is None:
            return None
        _signal(qc, signal.SIGKILL)
        return f"qc-{QC_DEVICE} pid {qc}"

    def _worker_child(self, device: str, *, qc: bool) -> int | None:
        """The device worker's pool child, or (``qc``) the QC worker it started."""
        proc = self._proc(f"worker-{device}")
        found = [p for p in children(proc.popen.pid) if ("--qc" in cmdline(p)) == qc] if proc else []
        return found[0] if found else None

    def _pause_worker(self, device: str) -> str | None:
        proc = self._proc(f"worker-{device}")
        if proc is None:
            return None
        pids = [proc.popen.pid, *descendants(proc.popen.pid)]
        for pid in pids:
            _signal(pid, signal.SIGSTOP)
        seconds = self.rng.uniform(5, 90)  # sometimes past the lease, so its slice is re-sent meanwhile
        self.paused.append((time.monotonic() + seconds, pids))
        return f"{device} pids {pids} for {seconds:.0f}s"

    def _resume_paused(self, everything: bool = False) -> None:
        now = time.monotonic()
        for entry in list(self.paused):
            if everything or entry[0] <= now:
                for pid in entry[1]:
                    _signal(pid, signal.SIGCONT)
                self.paused.remove(entry)

    def _kill_control(self, _device: str) -> str | None:
        proc = self._proc("control")
        if proc is None:
            return None
        os.kill(proc.popen.pid, signal.SIGKILL)
        return f"control pid {proc.popen.pid}"

    def _restart_redis(self, _device: str) -> str | None:
        if self.stack.redis is None:
            return None
        self.stack.redis.stop()
        time.sleep(self.rng.uniform(0.5, 5))
        self.stack.redis.start()
        return "embedded redis"

    def _terminate_db_connections(self, _device: str) -> str | None:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.settings.database_url)
        try:
            with engine.connect() as conn:
                killed = conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar()
        finally:
            engine.dispose()
        return f"{killed} connections"

    def _restart_farm(self, _device: str) -> str | None:
        """The whole stack, as `farm up` is stopped and started again: a hurried stop, then a fresh start."""
        self._resume_paused(everything=True)
        hurry = threading.Event()
        hurry.set()
        self.stack.stop(self.stack.drain_allowance, hurry=hurry)
        self.start()
        return "whole stack"

    # -- progress
    def _last_progress(self) -> datetime | None:
        with session_scope(self.settings.database_url, read_only=True) as s:
            return s.scalar(select(func.max(Candidate.updated_at)))

    def _measure(self, now_wall: datetime | None) -> None:
        if now_wall is None:
            return
        for fault in self.faults:
            if fault.recovered_s is None and now_wall > fault.at:
                fault.recovered_s = (now_wall - fault.at).total_seconds()

    def _tick(self) -> None:
        self.stack.supervise()
        self._resume_paused()
        try:
            self._measure(self._last_progress())
        except Exception:  # the database is being faulted: measure next tick
            pass

    # -- the run
    def run(self) -> Report:
        self.say(f"farm chaos: seed {self.seed}, {self.minutes} min of faults, FARM_HOME={self.home}")
        self.start()
        self.wait_ready()
        begin = time.monotonic()
        end = begin + self.minutes * 60
        next_fault = begin + self.rng.uniform(*self.gap_s)
        try:
            while time.monotonic() < end:
                now = time.monotonic()
                self.feed(now)
                if now >= next_fault:
                    self.inject(now - begin)
                    next_fault = time.monotonic() + self.rng.uniform(*self.gap_s)
                self._tick()
                time.sleep(0.5)
            self._resume_paused(everything=True)
            self.say(f"faults over; settling (at most {self.settle_minutes} min)")
            settled_s = self._settle(time.monotonic() + self.settle_minutes * 60)
        finally:
            self._resume_paused(everything=True)
            self.stack.stop(self.stack.drain_allowance)
        audit = self.audit()
        return Report(self.seed, self.minutes, self.faults, audit, settled_s)

    def _settle(self, deadline: float) -> float | None:
        started = time.monotonic()
        while time.monotonic() < deadline:
            self._tick()
            try:
                if not self._unclosed():
                    return time.monotonic() - started
            except Exception:  # the database blinked
                pass
            time.sleep(1)
        return None

    def _unclosed(self) -> list[str]:
        with session_scope(self.settings.database_url, read_only=True) as s:
            return list(s.scalars(select(Batch.id).where(Batch.status.not_in(BATCH_CLOSED))))

    # -- the audit
    def audit(self) -> Audit:
        """Read SQL, the store and the process table; every finding names what it is about."""
        a = Audit()
        store = self.settings.artifacts_dir
        with session_scope(self.settings.database_url, read_only=True) as s:
            batches = s.scalars(select(Batch)).all()
            a.batches = len(batches)
            for batch in batches:
                if batch.status not in BATCH_CLOSED:
                    a.stuck.append(batch.id)
                rows = s.scalars(select(Candidate).where(Candidate.batch_id == batch.id)).all()
                a.candidates += len(rows)
                a.statuses.update(c.status for c in rows)
                if len(rows) != batch.candidates_total or len({c.id for c in rows}) != len(rows):
                    a.doubled.append(f"{batch.id}: {len(rows)} rows for {batch.candidates_total} candidates")
                a.lost += [c.id for c in rows if c.status not in CANDIDATE_FINAL]
                named = {Path(c.image_path).name for c in rows if c.image_path}
                folder = store / batch.id
                files = [p.name for p in folder.glob("*.png")] if folder.exists() else []
                a.doubled += [n for n, k in Counter(files).items() if k > 1]
                a.orphan_files += sorted(set(files) - named)
                a.missing_files += sorted(named - set(files))
                if folder.exists():
                    a.orphan_files += [p.name for p in folder.glob(".*.tmp")]
                items = s.scalars(select(Item).where(Item.batch_id == batch.id)).all()
                for item in items:
                    stopped = item.status == ItemStatus.CANCELLED and batch.status in BATCH_STOPPED
                    closed = item.status == ItemStatus.DONE or stopped
                    passed = [c for c in rows if c.item_id == item.id and c.status == CandidateStatus.PASSED]
                    if not closed or any(c.rank is None for c in passed):
                        a.unranked.append(item.id)
        a.processes_left = leftovers(self.home)
        return a


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
