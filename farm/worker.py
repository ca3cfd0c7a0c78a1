"""A device worker's life beyond one task: draining and a SIGTERM that loses nothing.

Celery's own warm shutdown finishes the task in hand. SIGTERM here first stops taking new slices from the
shared and model queues (the same as `farm drain`), keeps serving its device queue and its own queue
(``cuda0@host``: the later stages of the slices it generated) until both are empty and no candidate generated
on this device is still being checked (on its QC worker too), and only then sets Celery's warm-shutdown flag.
A second SIGTERM, or FARM_DRAIN_TIMEOUT, stops at once (what is left stays queued in Redis for the next worker
of this device).

The main process also keeps the worker's model queues (farm.placement) in step: it consumes the queue of
each generator its pool child holds (the child announces them when it loads or evicts one), steals a
waiting model queue when it has nothing to do, and writes what it consumes to the ``workers`` table, which
is what dispatch routes by. A drained worker consumes only its device queue and its own.

With FARM_QC=worker it also keeps the device's QC worker running beside it (``QcCompanion``), and every
device worker removes handed-off images nobody will read (``HandoffSweeper``).

This module holds the parts; the Celery bootsteps in farm.lifecycle decide which of them a worker runs (a
device worker all of them, the control worker only a reap at start, a QC worker none) and start them.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from celery.signals import beat_embedded_init, worker_init
from celery.worker.control import control_command, ok
from sqlalchemy import func, select, update

from farm import logs
from farm.artifacts import Handoff, candidate_of
from farm.broker import (
    MODELS_COMMAND,
    SLICES_QUEUE,
    TAKE_SLICES_COMMAND,
    device_workers,
    queue_length,
    queue_lengths,
    take_slices,
)
from farm.config import Settings, load_settings
from farm.db import Candidate, Worker, get_engine, session_scope, utcnow
from farm.lifeline import die_with_parent
from farm.placement import (
    BEAT_S,
    STEAL_HOLD_S,
    TICK_S,
    ActiveModelQueues,
    generator_queues,
    is_model_queue,
)
from farm.states import CANDIDATE_IN_FLIGHT, CandidateStatus

log = logging.getLogger(__name__)

#: How often a device worker looks for handed-off images nobody will read (``sweep_handoff``).
HANDOFF_SWEEP_S = 300.0
#: Seconds between a drain's reports of what it still waits for.
DRAIN_REPORT_S = 5.0


def in_flight(database_url: str, queue: str) -> int:
    """Candidates generated on this device whose later stages have not finished."""
    with session_scope(database_url, read_only=True) as s:
        return s.scalar(
            select(func.count())
            .select_from(Candidate)
            .where(Candidate.device == queue, Candidate.status.in_(CANDIDATE_IN_FLIGHT))
        )


def set_taking_slices(
    app: Any, queue: str, take: bool, *, database_url: str | None = None, wait: float = 5.0
) -> list[str]:
    """Start or stop the device's workers taking new slices (`farm undrain` / `farm drain`): the shared
    queue and the model queues; in-flight slices finish either way. Returns the workers told.

    With ``database_url``, also waits (up to ``wait`` seconds) until the workers' rows show the change, so
    a batch dispatched right after a drain is not routed to a model queue of a drained worker.
    """
    names = device_workers(app, queue)
    if names:
        take_slices(app, names, take)
        if database_url:
            _wait_for_rows(database_url, names, take, wait)
    return names


def _wait_for_rows(database_url: str, names: list[str], take: bool, wait: float) -> None:
    def shown(queues: list[str] | None) -> bool:
        if queues is None:
            return False
        if take:
            return SLICES_QUEUE in queues
        return SLICES_QUEUE not in queues and not any(is_model_queue(q) for q in queues)

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with session_scope(database_url) as s:
            rows = s.execute(select(Worker.queues).where(Worker.name.in_(names))).scalars().all()
        if len(rows) == len(names) and all(shown(q) for q in rows):
            return
        time.sleep(0.1)
    log.warning("the workers table does not show %s %s yet", names, "undrained" if take else "drained")


def drain(app: Any, queue: str, *, database_url: str | None = None) -> list[str]:
    return set_taking_slices(app, queue, take=False, database_url=database_url)


def undrain(app: Any, queue: str, *, database_url: str | None = None) -> list[str]:
    return set_taking_slices(app, queue, take=True, database_url=database_url)


class ModelQueues:
    """The model queues a device worker's main process consumes, kept in step by a thread of its own.

    Wanted: the queues of the generators the pool child holds (``held``: announced by the child with the
    ``farm_models`` control command, and re-read from its heartbeat's ``loaded`` when the worker is idle, in
    case an announcement was lost), plus a queue stolen for STEAL_HOLD_S when the worker had nothing to do
    while that queue had messages. A drained worker (not consuming ``slices``) wants none. Consumers change
    only in the event loop (``consumer.call_soon``); the thread reads Redis and SQL without blocking the
    loop, and writes what the worker consumes to its ``workers`` row (with a heartbeat) when that changes and
    every BEAT_S seconds.
    """

    RESYNC_S = 10.0

    def __init__(self, consumer: Any, device_queue: str, database_url: str) -> None:
        self.consumer = consumer
        self.app = consumer.app
        self.hostname = consumer.hostname
        self.device_queue = device_queue
        self.database_url = database_url
        self.active = ActiveModelQueues(database_url)
        self._lock = threading.Lock()
        self.held: set[str] = {q for q in self.consuming() if is_model_queue(q)}
        self.stolen: dict[str, float] = {}
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._conn: Any = None
        self._written: list[str] | None = None
        self._written_at = 0.0
        self._resynced_at = 0.0

    # -- state
    def consuming(self) -> set[str]:
        return set(self.app.amqp.queues.consume_from or ())

    def wanted(self, consuming: set[str]) -> set[str]:
        if SLICES_QUEUE not in consuming:
            return set()
        now = time.monotonic()
        with self._lock:
            self.stolen = {q: until for q, until in self.stolen.items() if until > now}
            return self.held | set(self.stolen)

    def set_held(self, queues: list[str] | set[str]) -> None:
        with self._lock:
            self.held = {q for q in queues if is_model_queue(q)}
            self.stolen = {q: t for q, t in self.stolen.items() if q not in self.held}
        self.consumer.call_soon(self.apply)

    # -- in the event loop
    def apply(self) -> None:
        consuming = self.consuming()
        want = self.wanted(consuming)
        for q in sorted(want - consuming):
            self.consumer.add_task_queue(q)
        for q in sorted(consuming - want):
            if is_model_queue(q):
                self.consumer.cancel_task_queue(q)
        self._wake.set()

    def take_slices(self, take: bool) -> None:
        if take:
            self.consumer.add_task_queue(SLICES_QUEUE)
        else:
            self.consumer.cancel_task_queue(SLICES_QUEUE)
        self.apply()

    # -- the thread
    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="farm-model-queues").start()

    def stop(self) -> None:
        """At the worker's shutdown: the thread ends at its next wake (the consumer is gone)."""
        self._stopped.set()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(TICK_S)
            self._wake.clear()
            if self._stopped.is_set():
                self._close()
                return
            try:
                self.tick()
            except Exception as exc:  # the broker or the database is away; try again next tick
                log.debug("model queues of %s: %s", self.hostname, exc)
                self._close()

    def tick(self) -> None:
        from celery.worker import state

        consuming = self.consuming()
        if SLICES_QUEUE in consuming and not (state.active_requests or state.reserved_requests):
            self._resync()
            self._steal(consuming)
        mine = {q for q in consuming if is_model_queue(q)}
        if self.wanted(consuming) != mine:
            self.consumer.call_soon(self.apply)
        self._write(consuming)

    def _resync(self) -> None:
        """Idle: take what the child holds from its last heartbeat (committed with its last task)."""
        from celery.worker import state

        now = time.monotonic()
        if now - self._resynced_at < self.RESYNC_S:
            return
        self._resynced_at = now
        with session_scope(self.database_url, read_only=True) as s:
            row = s.execute(
                select(Worker.pid, Worker.loaded).where(Worker.name == self.hostname)
            ).one_or_none()
        if row is None or row.loaded is None or row.pid not in self._child_pids():
            return
        if state.active_requests or state.reserved_requests:
            return  # a task started meanwhile: the row may be outdated already
        held = generator_queues(row.loaded)
        with self._lock:
            if held == self.held:
                return
        log.info("%s holds %s (from its heartbeat)", self.hostname, sorted(held))
        self.set_held(held)

    def _child_pids(self) -> set[int]:
        try:
            return {p.pid for p in self.consumer.pool._pool._pool}
        except AttributeError:
            return set()

    def _steal(self, consuming: set[str]) -> None:
        """Nothing running and nothing waiting for this worker: take a model queue that has messages."""
        if any(self._lengths(consuming).values()):
            return
        others = self.active() - consuming
        if not others:
            return
        waiting = {q: n for q, n in self._lengths(others).items() if n}
        if not waiting:
            return
        queue = max(sorted(waiting), key=waiting.__getitem__)
        with self._lock:
            self.stolen[queue] = time.monotonic() + STEAL_HOLD_S
        log.info(
            "%s is idle while %s has %d slices waiting: takes from it", self.hostname, queue, waiting[queue]
        )
        self.consumer.call_soon(self.apply)

    def _lengths(self, queues: set[str]) -> dict[str, int]:
        """Messages waiting in each queue (all priority lists), in one round trip."""
        if self._conn is None:
            self._conn = self.app.connection_for_write()
        return queue_lengths(self._conn.default_channel.client, sorted(queues))

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # already broken: nothing to give back
                pass

    def _write(self, consuming: set[str]) -> None:
        queues = sorted(consuming)
        now = time.monotonic()
        if queues == self._written and now - self._written_at < BEAT_S:
            return
        with get_engine(self.database_url).begin() as conn:
            found = conn.execute(
                update(Worker)
                .where(Worker.name == self.hostname)
                .values(queues=queues, heartbeat_at=utcnow())
            ).rowcount
        if found:  # before the child's first heartbeat there is no row: try again next tick
            self._written, self._written_at = queues, now


