"""Finding work that was lost and finishing it, so no batch hangs for ever.

A chord whose header task is lost never fires (docs/ARCHITECTURE.md, Celery hazards), and a batch whose
dispatch message is lost never starts. SQL knows better. First, leases (farm.tasks.lease): a candidate whose
lease ran out (the worker process that held it stopped renewing it: killed, paused, cut off) moves to a new
lease generation, which fences the old holder off, and is re-sent at once, routed as new work is; the old
message, when kombu brings it back, finds it settled or leased by its new holder and does nothing. Until the
re-send went out the reaper holds the new generation, for FARM_LEASE_SECONDS: a send that failed is taken and
sent again by a later run. This runs whatever is queued: the holder is gone either way. Each delivery counted
against FARM_MAX_ATTEMPTS when it took the lease, so a slice that kills its worker every time still ends
failed.

Then an item is *stalled* when none of its candidates changed for
FARM_STALL_SECONDS while nothing waits in a queue a live worker serves (so it is not merely queued behind
other work; work stranded in the queue of a device whose worker is gone counts as stalled). Then:

- a batch never dispatched, or dispatched part way (items still unsent): send its dispatch again (it sends
  only the items still pending);
- a cancelled batch whose unsent items were never closed (their rank messages lost): send those ranks again;
- every candidate settled (final, or scored and waiting for rank): the rank message was lost; send it again;
- otherwise re-send a chord for the unsettled candidates (stages skip what is already done, so this repeats
  nothing), at most FARM_MAX_RESENDS times; after that the unsettled candidates are failed with the reason and
  the item is ranked from what survived.

Runs on Celery beat in the control worker every FARM_REAPER_INTERVAL seconds, and once when it starts, which
also resumes work left half-done by a crash of the whole farm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select

from farm import canvas, logs
from farm.broker import CONTROL_QUEUE, SLICES_QUEUE, live_queues, queue_length
from farm.config import Settings
from farm.db import Batch, Candidate, Item, session_scope, utcnow
from farm.states import BATCH_STOPPED, CANDIDATE_SETTLED, BatchStatus, CandidateStatus, ItemStatus

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    reranked: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    #: Items whose candidates' leases had run out, re-sent.
    leases: list[str] = field(default_factory=list)
    skipped_busy: bool = False


def queued_messages(app: object, settings: Settings) -> int:
    """Messages waiting where a live worker will take them: the shared and control queues, the model queues
    of open batches (a worker holding the model takes them, and any idle worker steals them, as it would
    take from the shared queue), and the queues of devices whose worker answers. Work stranded in the queue
    of a device that is gone does not count: it is stalled, and the reaper re-sends it (routed as dispatch
    routes, farm.placement)."""
    from farm.placement import active_model_queues

    queues = {
        SLICES_QUEUE,
        CONTROL_QUEUE,
        *active_model_queues(settings.database_url),
        *(live_queues(app) - {CONTROL_QUEUE}),
    }
    return sum(queue_length(app, q) for q in queues if q)


def resend_expired_leases(settings: Settings, now: datetime) -> list[str]:
    """Re-send the candidates whose lease ran out before ``now``, per item, to be placed as new work is;
    returns the items sent.

    A send that fails (the broker restarting) is logged and the other items are still sent: the candidates
    of that item stay held by the reaper until FARM_LEASE_SECONDS from now (``take_expired_leases``), and a
    later run takes and sends them again. Nor does the failure stop the rest of ``reap``."""
    from farm import dispatch
    from farm.records import sent_leases, take_expired_leases

    taken = take_expired_leases(settings.database_url, now, seconds=settings.lease_seconds)
    by_item: dict[tuple[str, str], list[Any]] = {}
    for row in sorted(taken, key=lambda r: (r.item_id, r.index)):
        by_item.setdefault((row.batch_id, row.item_id), []).append(row)
    if not by_item:
        return []
    with session_scope(settings.database_url, read_only=True) as s:
        priority = dict(
            s.execute(select(Batch.id, Batch.priority).where(Batch.id.in_({b for b, _ in by_item}))).all()
        )
    sent: list[Any] = []
    items: list[str] = []
    for (batch_id, item_id), rows in by_item.items():
        ids = [r.id for r in rows]
        logs.event(
            log,
            "lease ran out: re-sending its candidates",
            level=logging.WARNING,
            batch=batch_id,
            item=item_id,
            candidates=ids,
        )
        try:
            rank = dispatch.celery_priority(priority[batch_id])
            dispatch.send_item(batch_id, item_id, ids, settings=settings, priority=rank)
        except Exception as exc:  # the broker is away: the reaper's hold runs out, a later run sends again
            logs.event(
                log,
                "could not re-send candidates whose lease ran out; a later reaper run sends them again",
                level=logging.WARNING,
                batch=batch_id,
                item=item_id,
                candidates=ids,
                error=f"{type(exc).__name__}: {exc}",
            )
            continue
        sent += rows
        items.append(item_id)
    sent_leases(settings.database_url, sent)
    return items


def reap(
    app: object, settings: Settings, *, now: datetime | None = None, ignore_queues: bool = False
) -> ReapReport:
    from farm import dispatch

    now = now or utcnow()
    report = ReapReport()
    report.leases = resend_expired_leases(settings, now)
    # The control worker's own reap message sits in the control queue while it runs; allow for that one.
    if not ignore_queues and queued_messages(app, settings) > 0:
        report.skipped_busy = True
        return report
    cutoff = now - timedelta(seconds=settings.stall_seconds)
    unsent = select(Item.id).where(Item.batch_id == Batch.id, Item.status == ItemStatus.PENDING).exists()
    with session_scope(settings.database_url) as s:
        # Never dispatched, or dispatched part way (the task failed between two items): items still 'pending'.
        lost_dispatch = s.scalars(
            select(Batch.id).where(
                Batch.created_at < cutoff,
                or_(Batch.status == BatchStatus.QUEUED, and_(Batch.status == BatchStatus.RUNNING, unsent)),
            )
        ).all()
        # Cancelled, but a rank that closes an unsent item was lost (cancel sends one per such item).
        lost_cancel = s.scalars(
            select(Item.id)
            .join(Batch, Batch.id == Item.batch_id)
            .where(Batch.status == BatchStatus.CANCELLING, Item.status == ItemStatus.PENDING)
        ).all()
        running = s.execute(
            select(Item.id, Item.batch_id, Item.resends, Batch.status, Batch.priority)
            .join(Batch, Batch.id == Item.batch_id)
            .where(Item.status == ItemStatus.RUNNING)
        ).all()
    for batch_id in lost_dispatch:
        canvas.dispatch_signature(app, batch_id).apply_async()
        report.redispatched.append(batch_id)
    for item_id in lost_cancel:
        canvas.rank_signature(app, item_id).apply_async()
        report.closed.append(item_id)
    for item_id, batch_id, resends, batch_status, priority in running:
        with session_scope(settings.database_url) as s:
            last = s.scalar(select(func.max(Candidate.updated_at)).where(Candidate.item_id == item_id))
            if last is not None and last >= cutoff:
                continue
            unsettled = s.scalars(
                select(Candidate)
                .where(Candidate.item_id == item_id, Candidate.status.not_in(CANDIDATE_SETTLED))
                .order_by(Candidate.index)
            ).all()
            if unsettled and batch_status not in BATCH_STOPPED and resends < settings.max_resends:
                s.get(Item, item_id).resends = resends + 1
                for c in unsettled:
                    c.updated_at = now
                ids = [c.id for c in unsettled]
                action = "resend"
            else:
                stopped = batch_status in BATCH_STOPPED
                for c in unsettled:
                    c.status = CandidateStatus.CANCELLED if stopped else CandidateStatus.FAILED
                    c.error = c.error or (
                        f"lost: no progress for {settings.stall_seconds}s after {resends} re-sends "
                        f"(FARM_MAX_RESENDS={settings.max_resends})"
                    )
                action = "close" if unsettled else "rerank"
        if action == "resend":
            logs.event(
                log,
                "stalled item: re-sending its unsettled candidates",
                level=logging.WARNING,
                batch=batch_id,
                item=item_id,
                candidates=ids,
                resend=resends + 1,
            )
            dispatch.send_item(
                batch_id, item_id, ids, settings=settings, priority=dispatch.celery_priority(priority)
            )
            report.resent.append(item_id)
        else:
            logs.event(
                log,
                "stalled item: ranking it",
                level=logging.WARNING,
                batch=batch_id,
                item=item_id,
                action=action,
            )
            canvas.rank_signature(app, item_id).apply_async()
            (report.closed if action == "close" else report.reranked).append(item_id)
    return report
