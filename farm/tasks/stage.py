"""The one way a device task runs a slice's stages: count the delivery, work, record, pass it on.

A slice is one task, ``farm.slice``, taken from the shared (or a model) queue by whichever device is free:
it generates, moderates, validates and scores the slice in turn on that device, its images kept in memory
between stages. Each stage is still its own batched call with its own guarded write, attempt counter and
timing; one task per slice saves the broker round trips and transactions of a chain, and lets generate's
PNG writes run behind the checks (``Stage.settle``).

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
    """One stage's work on a slice; ``after`` runs once its results are committed (cross-slice checks).

    ``settle``, when set, lets the stage's side effects finish behind the next stage's work: its results are
    written only after that work has run and ``settle`` has waited for them (generate's PNG writes: a row
    never names a file that is not there). It returns failures for candidates whose side effect failed.
    A crash in the next stage's work then repeats this stage on redelivery, and is counted against it.
    """

    name: str
    work: Work
    after: Callable[[StageStart, list[StagedCandidate]], None] | None = None
    settle: Callable[[list[StagedCandidate]], dict[str, dict[str, Any]]] | None = None


#: Options of the slice task: retry on transient database errors. Its return value reaches the item's chord
#: (the Redis backend counts chord parts on its own keys), so the per-task result key nobody reads is not
#: written: that saved about 1 ms a slice.
STAGE_OPTIONS: dict[str, Any] = {
    "bind": True,
    "ignore_result": True,
    "autoretry_for": TRANSIENT_DB_ERRORS,
    "retry_backoff": True,
    "max_retries": 8,
}


@dataclass
class _Worked:
    """A stage's results on some candidates, not yet written."""

    stage: Stage
    cands: list[StagedCandidate]
    updates: dict[str, dict[str, Any]]
    timing: dict[str, Any]
    seconds: float

    def preview(self, cands: list[StagedCandidate]) -> None:
        """Show the next stage these results (its image path, say) before they are written; the status
        changes only with the write."""
        for c in cands:
            for key, value in self.updates.get(c.id, {}).items():
                if key != "status":
                    setattr(c, key, value)

    def keep(self, status: str) -> None:
        """Keep only the candidates now at ``status``: those whose earlier stage's write applied."""
        self.cands = [c for c in self.cands if c.status == status]
        self.updates = {c.id: self.updates[c.id] for c in self.cands}


def _status(c: StagedCandidate, held: _Worked | None) -> str:
    """The status ``c`` has, or will have once ``held`` results are written."""
    update = held.updates.get(c.id) if held is not None else None
    return c.status if update is None else update.get("status", records.STAGE_OUTPUT[held.stage.name])


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
        held: _Worked | None = None
        for k, stage in enumerate(stages):
            cands = [c for c in group if _status(c, held) == records.STAGE_INPUT[stage.name]]
            if held is not None:
                held.preview(cands)
            worked = _work(start, stage, cands) if cands else None
            if held is not None:
                _commit(start, held, entering=stage.name, also=None)
                held = None
                if worked is not None:
                    worked.keep(records.STAGE_INPUT[stage.name])
            if worked is None or not worked.cands:
                continue
            last = n == len(groups) and k == len(stages) - 1
            if stage.settle is not None and k + 1 < len(stages):
                held = worked
                continue
            entering = stages[k + 1].name if k + 1 < len(stages) else None
            _commit(start, worked, entering=entering, also=rt.idle() if last else None)
            idle = idle or last
    if not idle:
        rt.heartbeat(None)
    return payload


def _work(start: StageStart, stage: Stage, cands: list[StagedCandidate]) -> _Worked:
    from farm.tasks.runtime import runtime

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
    seconds = perf_counter() - t0
    timing = {"s": round(seconds / len(cands), 5), "queue": runtime().queue}
    return _Worked(stage, cands, updates, timing, seconds)


def _commit(start: StageStart, worked: _Worked, *, entering: str | None, also: records.Also | None) -> None:
    """Write a stage's results (after its ``settle``), run its ``after``, and log the stage."""
    from farm.tasks.runtime import runtime

    rt = runtime()
    stage, updates = worked.stage, worked.updates
    t0 = perf_counter()
    if stage.settle is not None:
        updates = {**updates, **stage.settle(worked.cands)}
    written = records.apply_stage(
        rt.settings.database_url,
        stage.name,
        updates,
        worked.timing,
        started={c.id: c for c in worked.cands},
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
        candidates=[c.id for c in worked.cands],
        queue=rt.queue,
        outcome=dict(outcome),
        seconds=round(worked.seconds + perf_counter() - t0, 4),
    )
