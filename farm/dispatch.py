"""Manifest -> SQL rows -> Celery canvas.

Submitting writes the whole batch (batch, items, candidates) in one transaction and sends one small
``farm.dispatch_batch`` message to the control queue, then returns the batch id: a 10,000-item manifest does
not keep the caller waiting while its chords are built. The control worker builds, for each item, one chord
whose header is one task per slice (generate -> moderate -> validate -> score, in turn on the device that
takes it) and whose body ranks the item; an item of one slice is the chain slice -> rank.

Placement (farm.placement): a slice's task goes to the queue of the batch's generator when a live
worker consumes it (it has that model loaded, so nothing is reloaded), otherwise to the shared ``slices``
queue that every device worker consumes; either way whichever device is free takes the next slice (a faster
device takes more of them), and an idle worker steals from a model queue that has work waiting.
"""

from __future__ import annotations

import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from celery import Celery, chord
from celery.canvas import Signature
from celery.result import AsyncResult
from sqlalchemy import select, update

from farm import canvas, placement
from farm.artifacts import store_for
from farm.assets import AssetPolicy
from farm.broker import SLICES_QUEUE
from farm.celery_app import app_for
from farm.config import Settings
from farm.db import Batch, Candidate, Item, session_scope
from farm.manifest import ItemPlan, Manifest, plan_manifest, summary
from farm.states import BATCH_OPEN, BatchStatus, CandidateStatus, ItemStatus


@dataclass(frozen=True)
class Submitted:
    batch_id: str
    items: int
    candidates: int


def item_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index:05d}"


def candidate_id(item: str, index: int) -> str:
    return f"{item}-{index:03d}"


def celery_priority(manifest_priority: int) -> int:
    """Manifest priority 9 is the most urgent; Redis serves Celery priority 0 first."""
    return 9 - manifest_priority


def plan(
    text: str | bytes,
    *,
    settings: Settings,
    base_dir: Path | None = None,
    assets: AssetPolicy | None = None,
) -> tuple[Manifest, list[ItemPlan]]:
    """Parse, validate and expand a manifest without writing or sending anything (also the dry run).

    ``assets`` says which files the manifest may name (farm.assets): the operator's when None (the CLI); the
    web passes an uploader's.
    """
    from farm.ml.presets import check_model_ref

    planned = plan_manifest(
        text,
        max_bytes=settings.max_upload_bytes,
        base_dir=base_dir,
        check_model=lambda ref: check_model_ref(ref, kind="generator"),
        assets=assets,
        check_ref=check_model_ref,
        farm_home=settings.home,
    )
    return planned.manifest, planned.items


def dry_run(
    text: str | bytes, *, settings: Settings, base_dir: Path | None = None, assets: AssetPolicy | None = None
) -> dict:
    manifest, items = plan(text, settings=settings, base_dir=base_dir, assets=assets)
    return summary(manifest, items, slice_size=settings.slice_size)


def create_batch(
    manifest: Manifest, items: list[ItemPlan], text: str | bytes, *, settings: Settings
) -> Submitted:
    """Write the batch, its items and every candidate row in one transaction."""
    batch_id = uuid.uuid4().hex
    yaml_text = text.decode("utf-8") if isinstance(text, bytes) else text
    total = sum(it.candidates for it in items)
    with session_scope(settings.database_url) as s:
        s.add(
            Batch(
                id=batch_id,
                name=manifest.name,
                status=BatchStatus.QUEUED,
                model=manifest.model,
                priority=manifest.priority,
                tags=list(manifest.tags) if not isinstance(manifest.tags, dict) else manifest.tags,
                manifest_yaml=yaml_text,
                settings=manifest.model_dump(mode="json"),
                items_total=len(items),
                items_done=0,
                candidates_total=total,
            )
        )
        s.flush()
        item_rows, cand_rows = [], []
        for it in items:
            iid = item_id(batch_id, it.index)
            item_rows.append(
                {
                    "id": iid,
                    "batch_id": batch_id,
                    "index": it.index,
                    "prompt": it.prompt,
                    "negative_prompt": it.negative_prompt,
                    "source": it.source,
                    "params": {
                        "steps": it.steps,
                        "guidance": it.guidance,
                        "width": it.width,
                        "height": it.height,
                        "scheduler": it.scheduler,
                        "required_attributes": list(it.required_attributes),
                        "seed": it.explicit_seed,
                        **({"styles": list(it.styles)} if it.styles else {}),
                    },
                    "status": ItemStatus.PENDING,
                    "candidates_total": it.candidates,
                    "rounds": 0,
                    "winners": [],
                }
            )
            for k, seed in enumerate(it.seeds):
                cand_rows.append(candidate_row(batch_id, iid, k, seed, round_=0))
        s.execute(Item.__table__.insert(), item_rows)
        s.execute(Candidate.__table__.insert(), cand_rows)
    return Submitted(batch_id, len(items), total)


