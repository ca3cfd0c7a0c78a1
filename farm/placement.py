"""Where a slice goes first: the queue of its model when a live worker holds that model, else ``slices``.

Every generator a worker can hold has a queue of its own, ``slices.m.<slug>``, named from the key the
worker's model registry keeps it under (reference, dtype, memory savers). A device worker consumes its
device queue, ``slices`` and the model queues of the generators it holds now (farm.worker keeps that set
in step with its pool child); drained, it consumes only its device queue. So:

- dispatch sends a batch's slices to its model's queue when some live worker consumes that queue (a worker
  that has the model loaded takes them and nothing is reloaded), otherwise to ``slices`` (any worker takes
  them and loads the model on demand);
- a worker with nothing to do steals: it starts consuming a model queue that has messages waiting (and
  loads that model, evicting its least recently used one if its budget says so), so no device idles while
  work waits for a busy one;
- the reaper counts messages in model queues as waiting, as it counts ``slices``.

Nothing here imports torch or Flask: the control worker and the web app use it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from farm.broker import SLICES_QUEUE, local_queue
from farm.db import Batch, Worker, session_scope, utcnow
from farm.states import BATCH_LIVE

MODEL_QUEUE_PREFIX = f"{SLICES_QUEUE}.m."
#: Seconds between two looks of a device worker's main process at its queues (model queues to follow,
#: work to steal).
TICK_S = 1.0
#: Seconds between two writes of what a worker consumes (and its heartbeat) by its main process.
BEAT_S = 5.0
#: A worker row whose heartbeat is older than this is not trusted to hold anything.
FRESH_S = 30.0
#: Seconds a worker keeps consuming a stolen model queue before it holds that model (then it keeps it).
STEAL_HOLD_S = 10.0


def generator_key(ref: str, *, dtype: str = "fp32", memory: dict | None = None) -> str:
    """The key a worker's model registry keeps a generator under (farm.tasks.runtime.Models.generator)."""
    memory = memory or {}
    flags = f"{int(bool(memory.get('attention_slicing')))}{int(bool(memory.get('cpu_offload')))}"
    return f"generator:{ref}:{dtype}:{flags}"


def model_queue(key: str) -> str:
    """The queue of the generator kept under ``key``: readable, stable, and safe for any reference.

    ``generator:tiny:fp32:00`` gives ``slices.m.tiny-fp32-00-<8 hex digits>``: the key in letters, digits and
    dashes (cut to 40), then a hash of the whole key, so references that differ only in odd characters
    (paths, hub ids) never share a queue. No ``:``, which kombu uses for priority keys.
    """
    readable = re.sub(r"[^a-z0-9]+", "-", key.removeprefix("generator:").lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{MODEL_QUEUE_PREFIX}{readable}-{digest}" if readable else f"{MODEL_QUEUE_PREFIX}{digest}"


def is_model_queue(name: str) -> bool:
    return name.startswith(MODEL_QUEUE_PREFIX)


def generator_queues(keys: Iterable[str]) -> set[str]:
    """The model queues of the generators among registry keys (other models have no queue)."""
    return {model_queue(k) for k in keys if k.startswith("generator:")}


def batch_model_queue(model: str, batch_settings: dict[str, Any] | None) -> str:
    """The model queue of a batch's generator, from its ``model`` and its stored manifest settings."""
    cfg = batch_settings or {}
    return model_queue(generator_key(model, dtype=cfg.get("dtype") or "fp32", memory=cfg.get("memory")))


def preload_queue(preload_generator: str, dtype: str = "fp32") -> str:
    """The model queue of the generator every device worker preloads (it consumes it from the start)."""
    return model_queue(generator_key(preload_generator, dtype=dtype))


def device_worker_queues(
    queue: str, preload_generator: str, dtype: str = "fp32", *, host: str | None = None
) -> list[str]:
    """What a device worker consumes from its start, however it is started (`farm worker --device` or a
    plain `celery worker -Q`), in the order it serves them: its own queue first (the rest of the slices it
    generated: ``local_queue``), then its device queue, the shared slices queue and the model queue of the
    generator it preloads; the other model queues follow its loads."""
    return [local_queue(queue, host), queue, SLICES_QUEUE, preload_queue(preload_generator, dtype)]


def choose_queue(
    model_q: str, workers: Iterable[tuple[list[str] | None, datetime | None]], *, now: datetime
) -> str:
    """``model_q`` when a fresh worker consumes it, else the shared ``slices`` queue.

    ``workers`` holds (queues consumed, heartbeat) of each worker row.
    """
    cutoff = now - timedelta(seconds=FRESH_S)
    for queues, heartbeat in workers:
        if heartbeat is not None and heartbeat >= cutoff and model_q in (queues or ()):
            return model_q
    return SLICES_QUEUE


def route(database_url: str, model: str, batch_settings: dict[str, Any] | None) -> str:
    """The queue the first task of a slice of this batch goes to (see the module's doc)."""
    model_q = batch_model_queue(model, batch_settings)
    now = utcnow()
    with session_scope(database_url, read_only=True) as s:
        rows = s.execute(
            select(Worker.queues, Worker.heartbeat_at).where(
                Worker.heartbeat_at >= now - timedelta(seconds=FRESH_S)
            )
        ).all()
    return choose_queue(model_q, rows, now=now)


def route_batch(database_url: str, batch_id: str) -> str:
    with session_scope(database_url, read_only=True) as s:
        row = s.execute(select(Batch.model, Batch.settings).where(Batch.id == batch_id)).one_or_none()
    if row is None:
        return SLICES_QUEUE
    return route(database_url, row.model, row.settings)


class ActiveModelQueues:
    """The model queues of the batches not yet closed, read from SQL (a batch's queue is read once)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._by_batch: dict[str, str] = {}

    def __call__(self) -> set[str]:
        with session_scope(self.database_url, read_only=True) as s:
            ids = s.scalars(select(Batch.id).where(Batch.status.in_(BATCH_LIVE))).all()
            new = [i for i in ids if i not in self._by_batch]
            if new:
                for bid, model, cfg in s.execute(
                    select(Batch.id, Batch.model, Batch.settings).where(Batch.id.in_(new))
                ):
                    self._by_batch[bid] = batch_model_queue(model, cfg)
        self._by_batch = {i: self._by_batch[i] for i in ids if i in self._by_batch}
        return set(self._by_batch.values())


def active_model_queues(database_url: str) -> set[str]:
    return ActiveModelQueues(database_url)()
