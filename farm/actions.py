"""Operator actions on a batch after the fact: retry its failed candidates, resume it after an interruption.

Both write SQL first (one transaction) and only then send messages, through the same farm.dispatch functions
a fresh batch uses, so what runs afterwards is the ordinary pipeline: stages skip candidates that are not at
their input status and the rank stage flips an item to done only once. That makes both safe to repeat.

- retry_failed: for a *done* batch, its failed candidates go back to ``pending`` (their error, stage and
  per-stage attempt counts cleared; the total ``attempts`` kept, so the record shows how often they ran), the
  other candidates that passed in those items go back to ``scored`` so the item is ranked again as a whole,
  those items go back to ``running``, and the batch to ``running`` with ``items_done`` lowered to match.
- resume: for a *queued or running* batch whose messages were lost (a broker restarted without persistence,
  a crash between a commit and a send), re-send the unsettled candidates of every running item, a rank for
  running items whose candidates are all settled, and the batch's dispatch message if items are still
  pending. Candidates a live worker process holds (their lease, farm.tasks.lease, has not run out) are not
  re-sent: they are not lost, and a twin delivery would only find them held. If their holder dies, the lease
  runs out and the reaper re-sends them. The reaper (farm.reaper) does the same on its own after
  FARM_STALL_SECONDS of silence; this is the button for when someone does not want to wait.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update

from farm import canvas, dispatch, records
from farm.config import Settings
from farm.db import Batch, Candidate, Item, session_scope, utcnow
from farm.rounds import reopen_round
from farm.states import BATCH_OPEN, CANDIDATE_SETTLED, BatchStatus, CandidateStatus, ItemStatus


class ActionRefused(ValueError):
    """The batch is not in a state the action applies to; the message says why."""


class NoSuchBatch(LookupError):
    pass


@dataclass(frozen=True)
class _Send:
    item_id: str
    candidate_ids: list[str]


def retry_failed(batch_id: str, *, settings: Settings) -> int:
    """Send a done batch's failed candidates through the pipeline again; returns how many were reset.

    Raises NoSuchBatch, or ActionRefused when the batch is not done. A done batch without failed candidates
    is left as it is (returns 0).
    """
    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, batch_id)
        if batch is None:
            raise NoSuchBatch(batch_id)
        if batch.status != BatchStatus.DONE:
            raise ActionRefused(f"batch {batch_id} is {batch.status}; only a done batch has failed "
                                "candidates to retry (resume a queued or running one instead)")
        failed = s.scalars(
            select(Candidate)
            .where(Candidate.batch_id == batch_id, Candidate.status == CandidateStatus.FAILED)
            .order_by(Candidate.item_id, Candidate.index)
        ).all()
        if not failed:
            return 0
        # Guarded flip: of two concurrent retries, only one finds the batch still done.
        if not s.execute(
            update(Batch).where(Batch.id == batch_id, Batch.status == BatchStatus.DONE)
            .values(status=BatchStatus.RUNNING, finished_at=None)
        ).rowcount:
            raise ActionRefused(f"batch {batch_id} changed while retrying; reload and try again")
        by_item: dict[str, list[str]] = {}
        for c in failed:
            _reset(c)
            by_item.setdefault(c.item_id, []).append(c.id)
        items = s.scalars(select(Item).where(Item.id.in_(list(by_item)))).all()
        reopened = 0
        for it in items:
            if it.status == ItemStatus.DONE:
                reopened += 1
            # The reaper's re-sends start over too: a retried item gets its full share of stall recovery.
            it.status, it.finished_at, it.winners, it.resends = ItemStatus.RUNNING, None, [], 0
            reopen_round(s.connection(), it.id)
        # The rank stage ranks the candidates at 'scored': put the item's survivors back there so the retried
        # ones compete with them, not only with each other.
        s.execute(
            update(Candidate)
            .where(Candidate.item_id.in_(list(by_item)), Candidate.status == CandidateStatus.PASSED)
            .values(status=CandidateStatus.SCORED)
        )
        s.execute(update(Batch).where(Batch.id == batch_id).values(items_done=Batch.items_done - reopened))
        priority = dispatch.celery_priority(batch.priority)
        sends = [_Send(iid, ids) for iid, ids in by_item.items()]
    for send in sends:
        dispatch.send_item(batch_id, send.item_id, send.candidate_ids, settings=settings, priority=priority)
    return len(failed)


def _reset(c: Candidate) -> None:
    """Back to how dispatch wrote it, keeping its identity, seed and the total number of attempts."""
    c.status, c.stage, c.error = CandidateStatus.PENDING, None, None
    c.stage_attempts = {}
    c.image_path = c.pdq_hash = c.verdict = None
    c.reasons, c.moderation, c.attributes, c.timings = [], [], {}, {}
    c.alignment = c.preference = c.score = None
    c.rank, c.is_winner = None, False
    c.updated_at = utcnow()


def resume(batch_id: str, *, settings: Settings) -> int:
    """Re-send what a queued or running batch still needs, except what a live worker holds; returns the
    number of messages sent (pressed again and again while a slice generates, it sends nothing for it).

    Raises NoSuchBatch, or ActionRefused when the batch is already closed.
    """
    now = utcnow()
    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, batch_id)
        if batch is None:
            raise NoSuchBatch(batch_id)
        if batch.status not in BATCH_OPEN:
            raise ActionRefused(f"batch {batch_id} is {batch.status}; only a queued or running batch can be "
                                "resumed")
        priority = dispatch.celery_priority(batch.priority)
        running = s.scalars(
            select(Item.id)
            .where(Item.batch_id == batch_id, Item.status == ItemStatus.RUNNING)
            .order_by(Item.index)
        ).all()
        unsettled = s.scalars(
            select(Candidate).where(Candidate.batch_id == batch_id, Candidate.item_id.in_(running),
                                    Candidate.status.not_in(CANDIDATE_SETTLED))
            .order_by(Candidate.item_id, Candidate.index)
        ).all()
        by_item: dict[str, list[str]] = {iid: [] for iid in running}
        held: set[str] = set()
        for c in unsettled:
            if records.lease_held(c, now):
                held.add(c.item_id)  # a live worker process holds it: a re-send would only wait for it
                continue
            by_item[c.item_id].append(c.id)
            c.updated_at = now  # the reaper sees fresh activity and does not re-send the same work as well
        by_item = {iid: ids for iid, ids in by_item.items() if ids or iid not in held}
        has_pending = s.scalar(
            select(Item.id).where(Item.batch_id == batch_id, Item.status == ItemStatus.PENDING).limit(1)
        ) is not None
    sent = 0
    for iid, ids in by_item.items():
        # No unsettled candidates: only the rank message can be missing; send_item sends just that.
        dispatch.send_item(batch_id, iid, ids, settings=settings, priority=priority)
        sent += 1
    if has_pending:
        canvas.dispatch_signature(dispatch.app_for(settings), batch_id, ignore_result=True).apply_async(
            priority=priority
        )
        sent += 1
    return sent
