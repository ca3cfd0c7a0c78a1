"""farm.rank: the chord body; ranks one item from SQL and closes the batch when it is the last."""

from __future__ import annotations

from sqlalchemy import select

from farm import records
from farm.celery_app import app
from farm.config import load_settings
from farm.db import Batch, Candidate, Item, session_scope
from farm.ranking import Contender, rank


@app.task(name="farm.rank")
def rank_item(item_id: str) -> dict:
    """Idempotent: ranks are recomputed from SQL with a deterministic tie-break, and the item flips to done
    (and the batch counter moves) only once, however often this runs."""
    settings = load_settings()
    with session_scope(settings.database_url) as s:
        item = s.get(Item, item_id)
        cfg = s.get(Batch, item.batch_id).settings
        rows = s.scalars(select(Candidate).where(Candidate.item_id == item_id, Candidate.status == "scored")).all()
        contenders = [Contender(c.id, c.index, c.preference, c.alignment, c.pdq_hash) for c in rows]
    weights = cfg["scoring"]["weights"]
    result = rank(
        contenders,
        preference_weight=weights["preference"],
        alignment_weight=weights["alignment"],
        winners=cfg["selection"]["winners"],
        near_duplicate_distance=cfg["moderation"]["near_duplicate_distance"],
    )
    done = records.finish_item(settings.database_url, item_id, ranking=result.order, winners=result.winners,
                               scores=result.scores)
    return {"item": item_id, "winners": done.winners, "batch_closed": done.batch_closed}
