"""The broker as the farm sees it: its queue names, the Redis lists behind a queue, queue lengths, which
workers answer a ping, and the remote control commands the farm sends to its workers.

One home, so the web's metrics, the reaper, a device worker and the CLI read queues alike, and so reading a
queue length never imports what a worker runs: the control commands' handlers live in farm.worker, which only
worker processes import (Celery registers a handler where its module is imported). Model queue names are
placement's (farm.placement).

Nothing here imports the rest of the farm: farm.config checks FARM_DEVICES against these names.
"""

from __future__ import annotations

import socket
from typing import Any

#: The control worker's queue: dispatch, rank and reap.
CONTROL_QUEUE = "control"
#: The shared queue every device worker takes slices from (work stealing).
SLICES_QUEUE = "slices"
#: A device's QC worker (FARM_QC=worker) has its own queue, also its name: ``qc-cuda0@host``.
QC_PREFIX = "qc-"

#: Celery priorities 0-9 are kept by kombu's Redis transport in one list per step, the first without a suffix.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = ":"

#: Remote control commands a device worker's main process answers (handlers in farm.worker).
MODELS_COMMAND = "farm_models"
TAKE_SLICES_COMMAND = "farm_take_slices"


def local_queue(queue: str, host: str | None = None) -> str:
    """The queue of device ``queue``'s worker on ``host`` alone, also that worker's name: ``cuda0@gpu-box-1``.
    The rest of a slice's chain goes there when its device checks the slice itself (FARM_QC=inline, or its
    QC worker away): bound to the host, like ``qc_queue``, because the images are in that worker's memory."""
    return f"{queue}@{host or socket.gethostname()}"


def qc_queue(queue: str, host: str | None = None) -> str:
    """The queue of device ``queue``'s QC worker on ``host`` (FARM_QC=worker), which is also that worker's
    name: ``qc-cuda0@gpu-box-1``. Bound to the host, because the images it checks are handed off in this
    host's memory; not ``<queue>@<host>``, so nothing takes it for the device's own worker."""
    return f"{QC_PREFIX}{queue}@{host or socket.gethostname()}"


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue with the farm's priority steps (farm.celery_app)."""
    return [queue, *(f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS[1:])]


def queue_lengths(client: Any, queues: list[str]) -> dict[str, int]:
    """Messages waiting in each queue (all priority lists), in one round trip on a Redis ``client``."""
    pipe = client.pipeline(transaction=False)
    for q in queues:
        for key in queue_keys(q):
            pipe.llen(key)
    counts = pipe.execute()
    step = len(PRIORITY_STEPS)
    return {q: sum(counts[i * step : (i + 1) * step]) for i, q in enumerate(queues)}


def queue_length(app: Any, queue: str) -> int:
    """Messages waiting in ``queue`` on ``app``'s broker."""
    with app.connection_for_write() as conn:
        return queue_lengths(conn.default_channel.client, [queue])[queue]


def worker_names(app: Any, timeout: float = 2.0) -> list[str]:
    """Names of the workers that answer a ping (``<queue>@<host>``, ``qc-<device>@<host>``, ...)."""
    # A fresh connection each time: a pooled one may be stale after a broker restart.
    with app.connection_for_write() as conn:
        replies = app.control.ping(timeout=timeout, connection=conn) or []
    return [name for reply in replies for name in reply]


def device_workers(app: Any, queue: str, timeout: float = 2.0) -> list[str]:
    """Names of the live workers serving device ``queue`` (they are named ``<queue>@<host>``)."""
    return sorted(n for n in worker_names(app, timeout) if n.split("@", 1)[0] == queue)


def live_queues(app: Any) -> set[str]:
    """Device queues some live worker consumes: a device worker named ``<queue>@<host>`` consumes ``<queue>``
    and its own queue of the same name as itself (``local_queue``); a QC worker is named after its queue,
    ``qc-<device>@<host>``."""
    live = set()
    for name in worker_names(app, timeout=2.0):
        live.add(name)
        if not name.startswith(QC_PREFIX):
            live.add(name.split("@", 1)[0])
    return live


def answers(app: Any, name: str, timeout: float) -> bool:
    """Whether the worker ``name`` answers a ping within ``timeout`` seconds."""
    return bool(app.control.ping(destination=[name], timeout=timeout))


def take_slices(app: Any, names: list[str], take: bool, *, fresh_connection: bool = True) -> None:
    """Tell these device workers to start (True) or stop (False) taking new slices, and wait for their
    replies. ``fresh_connection`` as for pings; a worker telling itself uses the app's pool."""
    message: dict[str, Any] = {"arguments": {"take": take}, "destination": names, "reply": True, "timeout": 5}
    if not fresh_connection:
        app.control.broadcast(TAKE_SLICES_COMMAND, **message)
        return
    with app.connection_for_write() as conn:
        app.control.broadcast(TAKE_SLICES_COMMAND, connection=conn, **message)


def announce_models(app: Any, name: str, queues: list[str]) -> None:
    """Tell worker ``name``'s main process (from its pool child) which model queues to consume; no reply."""
    app.control.broadcast(MODELS_COMMAND, arguments={"queues": queues}, destination=[name], reply=False)
