"""The one way a stage task runs its stage on a slice: count the delivery, work, record, pass it on.

A slice is a chain of four stage tasks (farm.tasks.chain): farm.generate, taken from a model, the shared or
a device queue by whichever device is free, then farm.moderate, farm.validate and farm.score on the host that
holds its images. Each task calls ``run_stages`` with its one stage: one batched call with its own guarded
updates, attempt counter and timing, in two transactions (the delivery count with the lease, the stage's
write), eight a slice. Generate waits for its PNG writes (``Stage.settle``) before its write, so a row never
names a file that is not there and a later stage run by another process finds the image in the store.
``run_stages`` also runs several stages in one task, writing a stage that ``holds`` with the next, as the
tests do.

The task holds a lease on the candidates it works on (farm.tasks.lease), taken with the delivery count and
released with the write that moves a candidate out of the task; every write is fenced by it, so a run whose
lease was taken over (it was paused past it) writes nothing and drops those candidates, and its task still
returns as usual (a chord's header result does not depend on what it did).

A stage never raises for a candidate's failure: the batched call is retried one candidate at a time so a
single bad candidate is failed with its error and the rest of the slice goes on, and the chord always fires.
The task returns its input payload unchanged, so a redelivered header task adds the same result to the chord.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from time import monotonic, perf_counter, time
from typing import TYPE_CHECKING, Any

from celery import Task
from sqlalchemy import Connection

from farm import faults, logs, records
from farm.db import TRANSIENT_DB_ERRORS
from farm.records import StagedCandidate, StageStart
from farm.states import STAGE_INPUT, STAGE_OUTPUT
from farm.tasks.lease import Lease, keep_renewing

if TYPE_CHECKING:
    from farm.tasks.runtime import Runtime

log = logging.getLogger(__name__)

#: A stage's work, and each of its callables, get the worker process's runtime first: the task's entry point
#: fetched it once (farm.tasks.chain), and the stages use its models, images and lease.
Work = Callable[["Runtime", StageStart, list[StagedCandidate]], dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class Stage:
    """One stage's work on a slice.

    ``settle`` waits for the stage's side effects before its results are written (the PNG writes of
    generate, and of moderate on a QC worker: a row never names a file that is not there) and returns
    failures for candidates whose side effect failed. ``within`` runs in the write's transaction once the
    stage's rows are written (cross-slice checks), ``before`` before them.

    Where one task runs several stages (``run_stages`` with more than one; a stage task runs one), a stage
    that ``hold``s its results, or has a ``settle``, is written in one transaction with the next stage's:
    that lets its side effects finish behind the next stage's work. Each transaction cost about 1 ms on a
    device worker; a crash in the next stage's work then repeats this stage on redelivery, and is counted
    against it, so only stages whose work is cheap to repeat, or whose side effects need the time, hold.
    """

    name: str
    work: Work
    within: Callable[[Runtime, StageStart, Connection, list[str]], None] | None = None
    before: Callable[[Runtime, StageStart, Connection], None] | None = None
    settle: Callable[[Runtime, list[StagedCandidate]], dict[str, dict[str, Any]]] | None = None
    hold: bool = False

    @property
    def holds(self) -> bool:
        return self.hold or self.settle is not None


#: Options of every stage task: retry on transient database errors. The last one's return value reaches the
#: item's chord (the Redis backend counts chord parts on its own keys), so the per-task result key nobody
#: reads is not written: that saved about 1 ms a task (measured when a slice was one task).
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


def _status(c: StagedCandidate, held: list[_Worked]) -> str:
    """The status ``c`` has, or will have once the ``held`` results are written."""
    status = c.status
    for h in held:
        update = h.updates.get(c.id)
        if update is not None and status == STAGE_INPUT[h.stage.name]:
            status = update.get("status", STAGE_OUTPUT[h.stage.name])
    return status


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


def run_stages(
    rt: Runtime, task: Task, payload: dict[str, Any], stages: Sequence[Stage]
) -> list[StagedCandidate]:
    """Run ``stages`` in order on a slice, each as one batched call followed by one write of its results,
    in the worker process whose runtime is ``rt``. A stage task passes its one stage (farm.tasks.chain).

    A later stage may send a candidate back to the first stage's input (moderate, when its image was lost
    with another host): the task runs the stages on it once more. (farm.moderate, which runs moderate alone,
    replaces itself with generate and moderate for such candidates instead.) Returns the candidates it worked
    on, as written.
    """
    from farm.tasks.runtime import describe_task

    taken = monotonic()  # before the lease's transaction: its expiry counts from no earlier than this
    start = records.begin_stages(
        rt.settings.database_url,
        payload["candidates"],
        tuple(s.name for s in stages),
        max_attempts=rt.settings.max_attempts,
        also=rt.heartbeat.busy(describe_task(task.name, payload)),
        claim=rt.claim(),
    )
    rt.heartbeat.tasks_done += 1
    if start.held_elsewhere:
        logs.event(
            log,
            "candidates leased by another live worker: left to it",
            batch=start.batch.id,
            item=start.item.id,
            candidates=start.held_elsewhere,
        )
    if start.token is None:  # nothing to do here
        rt.heartbeat.write(None)
        return start.todo
    rt.lease = lease = Lease(rt, [c.id for c in start.todo], start.token, taken=taken)
    keep_renewing(rt)
    try:
        _run(rt, start, stages, lease)
    except BaseException:
        try:
            lease.release()
        except Exception as exc:  # the database is away too: the lease runs out instead
            log.warning("could not release the lease of %d candidates: %s", len(lease.held), exc)
        raise
    finally:
        rt.lease = None
    return start.todo


def _run(rt: Runtime, start: StageStart, stages: Sequence[Stage], lease: Lease) -> None:
    redelivered = any(c.stage_attempts.get(records.NEXT_STAGE[c.status], 0) > 1 for c in start.todo)
    # A slice seen before may hold input that kills its worker: go one candidate at a time, committing each,
    # so the others finish and only the poison one runs into the attempt cap.
    groups = [[c] for c in start.todo] if redelivered else [start.todo] if start.todo else []
    names = [s.name for s in stages]
    first = STAGE_INPUT[names[0]]
    sent_back: set[str] = set()
    idle = False
    n = 0
    while n < len(groups):
        group, n = groups[n], n + 1
        held: list[_Worked] = []
        rewound: set[str] = set()
        for k, stage in enumerate(stages):
            cands = [c for c in group if _status(c, held) == STAGE_INPUT[stage.name]]
            if cands:
                cands = lease.keep(cands)
            for h in held:
                h.preview(cands)
            worked = _work(rt, start, stage, cands, lease) if cands else None
            if worked is not None:
                held.append(worked)
                if k:
                    rewound.update(cid for cid, u in worked.updates.items() if u.get("status") == first)
            if not held or (stage.holds and k + 1 < len(stages)):
                continue
            last = n == len(groups) and k == len(stages) - 1 and not rewound - sent_back
            _commit(rt, start, held, names, lease, also=rt.heartbeat.idle() if last else None)
            idle = idle or last
            held = []
        again = [c for c in group if c.id in rewound - sent_back and c.status == first]
        if again:
            sent_back.update(c.id for c in again)
            groups.append(again)
    if not idle:
        rt.heartbeat.write(None)


def _work(
    rt: Runtime, start: StageStart, stage: Stage, cands: list[StagedCandidate], lease: Lease
) -> _Worked:
    def guarded(part: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
        faults.trigger(
            stage.name,
            start.item.prompt,
            [c.index for c in part],
            attempt=max(c.stage_attempts.get(stage.name, 1) for c in part),
        )
        return stage.work(rt, start, part)

    began = time()
    t0 = perf_counter()
    updates = isolate(stage.name, guarded, cands)
    if lease.lost:  # taken over during the work: those are the new holder's to write
        updates = {cid: u for cid, u in updates.items() if cid not in lease.lost}
    seconds = perf_counter() - t0
    # ``at``: when the work began (epoch seconds), so the gap between two stage tasks can be measured.
    timing = {"s": round(seconds / len(cands), 5), "queue": rt.queue, "at": round(began, 4)}
    return _Worked(stage, cands, updates, timing, seconds)


def _commit(
    rt: Runtime,
    start: StageStart,
    held: list[_Worked],
    names: list[str],
    lease: Lease,
    *,
    also: records.Also | None,
) -> None:
    """Write the held stages' results in one transaction (each after its ``settle``), and log each stage.
    Candidates leaving the task release their lease in that write (``keeps``: the statuses the task still
    works on, the inputs of the stages ``names``); those whose write was refused (a newer lease holder, or
    another delivery, recorded them) are dropped."""
    keeps = frozenset(STAGE_INPUT[name] for name in names)
    t0 = perf_counter()
    writes = []
    for w in held:
        updates = w.updates if w.stage.settle is None else {**w.updates, **w.stage.settle(rt, w.cands)}
        at = names.index(w.stage.name)
        writes.append(
            records.StageWrite(
                w.stage.name,
                updates,
                w.timing,
                started={c.id: c for c in w.cands},
                entering=names[at + 1] if at + 1 < len(names) else None,
                within=partial(w.stage.within, rt, start) if w.stage.within is not None else None,
                before=partial(w.stage.before, rt, start) if w.stage.before is not None else None,
                keeps=keeps,
            )
        )
    written = records.apply_stages(rt.settings.database_url, writes, also=also)
    for write, done in zip(writes, written, strict=True):
        ids = {c.id for c in done}
        refused = sorted(set(write.updates) - ids)
        lease.drop([*refused, *(c.id for c in done if c.status not in keeps)])
        if refused:
            logs.event(
                log,
                f"{write.stage} results refused: another holder recorded these candidates; dropping them",
                level=logging.WARNING,
                stage=write.stage,
                batch=start.batch.id,
                item=start.item.id,
                candidates=refused,
                generation=lease.token,
            )
    seconds = perf_counter() - t0
    for w, write in zip(held, writes, strict=True):
        # Plain strings: the text log line prints the dict, and a StrEnum key would print as its repr.
        outcome = Counter(str(u.get("status", STAGE_OUTPUT[w.stage.name])) for u in write.updates.values())
        logs.event(
            log,
            f"{w.stage.name} done",
            stage=w.stage.name,
            batch=start.batch.id,
            item=start.item.id,
            candidates=[c.id for c in w.cands],
            queue=rt.queue,
            outcome=dict(outcome),
            seconds=round(w.seconds + seconds, 4),
        )
