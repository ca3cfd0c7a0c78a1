"""farm.rank run again on an item that is already closed, after a real batch through the shared workers.

A second rank is normal: a chord whose slice was re-sent by the reaper still fires when the original message
comes back after the visibility timeout, and a rank redelivered after its commit (its worker died before the
ack) runs again. It must leave the item as the first rank left it.
"""

from __future__ import annotations

import pytest

from farm.tasks.rank import rank_item
from tests.tasks.test_end_to_end import _rows

pytestmark = pytest.mark.slow

MANIFEST = """
name: rank-again
model: tiny
defaults: {candidates: 3, steps: 2, size: 64x64, seed: 11}
selection: {winners: 1, min_accepted: 1, max_topup_rounds: 1}
items:
  - a red fox in the snow
  - a lighthouse at dusk
"""


def _snapshot(settings, batch_id: str) -> tuple:
    batch, items, cands = _rows(settings, batch_id)
    return (
        (batch.status, batch.items_done, batch.candidates_total),
        [(it.id, it.status, it.rounds, it.winners) for it in items],
        [(c.id, c.status, c.rank, c.is_winner, c.score) for c in cands],
    )


def test_a_rank_delivered_again_after_its_item_closed_keeps_ranks_winners_and_rounds(settings, run_batch):
    batch_id = run_batch(MANIFEST)
    before = _snapshot(settings, batch_id)
    (_, items, cands) = before
    assert any(winners for *_, winners in items), "the seeded tiny models pass some candidates"
    assert any(is_winner for *_, is_winner, _score in cands)

    for item_id, *_ in items:
        # The task's own code, run here on the farm's database (Task.apply), as a redelivery would run it.
        out = rank_item.apply(args=(item_id,)).get()
        assert out["item"] == item_id and not out.get("topup_round"), out

    assert _snapshot(settings, batch_id) == before


def test_a_candidate_closed_before_its_image_was_stored_names_no_image():
    """FARM_QC=worker: generate records the PNG's name when it hands the image off, and the QC task stores
    it. A batch cancelled meanwhile is ranked at once and its QC task stores nothing, so the closed row must
    not name a file that never came (found by `farm chaos`: 1 row of 350 in a 30-minute soak)."""
    from sqlalchemy import update

    from farm import dispatch
    from farm.artifacts import store_for
    from farm.config import load_settings
    from farm.db import Batch, Candidate, migrate, session_scope

    settings = load_settings()
    migrate(settings.database_url)
    manifest, items = dispatch.plan("name: qc-cancel\nmodel: tiny\nitems: [a fox]\n", settings=settings)
    batch_id = dispatch.create_batch(manifest, items, "", settings=settings).batch_id
    item_id = dispatch.item_id(batch_id, 0)
    handed, stored = dispatch.candidate_id(item_id, 0), dispatch.candidate_id(item_id, 1)
    store_for(settings).put(f"{batch_id}/{stored}.png", b"an image stored before the cancel", "image/png")
    with session_scope(settings.database_url) as s:
        for cid in (handed, stored):
            s.execute(
                update(Candidate)
                .where(Candidate.id == cid)
                .values(status="generated", image_path=f"{batch_id}/{cid}.png")
            )
        s.execute(update(Batch).where(Batch.id == batch_id).values(status="cancelling"))

    rank_item.apply(args=(item_id,)).get()

    with session_scope(settings.database_url) as s:
        rows = {c.id: c for c in s.query(Candidate).where(Candidate.item_id == item_id)}
    assert rows[handed].status == "cancelled" and rows[handed].image_path is None
    assert rows[stored].status == "cancelled" and rows[stored].image_path == f"{batch_id}/{stored}.png"


@pytest.mark.parametrize("max_rounds", [1, 2])
def test_a_rank_whose_view_another_rank_overtook_with_a_round_writes_nothing(monkeypatch, max_rounds):
    """Review 5a/5b: two ranks of one short item (each lease re-send makes a chord, and so a rank, of its
    own). The other rank added round 1 after this one read the item. This one must leave the item to that
    round: with rounds to spare it used to add a second round for the same shortfall (5a); with none left
    (max_topup_rounds 1) it closed the item, failing round 1's pending candidates as "ranked before this
    candidate finished" (5b)."""
    from sqlalchemy import select, update

    from farm import dispatch, records
    from farm.config import load_settings
    from farm.db import Batch, Candidate, Item, migrate, session_scope

    settings = load_settings()
    migrate(settings.database_url)
    text = (
        f"name: overtaken\nmodel: tiny\ndefaults: {{candidates: 3}}\n"
        f"selection: {{min_accepted: 1, max_topup_rounds: {max_rounds}}}\nitems: [a fox]\n"
    )
    manifest, items = dispatch.plan(text, settings=settings)
    batch_id = dispatch.create_batch(manifest, items, text, settings=settings).batch_id
    item_id = dispatch.item_id(batch_id, 0)
    with session_scope(settings.database_url) as s:
        s.execute(update(Batch).where(Batch.id == batch_id).values(status="running"))
        s.execute(update(Candidate).where(Candidate.item_id == item_id).values(status="rejected"))
    stale = records.rank_view(settings.database_url, item_id)
    assert isinstance(
        records.add_topup_round(settings.database_url, item_id, passed=0, rounds=stale.rounds), records.TopUp
    )
    sent: list[tuple] = []
    monkeypatch.setattr(records, "rank_view", lambda url, iid: stale)
    monkeypatch.setattr(dispatch, "send_item", lambda *args, **kwargs: sent.append(args))

    out = rank_item.apply(args=(item_id,)).get()

    assert out == {"item": item_id, "raced": True} and sent == []
    with session_scope(settings.database_url) as s:
        item = s.get(Item, item_id)
        rows = s.execute(
            select(Candidate.round, Candidate.status, Candidate.error)
            .where(Candidate.item_id == item_id)
            .order_by(Candidate.index)
        ).all()
    assert (item.status, item.rounds) == ("pending", 1)
    assert [tuple(r) for r in rows] == [(0, "rejected", None)] * 3 + [(1, "pending", None)] * 2
