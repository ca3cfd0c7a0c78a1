"""A slice's chain, one stage per task: farm.generate, farm.moderate, farm.validate, farm.score.

Dispatch sends each slice as ``chain(generate, moderate, validate, score)`` (farm.canvas.slice_chain),
generate to the queue placement picks (a model queue, ``slices`` or a device's), so whichever device is
free takes it. Once it has generated, generate sends the rest of its chain to the host that holds the
images (farm.canvas.send_checks_to):

- FARM_QC=inline: its own worker's queue (``cuda0@host``, farm.broker.local_queue), which that worker serves
  before its other queues, so a slice's checks run before the worker takes its next generate, on the images
  it keeps in memory;
- FARM_QC=worker: its device's QC worker (``qc-cuda0@host``), which stores the PNGs handed off in the host's
  shared memory and checks them while the device generates the next slice. While the QC worker is away (it
  does not answer pings), generate stores the PNGs itself and sends the checks to its own queue.

Each task runs its stage with its own lease, delivery count and timing (farm.tasks.stage.run_stages), so a
stage is seen, timed and retried as a Celery task, and a stage task redelivered alone does only its stage.
Every task returns its payload unchanged: the last one's return is the chord's header result.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from typing import Any

from celery import Task

from farm import records
from farm.broker import answers, queue_length
from farm.canvas import (
    GENERATE_TASK,
    MODERATE_TASK,
    SCORE_TASK,
    VALIDATE_TASK,
    send_checks_to,
    slice_chain,
)
from farm.celery_app import app
from farm.states import STAGE_INPUT
from farm.tasks.generate import GENERATE
from farm.tasks.moderate import MODERATE
from farm.tasks.score import SCORE
from farm.tasks.stage import STAGE_OPTIONS, run_stages
from farm.tasks.validate import VALIDATE

log = logging.getLogger(__name__)

#: A QC worker that has not answered a ping for this long is away; its device checks slices itself meanwhile.
QC_AWAY_S = 30.0
QC_PING_S = 5.0


@app.task(name=GENERATE_TASK, **STAGE_OPTIONS)
def generate(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: candidate ids and seeds are fixed in SQL, the stage generates only candidates still at
    'pending' and writes with a guard on it, and each PNG is written to a temporary name and renamed. A
    redelivery that finds the slice generated generates nothing and sends the rest of the chain on again,
    which its tasks' guards make harmless."""
    from farm.tasks.runtime import runtime

    rt = runtime()
    to_qc = rt.qc_queue is not None and wait_for_qc(
        rt.qc_queue, rt.settings.qc_ahead, limit=rt.settings.task_time_limit / 2
    )
    with nullcontext() if to_qc else rt.images.checks_here():
        run_stages(rt, self, payload, (GENERATE,))
    send_checks_to(self.request.chain, rt.qc_queue if to_qc else rt.local_queue)
    return payload


@app.task(name=MODERATE_TASK, **STAGE_OPTIONS)
def moderate(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: verdicts are written only onto candidates still at 'generated'. On a QC worker the
    handed-off images are dropped only once their PNGs are stored, so a redelivery still finds those its
    first delivery had not stored.

    Candidates whose images were lost (the stage sent them back to 'pending') are generated again: the task
    replaces itself, under the same task id, with generate and moderate for the slice on the queue placement
    picks, the rest of its chain after them. That follows the candidates' statuses in SQL, not what this
    delivery did, so a redelivery (its first delivery died after sending them back) still sends them; an
    image handed off again meanwhile (its candidate back at 'generated', for a task of its own) is kept.
    """
    from farm.placement import route_batch
    from farm.tasks.runtime import runtime

    rt = runtime()
    run_stages(rt, self, payload, (MODERATE,))
    now = records.statuses(rt.settings.database_url, payload["candidates"])
    waiting = (STAGE_INPUT["generate"], STAGE_INPUT["moderate"])
    rt.images.drop_handoff([c for c in payload["candidates"] if now.get(c) not in waiting])
    if STAGE_INPUT["generate"] not in now.values():
        return payload
    queue = route_batch(rt.settings.database_url, payload["batch_id"])
    again = slice_chain(
        app, payload, queue=queue, priority=_priority(self), stages=(GENERATE_TASK, MODERATE_TASK)
    )
    return self.replace(again)


@app.task(name=VALIDATE_TASK, **STAGE_OPTIONS)
def validate(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: alignment is recomputed from the image and written only onto candidates still at
    'moderated'."""
    from farm.tasks.runtime import runtime

    run_stages(runtime(), self, payload, (VALIDATE,))
    return payload


@app.task(name=SCORE_TASK, **STAGE_OPTIONS)
def score(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: scores are recomputed from the image and written only onto candidates still at
    'validated'. Its return is the chord's header result, the same payload on every delivery."""
    from farm.tasks.runtime import runtime

    run_stages(runtime(), self, payload, (SCORE,))
    return payload


def _priority(task: Task) -> int | None:
    return (task.request.delivery_info or {}).get("priority")


def wait_for_qc(queue: str, ahead: int, *, limit: float, poll: float = 0.05) -> bool:
    """Back-pressure: generate only while fewer than FARM_QC_AHEAD stage tasks wait for the QC worker
    (besides the one it runs), so a QC worker slower than its device holds the device back instead of
    filling the host's shared memory with handed-off images.

    Returns False when the QC worker has not answered a ping for QC_AWAY_S (stopped, crash-looping at start)
    or the wait passed ``limit`` (stuck in a slice): the device then checks this slice itself, so a QC worker
    that is down slows its device but never stops it, and no slice runs into its time limit waiting. Pings
    go out at most every QC_PING_S from this process, and only while it waits."""
    t0 = time.monotonic()
    _qc_seen.setdefault(queue, t0)  # the first wait of this process gives a starting QC worker its time
    while queue_length(app, queue) >= ahead:
        now = time.monotonic()
        if now - _qc_pinged.get(queue, -math.inf) >= QC_PING_S:
            _qc_pinged[queue] = now
            if answers(app, queue, timeout=1.0):
                _qc_seen[queue] = now = time.monotonic()
        away = now - _qc_seen[queue] >= QC_AWAY_S
        if away or now - t0 >= limit:
            why = "does not answer" if away else "has not taken the next slice"
            log.warning("%s %s after %.0fs: this slice is checked on its device", queue, why, now - t0)
            return False
        time.sleep(poll)
    return True


_qc_seen: dict[str, float] = {}
_qc_pinged: dict[str, float] = {}
