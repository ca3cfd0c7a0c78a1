"""farm.slice: a slice generated, moderated, validated and scored in turn on the device that took it.

With FARM_QC=worker the slice is split in two on its device's host: farm.slice generates and hands the images
off, then replaces itself with farm.qc on that device's QC worker (``qc-cuda0@host``), which stores the PNGs
and runs the checks while the device generates the next slice. ``Task.replace`` keeps the task id, the chord
and the rest of the chain, so the item's rank still waits for the checks. While the QC worker is away (it
does not answer pings), the device checks its slices itself, as with FARM_QC=inline.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any

from celery import Task

from farm import records
from farm.broker import answers, queue_length
from farm.canvas import QC_TASK, SLICE_TASK, qc_signature, slice_signature
from farm.celery_app import app
from farm.states import STAGE_INPUT
from farm.tasks.generate import GENERATE, settle_writes
from farm.tasks.moderate import MODERATE
from farm.tasks.score import SCORE
from farm.tasks.stage import STAGE_OPTIONS, run_stages
from farm.tasks.validate import VALIDATE

log = logging.getLogger(__name__)

STAGES = (GENERATE, MODERATE, VALIDATE, SCORE)
#: A QC worker that has not answered a ping for this long is away; its device checks slices itself meanwhile.
QC_AWAY_S = 30.0
QC_PING_S = 5.0
#: The QC worker's stages: moderate stores the handed-off PNGs, and its results wait for those writes.
QC_STAGES = (replace(MODERATE, settle=settle_writes), VALIDATE, SCORE)


@app.task(name=SLICE_TASK, **STAGE_OPTIONS)
def run_slice(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: candidate ids and seeds are fixed in SQL; each stage works only on candidates still at its
    input status and writes with a guard on it, and each PNG is written to a temporary name and renamed, so
    a redelivery redoes only what had not been recorded. The payload it returns (the chord's header result)
    is its input, the same on every delivery. Replaced by farm.qc (FARM_QC=worker), a redelivery that finds
    the slice generated sends farm.qc again, under the same task id, which that task's guards make harmless.
    """
    from farm.tasks.runtime import runtime

    rt = runtime()
    if rt.qc_queue is None:
        run_stages(rt, self, payload, STAGES)
        return payload
    if not wait_for_qc(rt.qc_queue, rt.settings.qc_ahead, limit=rt.settings.task_time_limit / 2):
        with rt.images.checks_here():
            run_stages(rt, self, payload, STAGES)
        return payload
    run_stages(rt, self, payload, STAGES[:1])
    return self.replace(qc_signature(app, payload, queue=rt.qc_queue, priority=_priority(self)))


def _priority(task: Task) -> int | None:
    return (task.request.delivery_info or {}).get("priority")


def wait_for_qc(queue: str, ahead: int, *, limit: float, poll: float = 0.05) -> bool:
    """Back-pressure: generate only while fewer than FARM_QC_AHEAD slices wait for the QC worker (besides the
    one it checks), so a QC worker slower than its device holds the device back instead of filling the
    host's shared memory with handed-off images.

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


@app.task(name=QC_TASK, **STAGE_OPTIONS)
def run_qc(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent as farm.slice (the same guarded stages); the handed-off images are removed only once the
    task is done, so a redelivery still finds those its first delivery had not stored. Candidates whose
    images were lost (moderate sent them back to generate) go out again as farm.slice, under the same task
    id, to whichever device placement picks: it generates those again and hands them to its own QC worker.

    Both follow the candidates' statuses in SQL after the stages, not what this delivery did: a redelivery
    (its first delivery died after sending candidates back, before replacing itself) still sends them, and
    an image handed off again meanwhile (its candidate at 'generated', for a QC task of its own) is kept.
    """
    from farm.placement import route_batch
    from farm.tasks.runtime import runtime

    rt = runtime()
    run_stages(rt, self, payload, QC_STAGES)
    now = records.statuses(rt.settings.database_url, payload["candidates"])
    waiting = (STAGE_INPUT["generate"], STAGE_INPUT["moderate"])
    rt.images.drop_handoff([c for c in payload["candidates"] if now.get(c) not in waiting])
    if STAGE_INPUT["generate"] not in now.values():
        return payload
    queue = route_batch(rt.settings.database_url, payload["batch_id"])
    return self.replace(slice_signature(app, payload, queue=queue, priority=_priority(self)))
