"""farm.rank: runs after an item's slices (a chord's body, or the link after a one-slice item's task); ranks
the item from SQL and closes the batch when it is the last."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

from celery import Task

from farm import faults, logs, records, rounds
from farm.canvas import RANK_TASK
from farm.celery_app import app
from farm.config import Settings, load_settings
from farm.db import TRANSIENT_DB_ERRORS
from farm.ranking import Contender, rank
from farm.states import BATCH_STOPPED

SETTLE_POLL_S = 5
log = logging.getLogger(__name__)


@app.task(
    name=RANK_TASK,
    bind=True,
    max_retries=None,
    autoretry_for=TRANSIENT_DB_ERRORS,
    retry_backoff=True,
    retry_backoff_max=30,
    ignore_result=True,
)
def rank_item(self: Task, item_id: str) -> dict:
    """Idempotent: ranks are recomputed from SQL with a deterministic tie-break, and the item flips to done
    (and the batch counter moves) only once, however often this runs.

    If candidates of the item are still in flight (the chord or chain fired early, or the reaper re-sent part
    of the item), it waits for them rather than ranking half an item; the reaper takes over if they never
    come. An item already closed is left as it is: its candidates are final, so a second rank (the chord of
    a slice the reaper re-sent, firing when the original message comes back; a redelivery after the commit)
    would find none scored and clear the winners, or start a top-up round on a finished item. Likewise a rank
    whose view another rank overtook (it added a round or closed the item after this one read it) writes
    nothing: it neither adds a second round for the same shortfall nor closes the item over the new round.
    """
    settings = load_settings()
    view = rounds.rank_view(settings.database_url, item_id)
    if view.closed:
        log.info("item %s is already closed; not ranked again", item_id)
        return {"item": item_id, "already_closed": True}
    if view.waiting and view.batch_status not in BATCH_STOPPED:
        if self.request.retries * SETTLE_POLL_S < settings.stall_seconds:
            raise self.retry(countdown=SETTLE_POLL_S, exc=None)
        return {"item": item_id, "winners": [], "batch_closed": False, "waiting": view.waiting}
    cfg, prompt = view.config, view.prompt
    contenders = [Contender(c.id, c.index, c.preference, c.alignment, c.pdq_hash) for c in view.scored]
    weights = cfg.scoring.weights
    # Ranked before the top-up decision too: a top-up round records the ranking it was decided on.
    result = rank(
        contenders,
        preference_weight=weights.preference,
        alignment_weight=weights.alignment,
        winners=cfg.selection.winners,
        near_duplicate_distance=cfg.moderation.near_duplicate_distance,
    )
    topup = (
        rounds.add_topup_round(
            settings.database_url,
            item_id,
            passed=len(contenders),
            rounds=view.rounds,
            ranking=result.order,
            winners=result.winners,
            scores=result.scores,
            config=cfg,
        )
        if view.topup_due()
        else None
    )
    if topup is rounds.RACED:
        return _raced(item_id)
    if topup is not None:
        # Short of min_accepted: a round of new seeds goes through the same chord, whose rank comes back here.
        from farm import dispatch

        dispatch.send_item(
            topup.batch_id,
            item_id,
            topup.candidate_ids,
            settings=settings,
            priority=dispatch.celery_priority(topup.priority),
        )
        return {"item": item_id, "topup_round": topup.round, "added": len(topup.candidate_ids)}
    done = rounds.finish_item(
        settings.database_url,
        item_id,
        ranking=result.order,
        winners=result.winners,
        scores=result.scores,
        rounds=view.rounds,
        during=lambda: faults.trigger("rank", prompt, [0], attempt=self.request.retries + 1),
    )
    if done is rounds.RACED:
        return _raced(item_id)
    if done.closed_with_images or done.batch_closed:
        store_matches_rows(settings, done)
    logs.event(
        log,
        "item ranked",
        item=item_id,
        winners=done.winners,
        ranked=len(result.order),
        batch_closed=done.batch_closed,
    )
    return {"item": item_id, "winners": done.winners, "batch_closed": done.batch_closed}


def _raced(item_id: str) -> dict:
    """This rank's view is stale: another rank of the item (recovery makes two: each lease re-send is a chord
    of its own) added a round or closed the item after it was read, and nothing was written. A closed item
    is done; a new round is ranked by its own chord's rank (or the reaper, if its messages are lost), so
    closing the item here would fail that round's candidates, and waiting here would only poll beside it."""
    logs.event(log, "item changed since this rank read it; left to the newer rank", item=item_id)
    return {"item": item_id, "raced": True}


def store_matches_rows(settings: Settings, done: rounds.Ranked) -> None:
    """Rows and files one to one, after the item's close. A closed row naming an image the store never got
    (handed to a QC task that never ran: the batch was cancelled) names none. When the batch closes, files no
    row names are removed: a worker killed, or fenced off by its lease, between writing a candidate's PNG and
    committing its row leaves one, which the candidate's next generation would overwrite, but a cancelled
    batch has no next generation. Both found by `farm chaos`."""
    from farm.artifacts import store_for

    store = store_for(settings)
    # Only the item's own closed images are looked up: listing the batch's store for each item that has one
    # would cost items x files over a batch. The listing is for the batch's close alone.
    stored = {path for _, path in done.closed_with_images if store.exists(path)}
    forgotten = records.forget_missing_images(settings.database_url, done.closed_with_images, stored)
    if forgotten:
        logs.event(log, "closed candidates whose image was never stored", item=done.item_id, ids=forgotten)
    if not done.batch_closed:
        return
    present = store.names(done.batch_id)
    named = {_stem(n) for n in records.image_names(settings.database_url, done.batch_id)}
    unnamed = sorted(n for n in present if _stem(n) not in named)
    for name in unnamed:
        store.delete(name)
    if unnamed:
        logs.event(log, "removed images no candidate names", batch=done.batch_id, names=unnamed)


def _stem(name: str) -> str:
    """``<batch>/<candidate>``: an image and its ``.json`` sidecar share it."""
    return str(PurePosixPath(name).with_suffix(""))