#: The device worker's ModelQueues, in its main process (None elsewhere).
MODEL_QUEUES: ModelQueues | None = None


def follow_model_queues(consumer: Any, device_queue: str, database_url: str) -> ModelQueues:
    """Start keeping the device worker's model queues in step (farm.lifecycle, once its consumer exists),
    as the one the control commands and the drain act on."""
    global MODEL_QUEUES
    MODEL_QUEUES = ModelQueues(consumer, device_queue, database_url)
    MODEL_QUEUES.start()
    return MODEL_QUEUES


@control_command(name=MODELS_COMMAND, args=[("queues", list)], signature="<queue> [queue ...]")
def farm_models(state: Any, queues: list[str] | None = None, **_kwargs: Any) -> dict:
    """Consume the model queues of these generators (sent by the worker's own pool child)."""
    if MODEL_QUEUES is None:
        return {"error": "not a device worker"}
    MODEL_QUEUES.set_held(queues or [])
    return ok(f"model queues {sorted(queues or [])}")


@control_command(name=TAKE_SLICES_COMMAND, args=[("take", bool)], signature="<true|false>")
def farm_take_slices(state: Any, take: bool = True, **_kwargs: Any) -> dict:
    """Start (true) or stop (false) taking new slices: the shared queue and the model queues."""
    take = take not in (False, "false", "False", "0", 0)
    if MODEL_QUEUES is not None:
        state.consumer.call_soon(MODEL_QUEUES.take_slices, take)
    elif take:
        state.consumer.call_soon(state.consumer.add_task_queue, SLICES_QUEUE)
    else:
        state.consumer.call_soon(state.consumer.cancel_task_queue, SLICES_QUEUE)
    return ok("taking slices" if take else "drained")


