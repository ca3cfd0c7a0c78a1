"""The one way every device stage runs a slice: count the delivery, work, record, pass the slice on.

A stage never raises for a candidate's failure: the batched call is retried one candidate at a time so a
single bad candidate is failed with its error and the rest of the slice goes on, and the chord always fires.
The task returns its input payload unchanged, so a redelivered header task adds the same result to the chord.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from time import perf_counter
from typing import Any

from celery import Task

from farm import faults, logs, records
from farm.config import load_settings
from farm.db import TRANSIENT_DB_ERRORS
from farm.records import StagedCandidate, StageStart

log = logging.getLogger(__name__)

Work = Callable[[StageStart, list[StagedCandidate]], dict[str, dict[str, Any]]]

#: Options of every stage task: retry on transient database errors. Only the last stage of a slice's chain
#: (score) keeps its result in Redis, where the chord counts it; the others pass theirs on in the message.
STAGE_OPTIONS: dict[str, Any] = {
    "bind": True,
    "autoretry_for": TRANSIENT_DB_ERRORS,
    "retry_backoff": True,
    "max_retries": 8,
}
MIDDLE_STAGE_OPTIONS: dict[str, Any] = {**STAGE_OPTIONS, "ignore_result": True}


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


def run_stage(
    task: Task,
    payload: dict[str, Any],
    stage: str,
    work: Work,
    after: Callable[[StageStart, list[StagedCandidate]], None] | None = None,
) -> dict[str, Any]:
    """Run one stage on a slice; ``after`` runs once its results are committed (cross-slice checks)."""
    from farm.tasks.runtime import describe_task, runtime

    settings = load_settings()
    rt = runtime()
    start = records.begin_stage(
        settings.database_url,
        payload["candidates"],
        stage,
        max_attempts=settings.max_attempts,
        also=rt.busy(describe_task(task.name, payload)),
    )

    def guarded(cands: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
        faults.trigger(
            stage,
            start.item.prompt,
            [c.index for c in cands],
            attempt=max(c.stage_attempts.get(stage, 1) for c in cands),
        )
        return work(start, cands)

    started = perf_counter()
    updates: dict[str, dict[str, Any]] = {}
    redelivered = any(c.stage_attempts.get(stage, 0) > 1 for c in start.todo)
    # A slice seen before may hold input that kills its worker: go one candidate at a time, committing each,
    # so the others finish and only the poison one runs into the attempt cap.
    parts = [[c] for c in start.todo] if redelivered else [start.todo] if start.todo else []
    started_as = {c.id: c for c in start.todo}
    rt.tasks_done += 1
    for n, part in enumerate(parts, 1):
        t0 = perf_counter()
        part_updates = isolate(stage, guarded, part)
        updates.update(part_updates)
        timing = {"s": round((perf_counter() - t0) / len(part), 5), "queue": rt.queue}
        last = n == len(parts)
        records.apply_stage(
            settings.database_url,
            stage,
            part_updates,
            timing,
            started=started_as,
            also=rt.idle() if last else None,
        )
    if not parts:
        rt.heartbeat(None)
    if start.todo and after is not None:
        after(start, start.todo)
    if start.todo:
        outcome = Counter(u.get("status", records.STAGE_OUTPUT[stage]) for u in updates.values())
        logs.event(
            log,
            f"{stage} done",
            stage=stage,
            batch=payload["batch_id"],
            item=payload["item_id"],
            candidates=[c.id for c in start.todo],
            queue=rt.queue,
            outcome=dict(outcome),
            seconds=round(perf_counter() - started, 4),
        )
    if stage == "generate":
        pin_rest_of_chain(task, rt.queue)
    return payload


def pin_rest_of_chain(task: Task, queue: str) -> None:
    """Send the remaining stages of this slice to this worker's own device queue (its images are here)."""
    for sig in task.request.chain or ():
        sig.setdefault("options", {})["queue"] = queue
