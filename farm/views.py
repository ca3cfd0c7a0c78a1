"""The JSON views of a batch, read with an ORM session: what `farm status --json` prints and the API returns
(``batch_dict``: the batch, its items with their ranking rounds, their candidates), and a batch's candidates
counted by status (``progress``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.db import Batch, Candidate, Item, ItemRound
from farm.states import CANDIDATE_FINAL


def progress(s: Session, batch_id: str) -> dict[str, int]:
    """Candidates of a batch counted by status, plus ``done`` (final) and ``total``."""
    rows = s.execute(
        select(Candidate.status, func.count())
        .where(Candidate.batch_id == batch_id)
        .group_by(Candidate.status)
    ).all()
    counts = Counter({status: n for status, n in rows})
    out = dict(counts)
    out["done"] = sum(counts[s_] for s_ in CANDIDATE_FINAL)
    out["total"] = sum(counts.values())
    return out


def candidate_dict(c: Candidate) -> dict[str, Any]:
    return {
        "id": c.id,
        "index": c.index,
        "round": c.round,
        "seed": c.seed,
        "device": c.device,
        "worker": c.worker,
        "status": c.status,
        "stage": c.stage,
        "attempts": c.attempts,
        "image_path": c.image_path,
        "pdq_hash": c.pdq_hash,
        "verdict": c.verdict,
        "reasons": c.reasons,
        "moderation": c.moderation,
        "alignment": c.alignment,
        "attributes": c.attributes,
        "preference": c.preference,
        "score": c.score,
        "rank": c.rank,
        "is_winner": c.is_winner,
        "timings": c.timings,
        "error": c.error,
    }


def item_rounds(s: Session, batch_id: str) -> dict[str, list[ItemRound]]:
    """The ranking rounds of the batch's items, by item id, each item's in order (the latest last)."""
    found: dict[str, list[ItemRound]] = {}
    for r in s.scalars(
        select(ItemRound)
        .join(Item, Item.id == ItemRound.item_id)
        .where(Item.batch_id == batch_id)
        .order_by(ItemRound.item_id, ItemRound.number)
    ):
        found.setdefault(r.item_id, []).append(r)
    return found


def round_dict(r: ItemRound) -> dict[str, Any]:
    """A round as the JSON views show it. Its per-candidate ranking stays in SQL: the closing round's is
    already in each candidate's ``rank`` and ``score``."""
    return {"number": r.number, "kind": r.kind, "winners": r.winners, "created_at": _iso(r.created_at)}


def batch_dict(s: Session, batch: Batch, *, with_items: bool = True) -> dict[str, Any]:
    """The batch as JSON: what `farm status --json` prints and the API returns."""
    out: dict[str, Any] = {
        "id": batch.id,
        "name": batch.name,
        "status": batch.status,
        "model": batch.model,
        "priority": batch.priority,
        "tags": batch.tags,
        "items_total": batch.items_total,
        "items_done": batch.items_done,
        "candidates_total": batch.candidates_total,
        "progress": progress(s, batch.id),
        "error": batch.error,
        "created_at": _iso(batch.created_at),
        "started_at": _iso(batch.started_at),
        "finished_at": _iso(batch.finished_at),
    }
    if with_items:
        items = s.scalars(select(Item).where(Item.batch_id == batch.id).order_by(Item.index)).all()
        cands = s.scalars(
            select(Candidate)
            .where(Candidate.batch_id == batch.id)
            .order_by(Candidate.item_id, Candidate.index)
        ).all()
        by_item: dict[str, list[dict[str, Any]]] = {}
        for c in cands:
            by_item.setdefault(c.item_id, []).append(candidate_dict(c))
        rounds = item_rounds(s, batch.id)
        out["items"] = [
            {
                "id": it.id,
                "index": it.index,
                "prompt": it.prompt,
                "source": it.source,
                "status": it.status,
                "params": it.params,
                "winners": it.winners,
                "rounds": [round_dict(r) for r in rounds.get(it.id, [])],
                "candidates": by_item.get(it.id, []),
            }
            for it in items
        ]
    return out


def _iso(dt: Any) -> str | None:
    return dt.isoformat() + "Z" if dt else None