def candidate_row(batch_id: str, iid: str, index: int, seed: int, *, round_: int) -> dict:
    return {
        "id": candidate_id(iid, index),
        "batch_id": batch_id,
        "item_id": iid,
        "index": index,
        "round": round_,
        "seed": seed,
        "status": CandidateStatus.PENDING,
        "attempts": 0,
        "stage_attempts": {},
        "reasons": [],
        "moderation": [],
        "attributes": {},
        "timings": {},
        "recipe": {},
        "is_winner": False,
    }


def submit(
    text: str | bytes, *, settings: Settings, base_dir: Path | None = None, assets: AssetPolicy | None = None
) -> Submitted:
    """Validate fully, write the batch, hand it to the control queue; returns at once with the batch id.

    If the broker refuses the message, the rows are removed again: nothing is left half-written. Files
    uploaded with the manifest (``assets``) are stored once it is valid, before the rows that name them, and
    removed again if the batch is not written or not sent.
    """
    manifest, items = plan(text, settings=settings, base_dir=base_dir, assets=assets)
    # The store is built only when there is something to write into it.
    with assets.stored(store_for(settings)) if assets is not None and assets.named else nullcontext():
        submitted = create_batch(manifest, items, text, settings=settings)
        try:
            canvas.dispatch_signature(app_for(settings), submitted.batch_id, ignore_result=True).apply_async(
                priority=celery_priority(manifest.priority), retry=True, retry_policy={"max_retries": 3}
            )
        except Exception:
            delete_batch(submitted.batch_id, settings=settings)
            raise
        return submitted


def delete_batch(batch_id: str, *, settings: Settings) -> None:
    with session_scope(settings.database_url) as s:
        s.execute(Candidate.__table__.delete().where(Candidate.batch_id == batch_id))
        s.execute(Item.__table__.delete().where(Item.batch_id == batch_id))
        s.execute(Batch.__table__.delete().where(Batch.id == batch_id))


def slices(candidate_ids: list[str], size: int) -> list[list[str]]:
    return [candidate_ids[i : i + size] for i in range(0, len(candidate_ids), size)]


def slice_chain(
    batch_id: str, iid: str, ids: list[str], *, priority: int, app: Celery, queue: str = SLICES_QUEUE
) -> Signature:
    """The chain of one slice (its four stage tasks), its generate sent to ``queue`` (``slices`` or a model
    queue)."""
    payload = {"batch_id": batch_id, "item_id": iid, "candidates": ids}
    return canvas.slice_chain(app, payload, queue=queue, priority=priority)


def item_chord(
    batch_id: str,
    iid: str,
    candidate_ids: list[str],
    *,
    slice_size: int,
    priority: int,
    app: Celery,
    queue: str = SLICES_QUEUE,
) -> Signature:
    """The item's slice chains with farm.rank after them: a chord whose body ranks, or, for an item of one
    slice (the usual case: a prompt's candidates fit one batched forward pass), the chain of its stages
    followed by rank. A chord of one part cost a Lua script, a group lookup and a read of the results per
    item, about 1.4 ms, for nothing (measured with timers in the worker child)."""
    header = [
        slice_chain(batch_id, iid, ids, priority=priority, app=app, queue=queue)
        for ids in slices(candidate_ids, slice_size)
    ]
    body = canvas.rank_signature(app, iid, priority=priority, immutable=True)
    if len(header) == 1:
        return header[0] | body
    return chord(header, body)