def drain_then_stop(app: Any, hostname: str, queue: str, *, timeout: float, poll: float = 0.5) -> None:
    from celery.worker import state

    if MODEL_QUEUES is not None:
        MODEL_QUEUES.consumer.call_soon(MODEL_QUEUES.take_slices, False)
    else:
        take_slices(app, [hostname], False, fresh_connection=False)
    database_url = load_settings().database_url
    deadline = time.monotonic() + timeout
    quiet = 0
    next_report = 0.0
    while time.monotonic() < deadline:
        try:
            waiting = {
                "tasks in hand": len(state.active_requests) + len(state.reserved_requests),
                f"messages queued on {queue} and {hostname}": queue_length(app, queue)
                + queue_length(app, hostname),
                "candidates in flight": in_flight(database_url, queue),
            }
        except Exception as exc:  # broker or database gone: nothing left to wait for that can finish
            log.warning("drain of %s cannot see its work (%s); stopping", queue, exc)
            break
        if not any(waiting.values()):
            quiet += 1
            if quiet >= 2:
                break
        else:
            quiet = 0
            if time.monotonic() >= next_report:
                what = ", ".join(f"{n} {k}" for k, n in waiting.items() if n)
                log.info("drain of %s waits for %s", queue, what)
                next_report = time.monotonic() + DRAIN_REPORT_S
        time.sleep(poll)
    else:
        log.warning("drain of %s timed out after %ss; stopping with work still queued", queue, timeout)
    log.info("%s drained; warm shutdown", hostname)
    state.should_stop = 0


