"""farm.rank run again on an item that is already closed, after a real batch through the shared workers.

A second rank is normal: a chord whose slice was re-sent by the reaper still fires when the original message
comes back after the visibility timeout, and a rank redelivered after its commit (its worker died before the
ack) runs again. It must leave the item as the first rank left it, its rounds included. The tests without
workers run the task's code (Task.apply) on rows written as the stages write them.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from farm import dispatch, views
from farm.config import load_settings
from farm.db import Batch, Candidate, Item, ItemRound, migrate, session_scope
from farm.tasks.rank import rank_item
from tests.tasks.test_end_to_end import _rows

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
        _rounds(settings.database_url, batch_id),
    )


def _rounds(url: str, batch_id: str) -> list[list[tuple]]:
    """Each item's rounds as the JSON views show them: (number, kind, winners), oldest first."""
    with session_scope(url) as s:
        items = views.batch_dict(s, s.get(Batch, batch_id))["items"]
    return [[(r["number"], r["kind"], r["winners"]) for r in it["rounds"]] for it in items]


@pytest.mark.slow
def test_a_rank_delivered_again_after_its_item_closed_keeps_ranks_winners_and_rounds(settings, run_batch):
    batch_id = run_batch(MANIFEST)
    before = _snapshot(settings, batch_id)
    (_, items, cands, rounds) = before
    assert any(winners for *_, winners in items), "the seeded tiny models pass some candidates"
    assert any(is_winner for *_, is_winner, _score in cands)

    for item_id, *_ in items:
        # The task's own code, run here on the farm's database (Task.apply), as a redelivery would run it.
        out = rank_item.apply(args=(item_id,)).get()
        assert out["item"] == item_id and not out.get("topup_round"), out

    assert _snapshot(settings, batch_id) == before
    assert all(kept and kept[-1][1] == "ranked" for kept in rounds), rounds
    latest = [kept[-1][2] for kept in rounds]
    assert [winners for *_, winners in items] == latest, "an item's winners are its latest round's"


TOPPED = """
name: topped
model: tiny
defaults: {candidates: 3, seed: 5}
selection: {winners: 1, min_accepted: 3, max_topup_rounds: 1}
items: [a fox]
"""


def _score(url: str, outcomes: dict[str, float | None]) -> None:
    """The stages' ends: a preference, scored; None, rejected."""
    from sqlalchemy import update

    with session_scope(url) as s:
        for cid, preference in outcomes.items():
            status = "rejected" if preference is None else "scored"
            values = {"status": status, "preference": preference}
            s.execute(update(Candidate).where(Candidate.id == cid).values(**values))


def test_a_short_item_records_its_top_up_round_then_the_round_that_closes_it(monkeypatch, tmp_path):
    """Each rank's decision is kept as a round: the top-up's ranking of the first candidates (lost before,
    when the close ranked the new ones with them), then the close. A rank delivered again adds none."""
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    url = settings.database_url
    migrate(url)
    sent: list[list[str]] = []
    monkeypatch.setattr(dispatch, "send_item", lambda _b, _i, cids, **_kw: sent.append(list(cids)))
    manifest, items = dispatch.plan(TOPPED, settings=settings)
    batch_id = dispatch.create_batch(manifest, items, TOPPED, settings=settings).batch_id
    item_id = dispatch.item_id(batch_id, 0)
    first = [dispatch.candidate_id(item_id, i) for i in range(3)]
    _score(url, {first[0]: 0.2, first[1]: 0.6, first[2]: None})

    assert rank_item.apply(args=(item_id,)).get()["topup_round"] == 1
    (added,) = sent
    assert _rounds(url, batch_id) == [[(0, "top_up", [first[1]])]]
    _score(url, {added[0]: None, added[1]: 0.9})
    assert rank_item.apply(args=(item_id,)).get()["winners"] == [added[1]]
    assert rank_item.apply(args=(item_id,)).get()["already_closed"]

    assert _rounds(url, batch_id) == [[(0, "top_up", [first[1]]), (1, "ranked", [added[1]])]]
    with session_scope(url) as s:
        kept = s.scalars(select(ItemRound).where(ItemRound.item_id == item_id).order_by(ItemRound.number))
        rankings = [({cid: r["rank"] for cid, r in kr.ranking.items()}, kr.considered) for kr in kept]
        assert s.get(Item, item_id).winners == [added[1]]
    assert rankings == [({first[1]: 1, first[0]: 2}, 2), ({added[1]: 1, first[1]: 2, first[0]: 3}, 3)]