def dispatch_batch(batch_id: str, *, settings: Settings) -> int:
    """Send one chord per item that has not been sent yet; returns how many were sent.

    Each item flips pending -> running in its own committed update before its chord is sent, so a
    redelivered dispatch skips items already sent; the flip checks the batch is still open, so a cancel
    committed while the loop runs stops it before the next item's chord.
    """
    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, batch_id)
        if batch is None or batch.status not in BATCH_OPEN:
            return 0
        priority = celery_priority(batch.priority)
        model, batch_settings = batch.model, batch.settings
        pending = (
            s.execute(
                select(Item.id)
                .where(Item.batch_id == batch_id, Item.status == ItemStatus.PENDING)
                .order_by(Item.index)
            )
            .scalars()
            .all()
        )
    # One routing choice for the whole batch: idle workers steal from a model queue, so it never strands work.
    queue = placement.route(settings.database_url, model, batch_settings) if pending else SLICES_QUEUE
    # Each flip is also guarded by the batch's status, so a cancel committed mid-loop stops the rest: the
    # items left pending are closed by the ranks the cancel sent for them.
    open_batch = select(Batch.id).where(Batch.id == batch_id, Batch.status.in_(BATCH_OPEN)).exists()
    sent = 0
    for iid in pending:
        with session_scope(settings.database_url) as s:
            flipped = s.execute(
                update(Item)
                .where(Item.id == iid, Item.status == ItemStatus.PENDING, open_batch)
                .values(status=ItemStatus.RUNNING)
            ).rowcount
            if not flipped:
                if s.scalar(select(Batch.status).where(Batch.id == batch_id)) not in BATCH_OPEN:
                    break
                continue
            ids = (
                s.execute(
                    select(Candidate.id)
                    .where(Candidate.item_id == iid, Candidate.status == CandidateStatus.PENDING)
                    .order_by(Candidate.index)
                )
                .scalars()
                .all()
            )
        send_item(batch_id, iid, list(ids), settings=settings, priority=priority, queue=queue)
        sent += 1
    return sent


def send_item(
    batch_id: str,
    iid: str,
    candidate_ids: list[str],
    *,
    settings: Settings,
    priority: int,
    queue: str | None = None,
) -> None:
    """One chord for these candidates of the item (or, with none left to do, just its rank).

    Its slices go to ``queue``, or where farm.placement routes the batch now (re-sends by the reaper, top-up
    rounds, retry and resume)."""
    app = app_for(settings)
    if candidate_ids:
        if queue is None:
            queue = placement.route_batch(settings.database_url, batch_id)
        sent = item_chord(
            batch_id,
            iid,
            candidate_ids,
            slice_size=settings.slice_size,
            priority=priority,
            app=app,
            queue=queue,
        ).apply_async()
        release_results(app, sent)
    else:
        canvas.rank_signature(app, iid, priority=priority).apply_async()


def release_results(app: Celery, sent: AsyncResult) -> None:
    """Stop tracking a sent chord's header results in this process.

    Building a chord registers each header result with the Redis result backend as something this process
    awaits (a strong reference and a pub/sub subscription each), and nothing releases them unless it waits.
    Nothing here ever waits (the chord body ranks), so the control worker grew by about 6 KB per item for
    good: 225 -> 285 MB over a second 10,000-item batch, measured with `farm bench --scale`.
    """
    # The registered objects are not the ones ``sent`` links to, so they are found by id (celery 5.5).
    pending = getattr(app.backend, "_pending_results", None) or ()
    for result in getattr(sent.parent, "results", None) or ():
        for mapping in pending:
            for waiter in list((mapping.get(result.id) or {}).values()):
                app.backend.remove_pending_result(waiter)


def cancel(batch_id: str, *, settings: Settings) -> bool:
    """Cancel a batch: pending work is skipped by every stage, a generating slice stops at its next denoising
    step (farm.tasks.interrupt) and other running slices at their next stage, and the batch reads
    "cancelling" until its last item closes, then "cancelled"."""
    with session_scope(settings.database_url) as s:
        changed = s.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status.in_(BATCH_OPEN))
            .values(status=BatchStatus.CANCELLING)
        ).rowcount
        if changed:
            items_unsent = (
                s.execute(select(Item.id).where(Item.batch_id == batch_id, Item.status == ItemStatus.PENDING))
                .scalars()
                .all()
            )
    if changed:
        for iid in items_unsent:
            canvas.rank_signature(app_for(settings), iid).apply_async()
    return bool(changed)