class SigtermDrain:
    """A device worker's SIGTERM: the first drains (``drain_then_stop``, in a thread, which then sets Celery's
    warm-shutdown flag); a second goes to the handler Celery installed, which stops at once.

    Installed after Celery's own handler (farm.lifecycle starts it with the consumer; Celery installs its
    handlers when the worker starts, before any step), since it hands the second signal on to that one.
    """

    def __init__(self, app: Any, hostname: str, queue: str, *, timeout: float) -> None:
        self.app = app
        self.hostname = hostname
        self.queue = queue
        self.timeout = timeout
        self.started = threading.Event()
        self._celery_handler: Any = None

    def install(self) -> None:
        from celery import platforms

        self._celery_handler = platforms.signals["SIGTERM"]
        signal.signal(signal.SIGTERM, self.on_term)

    def on_term(self, signum: int, frame: Any) -> None:
        if self.started.is_set():
            self._celery_handler(signum, frame)
            return
        self.started.set()
        log.info("SIGTERM: %s stops taking slices and finishes the ones in flight", self.hostname)
        threading.Thread(
            target=drain_then_stop,
            args=(self.app, self.hostname, self.queue),
            kwargs={"timeout": self.timeout},
            daemon=True,
            name="farm-drain",
        ).start()


#: Set by a device worker for the QC worker it starts: its own pid (not configuration).
QC_PARENT_ENV = "FARM_QC_PARENT"


class QcCompanion:
    """FARM_QC=worker: the device's QC worker, started, restarted and stopped by its generating worker.

    So one command per device stays the whole deployment (a systemd unit, a compose service, a Procfile line,
    a pod): `farm worker --device cuda0` runs `farm worker --device cuda0 --qc` beside it. A QC worker that
    exits is started again after RESTART_S (while it is away the device's slices wait in its queue). At exit,
    after the device worker's own drain (which waits for the device's in-flight slices, those being checked
    among them), the QC worker gets SIGTERM, Celery's warm shutdown. If the device worker is killed outright,
    the kernel sends its QC worker SIGTERM too (PR_SET_PDEATHSIG).
    """

    RESTART_S = 2.0

    def __init__(self, queue: str, *, stop_timeout: float) -> None:
        self.argv = [sys.executable, "-m", "farm", "worker", "--device", queue, "--qc"]
        self.stop_timeout = stop_timeout
        self.owner = os.getpid()
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> QcCompanion:
        self._spawn()
        threading.Thread(target=self._watch, daemon=True, name="farm-qc-companion").start()
        atexit.register(self.stop)
        return self

    def _spawn(self) -> None:
        with self._lock:
            if not self._stopping.is_set():
                env = {**os.environ, QC_PARENT_ENV: str(self.owner)}
                self.proc = subprocess.Popen(self.argv, env=env)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            assert self.proc is not None
            code = self.proc.wait()
            if self._stopping.wait(self.RESTART_S):
                return
            log.error("the QC worker (pid %s) exited with %s; starting it again", self.proc.pid, code)
            self._spawn()

    def stop(self) -> None:
        if os.getpid() != self.owner:  # a forked pool child runs atexit too: the QC worker is not its own
            return
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("the QC worker (pid %s) did not stop in %ss; killing it", proc.pid, self.stop_timeout)
            proc.kill()
            proc.wait()


