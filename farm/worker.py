"""A device worker's life beyond one task: draining and a SIGTERM that loses nothing.

Celery's own warm shutdown finishes the task in hand, but a slice is a chain: its later stages wait in this
device's own queue and would be stranded until the worker came back. So SIGTERM here first stops taking new
slices from the shared queue (the same as `farm drain`), keeps serving the device queue until no slice of
this device is in flight, and only then sets Celery's warm-shutdown flag. A second SIGTERM, or
FARM_DRAIN_TIMEOUT, stops at once (what is left stays queued in Redis for the next worker of this device).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from celery.signals import worker_ready
from sqlalchemy import func, select

from farm.config import CONTROL_QUEUE, SLICES_QUEUE, load_settings
from farm.db import Candidate, session_scope

log = logging.getLogger(__name__)

IN_FLIGHT = ("generated", "moderated", "validated")


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue with the farm's priority steps (sep ':')."""
    return [queue, *(f"{queue}:{p}" for p in (3, 6, 9))]


def queue_length(app: Any, queue: str) -> int:
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        return sum(client.llen(k) for k in queue_keys(queue))


def in_flight(database_url: str, queue: str) -> int:
    """Candidates generated on this device whose later stages have not finished."""
    with session_scope(database_url) as s:
        return s.scalar(
            select(func.count())
            .select_from(Candidate)
            .where(Candidate.device == queue, Candidate.status.in_(IN_FLIGHT))
        )


def device_workers(app: Any, queue: str, timeout: float = 2.0) -> list[str]:
    """Names of the live workers serving device ``queue`` (they are named ``<queue>@<host>``)."""
    # A fresh connection each time: a pooled one may be stale after a broker restart.
    with app.connection_for_write() as conn:
        replies = app.control.ping(timeout=timeout, connection=conn) or []
    names = [name for reply in replies for name in reply]
    return sorted(n for n in names if n.split("@", 1)[0] == queue)


def set_taking_slices(app: Any, queue: str, take: bool) -> list[str]:
    """Start or stop the device's workers taking new slices (`farm undrain` / `farm drain`); in-flight slices
    finish either way. Returns the workers told."""
    names = device_workers(app, queue)
    if names:
        with app.connection_for_write() as conn:
            control = app.control.add_consumer if take else app.control.cancel_consumer
            control(SLICES_QUEUE, destination=names, reply=True, timeout=5, connection=conn)
    return names


def drain(app: Any, queue: str) -> list[str]:
    return set_taking_slices(app, queue, take=False)


def undrain(app: Any, queue: str) -> list[str]:
    return set_taking_slices(app, queue, take=True)


def drain_then_stop(app: Any, hostname: str, queue: str, *, timeout: float, poll: float = 0.5) -> None:
    from celery.worker import state

    app.control.cancel_consumer(SLICES_QUEUE, destination=[hostname], reply=True, timeout=5)
    database_url = load_settings().database_url
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        busy = state.active_requests or state.reserved_requests
        if not busy and queue_length(app, queue) == 0 and in_flight(database_url, queue) == 0:
            quiet += 1
            if quiet >= 2:
                break
        else:
            quiet = 0
        time.sleep(poll)
    else:
        log.warning("drain of %s timed out after %ss; stopping with work still queued", queue, timeout)
    log.info("%s drained; warm shutdown", hostname)
    state.should_stop = 0


@worker_ready.connect
def _install_graceful_term(sender: Any = None, **_kwargs: Any) -> None:
    if sender is None:
        return
    queue = os.environ.get("FARM_PINNED_QUEUE")
    if not queue:
        if CONTROL_QUEUE in sender.app.amqp.queues.consume_from:
            # Resume what a crash left half-done, rather than waiting for the first beat.
            sender.app.signature("farm.reap", queue=CONTROL_QUEUE).apply_async()
        return
    from celery import platforms

    app, hostname = sender.app, sender.hostname
    timeout = float(load_settings().drain_timeout)
    celery_handler = platforms.signals["SIGTERM"]
    started = threading.Event()

    def _on_term(signum: int, frame: Any) -> None:
        if started.is_set():
            celery_handler(signum, frame)
            return
        started.set()
        log.info("SIGTERM: %s stops taking slices and finishes the ones in flight", hostname)
        threading.Thread(
            target=drain_then_stop,
            args=(app, hostname, queue),
            kwargs={"timeout": timeout},
            daemon=True,
            name="farm-drain",
        ).start()

    signal.signal(signal.SIGTERM, _on_term)
