"""The SQL reads behind the pages and the API, shaped for display (no Flask here, only farm's models).

Progress figures come from the candidates' rows (farm.views.progress); throughput is final candidates per
second since the batch started, and the ETA extrapolates it over what is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.db import Batch, Candidate, Item, ItemRound, Worker, utcnow
from farm.manifest import stored_manifest
from farm.ranking import Contender, composite
from farm.states import BATCH_OPEN, CANDIDATE_FINAL, CANDIDATE_IN_PROGRESS, CandidateStatus
from farm.views import batch_dict

#: The filter for every candidate not final yet; the others are the final statuses themselves.
IN_PROGRESS_FILTER = "in_progress"
# Candidate filters on the batch page: a final status, or "in progress" for everything not final yet.
CANDIDATE_FILTERS = (*CANDIDATE_FINAL, IN_PROGRESS_FILTER)


def rates(batch: Batch, done: int, total: int, *, now: datetime | None = None) -> dict[str, float | None]:
    """Throughput (final candidates per second) and the seconds left at that pace (None where unknown)."""
    if batch.started_at is None or done <= 0:
        return {"throughput": None, "eta_seconds": None}
    end = batch.finished_at or now or utcnow()
    elapsed = max((end - batch.started_at).total_seconds(), 1e-3)
    throughput = done / elapsed
    left = max(total - done, 0)
    eta = None if batch.status not in BATCH_OPEN else (left / throughput if left else 0.0)
    return {"throughput": round(throughput, 4), "eta_seconds": None if eta is None else round(eta, 1)}


def batch_summary(s: Session, batch: Batch) -> dict[str, Any]:
    """views.batch_dict without items, plus throughput and ETA: one row of the batches list."""
    out = batch_dict(s, batch, with_items=False)
    p = out["progress"]
    out.update(rates(batch, p["done"], p["total"]))
    return out


def list_batches(
    s: Session, *, limit: int = 100, offset: int = 0, status: str | None = None
) -> list[dict[str, Any]]:
    query = select(Batch).order_by(Batch.created_at.desc(), Batch.id)
    if status:
        query = query.where(Batch.status == status)
    return [batch_summary(s, b) for b in s.scalars(query.limit(limit).offset(offset))]


def count_batches(s: Session, *, status: str | None = None) -> int:
    query = select(func.count()).select_from(Batch)
    if status:
        query = query.where(Batch.status == status)
    return s.scalar(query) or 0


def rejected_by(c: Candidate) -> list[str]:
    """The layers that rejected a candidate, from its reasons ("layer: why") and moderation verdicts."""
    layers = [m.get("layer", "?") for m in (c.moderation or []) if m.get("verdict") == "reject"]
    for reason in c.reasons or []:
        layer, sep, _ = str(reason).partition(":")
        if sep and layer.strip() and layer.strip() not in layers:
            layers.append(layer.strip())
    return layers


@dataclass
class ItemView:
    item: Item
    candidates: list[Candidate] = field(default_factory=list)
    winners: list[Candidate] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    #: The item's ranking rounds, oldest first (the page names their kinds when there was more than one).
    rounds: list[ItemRound] = field(default_factory=list)


@dataclass
class ItemPage:
    items: list[ItemView]
    page: int
    pages: int
    total: int


def item_page(s: Session, batch_id: str, *, status: str | None, page: int, per_page: int = 50) -> ItemPage:
    """One page of a batch's items with their candidates; ``status`` keeps the items having such candidates
    and shows only those candidates."""
    items_q = select(Item).where(Item.batch_id == batch_id)
    cand_filter = _status_clause(status)
    if cand_filter is not None:
        having = select(Candidate.item_id).where(Candidate.batch_id == batch_id, cand_filter)
        items_q = items_q.where(Item.id.in_(having))
    total = s.scalar(select(func.count()).select_from(items_q.subquery())) or 0
    pages = max(1, -(-total // per_page))
    page = min(max(1, page), pages)
    items = s.scalars(items_q.order_by(Item.index).limit(per_page).offset((page - 1) * per_page)).all()
    views = {it.id: ItemView(it) for it in items}
    if views:
        cands = s.scalars(
            select(Candidate)
            .where(Candidate.item_id.in_(list(views)))
            .order_by(Candidate.item_id, Candidate.index)
        ).all()
        for c in cands:
            view = views[c.item_id]
            view.counts[c.status] = view.counts.get(c.status, 0) + 1
            if c.is_winner:
                view.winners.append(c)
            if cand_filter is None or _matches(c, status):
                view.candidates.append(c)
        for r in s.scalars(
            select(ItemRound).where(ItemRound.item_id.in_(list(views))).order_by(ItemRound.number)
        ):
            views[r.item_id].rounds.append(r)
        for view in views.values():
            order = {cid: n for n, cid in enumerate(view.item.winners or [])}
            view.winners.sort(key=lambda c: order.get(c.id, len(order)))
    return ItemPage([views[it.id] for it in items], page, pages, total)


def _status_clause(status: str | None) -> Any:
    if not status:
        return None
    if status == IN_PROGRESS_FILTER:
        return Candidate.status.in_(CANDIDATE_IN_PROGRESS)
    return Candidate.status == status


def _matches(c: Candidate, status: str | None) -> bool:
    return c.status in CANDIDATE_IN_PROGRESS if status == IN_PROGRESS_FILTER else c.status == status


def winners(s: Session, batch_id: str) -> list[tuple[Item, Candidate]]:
    """The batch's winners with their items, in item order then the item's winner order."""
    rows = s.execute(
        select(Item, Candidate)
        .join(Candidate, Candidate.item_id == Item.id)
        .where(Item.batch_id == batch_id, Candidate.is_winner.is_(True))
        .order_by(Item.index, Candidate.rank, Candidate.index)
    ).all()
    return [(it, c) for it, c in rows]


@dataclass
class ScoreSpread:
    passed: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    unscored_rejected: int = 0


def scores(s: Session, batch: Batch) -> ScoreSpread:
    """Composite scores of the batch's passed and rejected candidates.

    Passed candidates carry the score the rank stage wrote. Rejected ones never reach ranking, so theirs is
    computed with the same rule (farm.ranking.composite, the batch's weights) from what they were measured on;
    those rejected before any measurement are only counted.
    """
    weights = stored_manifest(batch.settings).scoring.weights
    pw, aw = weights.preference, weights.alignment
    rows = s.execute(
        select(Candidate.id, Candidate.index, Candidate.status, Candidate.score, Candidate.preference,
               Candidate.alignment)
        .where(Candidate.batch_id == batch.id,
               Candidate.status.in_((CandidateStatus.PASSED, CandidateStatus.REJECTED)))
    ).all()
    out = ScoreSpread()
    for cid, index, status, score, preference, alignment in rows:
        if score is None and (preference is not None or alignment is not None):
            score = composite(Contender(cid, index, preference, alignment, None),
                              preference_weight=pw, alignment_weight=aw)
        if score is None:
            out.unscored_rejected += status == CandidateStatus.REJECTED
            continue
        (out.passed if status == CandidateStatus.PASSED else out.rejected).append(float(score))
    return out


def worker_rows(s: Session, *, now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or utcnow()
    out = []
    for w in s.scalars(select(Worker).order_by(Worker.queue, Worker.name)):
        out.append(
            {
                "name": w.name,
                "queue": w.queue,
                "device": w.device,
                "pid": w.pid,
                "hostname": w.hostname,
                "models": dict(w.models or {}),
                "loaded": list(w.loaded or []),
                "queues": list(w.queues or []),
                "current": w.current,
                # The denoising step the slice in flight has reached, of how many (None between slices).
                "step": w.step,
                "steps": w.steps,
                "tasks_done": w.tasks_done,
                "started_at": _iso(w.started_at),
                "heartbeat_at": _iso(w.heartbeat_at),
                "heartbeat_age_seconds": round((now - w.heartbeat_at).total_seconds(), 1),
            }
        )
    return out


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() + "Z" if dt else None