def sweep_handoff(settings: Settings) -> list[str]:
    """Remove handed-off images that no farm.moderate will read: those whose candidate moved past 'generated'
    (or was deleted) without its QC worker dropping them. That happens when a slice was finished elsewhere
    (the reaper re-sent it after its QC worker went away, or FARM_QC went back to inline) and its moderate
    task never ran here; in shared memory each such image holds RAM until the host restarts. Only files older
    than FARM_STALL_SECONDS are looked at, so an image handed off just before its row is written is never
    taken.
    """
    handoff = Handoff(settings.handoff_dir)
    old = {name: candidate_of(name) for name in handoff.older_than(settings.stall_seconds)}
    waiting: set[str] = set()
    ids = sorted(set(old.values()))
    for chunk in (ids[i : i + 500] for i in range(0, len(ids), 500)):
        with session_scope(settings.database_url, read_only=True) as s:
            waiting.update(
                s.scalars(
                    select(Candidate.id).where(
                        Candidate.id.in_(chunk), Candidate.status == CandidateStatus.GENERATED
                    )
                )
            )
    # Listed again: a file rewritten meanwhile (the candidate generated again) is young now, and stays.
    unread = {name for name, cid in old.items() if cid not in waiting}
    gone = [name for name in handoff.older_than(settings.stall_seconds) if name in unread]
    for name in gone:
        handoff.discard(name)
    if gone:
        logs.event(
            log,
            "removed handed-off images no QC task will read",
            folder=str(handoff.folder.root),
            count=len(gone),
        )
    return gone


class HandoffSweeper:
    """``sweep_handoff`` every HANDOFF_SWEEP_S seconds, in a thread of a device worker's main process.

    Every device worker runs it, whatever FARM_QC says now: images handed off under FARM_QC=worker outlive a
    switch back to inline, and only a device worker of their host can remove them.
    """

    def __init__(self, settings: Settings, seconds: float = HANDOFF_SWEEP_S) -> None:
        self.settings = settings
        self.seconds = seconds
        self._stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="farm-handoff-sweep").start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                sweep_handoff(self.settings)
            except Exception as exc:  # the database is away: try again next time
                log.warning("handoff sweep of %s: %s", self.settings.handoff_dir, exc)
            self._stopped.wait(self.seconds)


def term_with_parent() -> None:
    """In a QC worker, first thing: SIGTERM when the device worker that started it dies (Linux).

    Set by the QC worker itself, not between fork and exec (``preexec_fn``), which is unsafe in the device
    worker's threaded main process (a restart forks from a thread). A device worker already gone by the time
    this runs is seen from the parent pid, and the QC worker exits."""
    if not die_with_parent(signal.SIGTERM):
        return
    parent = os.environ.get(QC_PARENT_ENV)
    if parent and os.getppid() != int(parent):
        raise SystemExit(f"the device worker (pid {parent}) that started this QC worker is gone")


#: The worker's main process, as seen before its pool forks (so a child can tell it is already orphaned).
_MAIN_PID: int | None = None


@worker_init.connect
def _remember_main(**_kwargs: Any) -> None:
    global _MAIN_PID
    _MAIN_PID = os.getpid()


@beat_embedded_init.connect
def _beat_dies_with_worker(**_kwargs: Any) -> None:
    """The control worker's embedded beat ends with it: one beat at any time, never an orphan scheduling
    the reaper beside the next control worker's. (Celery ties its prefork pool children to the main process
    this way itself, but not the embedded beat.)"""
    die_with_parent(signal.SIGKILL, _MAIN_PID)