def _one_item_batch(rows: list[tuple[str, bool]], stored: list[int]) -> tuple[object, str, list[str]]:
    """A batch of one item written to SQL as dispatch writes it, then candidate ``i`` given the status
    ``rows[i][0]`` and, where ``rows[i][1]``, the name of its image; the images of ``stored`` are put in the
    store. The batch is being cancelled, so farm.rank closes it at once. Returns settings, item and ids."""
    from sqlalchemy import update

    from farm import dispatch
    from farm.artifacts import store_for
    from farm.config import load_settings
    from farm.db import Batch, Candidate, migrate, session_scope

    settings = load_settings()
    migrate(settings.database_url)
    text = f"name: closing\nmodel: tiny\ndefaults: {{candidates: {len(rows)}}}\nitems: [a fox]\n"
    manifest, items = dispatch.plan(text, settings=settings)
    batch_id = dispatch.create_batch(manifest, items, "", settings=settings).batch_id
    item_id = dispatch.item_id(batch_id, 0)
    ids = [dispatch.candidate_id(item_id, i) for i in range(len(rows))]
    store = store_for(settings)
    for i in stored:
        store.put(f"{batch_id}/{ids[i]}.png", b"an image", "image/png")
        store.put(f"{batch_id}/{ids[i]}.json", b"{}", "application/json")
    with session_scope(settings.database_url) as s:
        for cid, (status, named) in zip(ids, rows, strict=True):
            image = f"{batch_id}/{cid}.png" if named else None
            s.execute(update(Candidate).where(Candidate.id == cid).values(status=status, image_path=image))
        s.execute(update(Batch).where(Batch.id == batch_id).values(status="cancelling"))
    return settings, item_id, ids


def _closed_rows(settings, item_id: str) -> dict:
    from farm.db import Candidate, session_scope

    with session_scope(settings.database_url) as s:
        rows = s.query(Candidate).where(Candidate.item_id == item_id)
        return {c.id: (c.status, c.image_path) for c in rows}


def test_a_candidate_closed_before_its_image_was_stored_names_no_image():
    """FARM_QC=worker: generate records the PNG's name when it hands the image off, and the QC task stores
    it. A batch cancelled meanwhile is ranked at once and its QC task stores nothing, so the closed row must
    not name a file that never came (found by `farm chaos`: 1 row of 350 in a 30-minute soak)."""
    settings, item_id, ids = _one_item_batch([("generated", True), ("generated", True)], stored=[1])
    batch = item_id.rsplit("-", 1)[0]

    rank_item.apply(args=(item_id,)).get()

    rows = _closed_rows(settings, item_id)
    assert rows[ids[0]] == ("cancelled", None)
    assert rows[ids[1]] == ("cancelled", f"{batch}/{ids[1]}.png")


def test_files_no_row_names_are_removed_when_the_batch_closes():
    """A worker killed (or fenced off by its lease) between writing a candidate's PNG and committing its row
    leaves a file no row names; the candidate's next generation would overwrite it, but a batch cancelled
    first has none (found by `farm chaos` on PostgreSQL: 2 orphan files in a 30-minute soak)."""
    from farm.artifacts import store_for

    settings, item_id, ids = _one_item_batch([("scored", True), ("pending", False)], stored=[0, 1])
    batch = item_id.rsplit("-", 1)[0]

    rank_item.apply(args=(item_id,)).get()

    assert store_for(settings).names(batch) == [f"{batch}/{ids[0]}.json", f"{batch}/{ids[0]}.png"]
    assert _closed_rows(settings, item_id)[ids[1]] == ("cancelled", None)
