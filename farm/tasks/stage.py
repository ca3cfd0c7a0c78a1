"""The one way every device task runs its stages on a slice: count the delivery, work, record, pass it on.

A slice is a chain of two tasks: ``farm.generate`` takes it from the shared (or a model) queue on whichever
device is free, and ``farm.check`` runs moderate, validate and score back to back on that same device, where
the images are, in memory. Each stage is still its own batched call with its own guarded write, attempt
counter and timing; running the three checks in one task saves two broker round trips and two transactions
per slice (the write of one stage also counts the next one as started).

A stage never raises for a candidate's failure: the batched call is retried one candidate at a time so a
single bad candidate is failed with its error and the rest of the slice goes on, and the chord always fires.
The task returns its input payload unchanged, so a redelivered header task adds the same result to the chord.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from celery import Task

from farm import faults, logs, records
from farm.db import TRANSIENT_DB_ERRORS
from farm.records import StagedCandidate, StageStart

log = logging.getLogger(__name__)

Work = Callable[[StageStart, list[StagedCandidate]], dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class Stage:
    """One stage's work on a slice; ``after`` runs once its results are committed (cross-slice checks)."""

    name: str
    work: Work
    after: Callable[[StageStart, list[StagedCandidate]], None] | None = None


#: Options of the device tasks: retry on transient database errors. Only the last task of a slice's chain
#: (check) keeps its result in Redis, where the chord counts it; generate passes its on in the message.
STAGE_OPTIONS: dict[str, Any] = {
    "bind": True,
    "autoretry_for": TRANSIENT_DB_ERRORS,
    "retry_backoff": True,
    "max_retries": 8,
}
FIRST_STAGE_OPTIONS: dict[str, Any] = {**STAGE_OPTIONS, "ignore_result": True}


def isolate(
    stage: str,
    work: Callable[[list[StagedCandidate]], dict[str, dict[str, Any]]],
    cands: list[StagedCandidate],
) -> dict[str, dict[str, Any]]:
    """Run ``work`` on the whole slice; if it raises, once per candidate, failing only those that raise."""
    try:
        out = work(cands)
    except TRANSIENT_DB_ERRORS:
        raise
    except Exception as exc:
        if len(cands) == 1:
            log.exception("%s failed for %s", stage, cands[0].id)
            return {cands[0].id: records.failure(stage, exc)}
        log.warning("%s failed for a slice of %d (%s); retrying one by one", stage, len(cands), exc)
        out = {}
        for c in cands:
            out.update(isolate(stage, work, [c]))
        return out
    for c in cands:
        out.setdefault(c.id, records.failure(stage, "the stage returned no result for this candidate"))
    return out


def run_stages(task: Task, payload: dict[str, Any], stages: Sequence[Stage]) -> dict[str, Any]:
    """Run ``stages`` in order on a slice, each as one batched call followed by one write of its results."""
    from farm.tasks.runtime import describe_task, runtime

    rt = runtime()
    start = records.begin_stages(
        rt.settings.database_url,
        payload["candidates"],
        tuple(s.name for s in stages),
        max_attempts=rt.settings.max_attempts,
        also=rt.busy(describe_task(task.name, payload)),
    )
    rt.tasks_done += 1
    redelivered = any(c.stage_attempts.get(records.NEXT_STAGE[c.status], 0) > 1 for c in start.todo)
    # A slice seen before may hold input that kills its worker: go one candidate at a time, committing each,
    # so the others finish and only the poison one runs into the attempt cap.
    groups = [[c] for c in start.todo] if redelivered else [start.todo] if start.todo else []
    idle = False
    for n, group in enumerate(groups, 1):
        for k, stage in enumerate(stages):
            cands = [c for c in group if c.status == records.STAGE_INPUT[stage.name]]
            if not cands:
                continue
            last = n == len(groups) and k == len(stages) - 1
            entering = stages[k + 1].name if k + 1 < len(stages) else None
            _run_stage(start, stage, cands, entering=entering, also=rt.idle() if last else None)
            idle = idle or last
    if not idle:
        rt.heartbeat(None)
    return payload


def _run_stage(
    start: StageStart,
    stage: Stage,
    cands: list[StagedCandidate],
    *,
    entering: str | None,
    also: records.Also | None,
) -> None:
    from farm.tasks.runtime import runtime

    rt = runtime()

    def guarded(part: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
        faults.trigger(
            stage.name,
            start.item.prompt,
            [c.index for c in part],
            attempt=max(c.stage_attempts.get(stage.name, 1) for c in part),
        )
        return stage.work(start, part)

    t0 = perf_counter()
    updates = isolate(stage.name, guarded, cands)
    timing = {"s": round((perf_counter() - t0) / len(cands), 5), "queue": rt.queue}
    written = records.apply_stage(
        rt.settings.database_url,
        stage.name,
        updates,
        timing,
        started={c.id: c for c in cands},
        entering=entering,
        also=also,
    )
    if written and stage.after is not None:
        stage.after(start, written)
    outcome = Counter(u.get("status", records.STAGE_OUTPUT[stage.name]) for u in updates.values())
    logs.event(
        log,
        f"{stage.name} done",
        stage=stage.name,
        batch=start.batch.id,
        item=start.item.id,
        candidates=[c.id for c in cands],
        queue=rt.queue,
        outcome=dict(outcome),
        seconds=round(perf_counter() - t0, 4),
    )


def pin_rest_of_chain(task: Task, queue: str) -> None:
    """Send the rest of this slice's chain (check) to this worker's own device queue (its images are here)."""
    for sig in task.request.chain or ():
        sig.setdefault("options", {})["queue"] = queue
