"""Ranking an item in SQL: what a rank reads, the top-up round it may add, the close, the rounds each
records, and ranks of one item that race (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select, update

from farm import dispatch, rounds
from farm.config import load_settings
from farm.db import Candidate, get_engine, migrate, session_scope
from tests import pgutil
from tests.conftest import SLICE_MANIFEST as MANIFEST


def test_rank_view_counts_the_unsettled_and_due_top_ups_in_one_read(slice_ids):
    url, _ = slice_ids
    text = MANIFEST.replace("items:", "selection: {min_accepted: 1}\nitems:")
    manifest, items = dispatch.plan(text, settings=load_settings())
    done = dispatch.create_batch(manifest, items, text, settings=load_settings())
    with session_scope(url) as s:
        ids = sorted(s.scalars(select(Candidate.id).where(Candidate.batch_id == done.batch_id)))
    item_id = ids[0].rsplit("-", 1)[0]
    with session_scope(url) as s:
        s.execute(update(Candidate).where(Candidate.id == ids[0]).values(status="scored", preference=0.5))
        s.execute(update(Candidate).where(Candidate.id == ids[1]).values(status="rejected"))
    view = rounds.rank_view(url, item_id)
    assert view.waiting == 1 and view.batch_status == "queued" and view.prompt == "a kite"
    assert [(c.id, c.preference) for c in view.scored] == [(ids[0], 0.5)]
    assert not view.topup_due()
    with session_scope(url) as s:
        s.execute(update(Candidate).where(Candidate.id == ids[0]).values(status="rejected"))
    short = rounds.rank_view(url, item_id)
    assert short.scored == [] and short.topup_due()
    assert isinstance(rounds.add_topup_round(url, item_id, passed=0, rounds=0), rounds.TopUp)
    after_one = rounds.rank_view(url, item_id)
    assert after_one.rounds == 1 and after_one.waiting == 1 + 2
    with session_scope(url) as s:
        s.execute(update(Candidate).where(Candidate.item_id == item_id).values(status="rejected"))
    assert isinstance(rounds.add_topup_round(url, item_id, passed=0, rounds=1), rounds.TopUp)
    assert not rounds.rank_view(url, item_id).topup_due()  # max_topup_rounds (2) reached


@pytest.mark.postgres
def test_a_cancel_while_the_last_item_is_ranked_on_postgresql_waits_and_never_ends_the_batch_done(
    monkeypatch, tmp_path
):
    """finish_item reads the batch status and closes the batch in one transaction; a cancel committed in
    between used to be overwritten with 'done' (the read took no lock). The cancel runs on a second
    connection while finish_item's transaction is open (its ``during`` hook): it must wait for the batch row,
    then find the batch closed and change nothing."""

    from farm.db import Batch, Item

    url = pgutil.create_database("farm_close")
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    monkeypatch.setenv("FARM_DATABASE_URL", url)
    settings = load_settings()
    try:
        migrate(url)
        manifest, items = dispatch.plan(MANIFEST, settings=settings)
        batch_id = dispatch.create_batch(manifest, items, MANIFEST, settings=settings).batch_id
        with session_scope(url) as s:
            s.execute(update(Batch).where(Batch.id == batch_id).values(status="running"))
            s.execute(update(Item).where(Item.batch_id == batch_id).values(status="running"))
            s.execute(update(Candidate).where(Candidate.batch_id == batch_id).values(status="scored"))
            item_id = s.scalar(select(Item.id).where(Item.batch_id == batch_id))
        cancelled: list[bool] = []
        canceller = threading.Thread(
            target=lambda: cancelled.append(dispatch.cancel(batch_id, settings=settings))
        )

        def cancel_meanwhile() -> None:
            canceller.start()
            _lock_wait_or_end(url, canceller)

        rounds.finish_item(
            url, item_id, ranking=[], winners=[], scores={}, rounds=0, during=cancel_meanwhile
        )
        canceller.join(10)
        assert not canceller.is_alive()
        with session_scope(url) as s:
            status = s.get(Batch, batch_id).status
        assert (status, cancelled) == ("done", [False]), "a cancel that took effect must not end 'done'"
    finally:
        get_engine(url).dispose()
        pgutil.drop_database(url)


SHORT = MANIFEST.replace("items:", "selection: {min_accepted: 1}\nitems:")


def _short_item(url: str) -> str:
    """A running batch of one item whose three first-round candidates were all rejected: a top-up is due."""
    from farm.db import Batch, Item

    manifest, items = dispatch.plan(SHORT, settings=load_settings())
    batch_id = dispatch.create_batch(manifest, items, SHORT, settings=load_settings()).batch_id
    with session_scope(url) as s:
        s.execute(update(Batch).where(Batch.id == batch_id).values(status="running"))
        s.execute(update(Candidate).where(Candidate.batch_id == batch_id).values(status="rejected"))
        return s.scalar(select(Item.id).where(Item.batch_id == batch_id))


def _item_state(url: str, item_id: str) -> tuple:
    """(item status, rounds, candidates_total; batch candidates_total, items_done; each candidate's round,
    status and error)."""
    from farm.db import Batch, Item

    with session_scope(url) as s:
        item = s.get(Item, item_id)
        batch = s.get(Batch, item.batch_id)
        cands = s.scalars(select(Candidate).where(Candidate.item_id == item_id).order_by(Candidate.index))
        return (
            (item.status, item.rounds, item.candidates_total),
            (batch.candidates_total, batch.items_done),
            [(c.round, c.status, c.error) for c in cands],
        )


def _kept_rounds(url: str, item_id: str) -> list[tuple[int, str, list[str]]]:
    """The item's rounds as recorded: (number, kind, winners), oldest first."""
    from farm.db import ItemRound

    with session_scope(url) as s:
        rows = s.scalars(select(ItemRound).where(ItemRound.item_id == item_id).order_by(ItemRound.number))
        return [(r.number, r.kind, r.winners) for r in rows]


#: One top-up round on top of the three rejected: two new candidates (2 x shortfall of 1), pending.
ONE_ROUND = [(0, "rejected", None)] * 3 + [(1, "pending", None)] * 2


def test_two_ranks_of_a_short_item_add_one_round_whichever_reads_the_item_when(slice_ids):
    """Review 5a: two ranks of one item (the original chord's and a lease re-send's) both see it short. The
    one that comes second, with its view from before the first's round, must add no round of its own (it
    used to read the fresh round count and add a second round for the same shortfall)."""
    url, _ = slice_ids
    item_id = _short_item(url)
    first, second = rounds.rank_view(url, item_id), rounds.rank_view(url, item_id)
    assert first.topup_due() and second.topup_due()

    topup = rounds.add_topup_round(url, item_id, passed=0, rounds=first.rounds)
    assert isinstance(topup, rounds.TopUp) and topup.round == 1 and len(topup.candidate_ids) == 2
    assert rounds.add_topup_round(url, item_id, passed=0, rounds=second.rounds) is rounds.RACED

    assert _item_state(url, item_id) == (("pending", 1, 5), (5, 0), ONE_ROUND)
    assert _kept_rounds(url, item_id) == [(0, "top_up", [])], "the raced rank records no round"


def test_a_rank_whose_view_predates_a_new_round_neither_fails_its_candidates_nor_closes_the_item(slice_ids):
    """Review 5b: a rank holding a view from before another rank's top-up round must not close the item:
    that used to fail the new round's pending candidates ("ranked before this candidate finished") and end
    the item done. The new round's own rank, with a fresh view, closes it as usual."""
    url, _ = slice_ids
    item_id = _short_item(url)
    stale = rounds.rank_view(url, item_id)
    assert isinstance(rounds.add_topup_round(url, item_id, passed=0, rounds=stale.rounds), rounds.TopUp)

    out = rounds.finish_item(url, item_id, ranking=[], winners=[], scores={}, rounds=stale.rounds)
    assert out is rounds.RACED
    assert _item_state(url, item_id) == (("pending", 1, 5), (5, 0), ONE_ROUND)
    assert _kept_rounds(url, item_id) == [(0, "top_up", [])]

    with session_scope(url) as s:
        s.execute(update(Candidate).where(Candidate.item_id == item_id).values(status="rejected"))
    fresh = rounds.rank_view(url, item_id)
    done = rounds.finish_item(url, item_id, ranking=[], winners=[], scores={}, rounds=fresh.rounds)
    assert isinstance(done, rounds.Ranked) and done.batch_closed
    assert _item_state(url, item_id)[:2] == (("done", 1, 5), (5, 1))
    again = rounds.finish_item(url, item_id, ranking=[], winners=[], scores={}, rounds=fresh.rounds)
    assert again is rounds.RACED, "an item closed since the view is left as it is"
    assert _kept_rounds(url, item_id) == [(0, "top_up", []), (1, "ranked", [])]


def _lock_wait_or_end(url: str, thread: threading.Thread) -> None:
    """Return once a session of this database waits for a row lock, or ``thread`` ended."""
    from sqlalchemy import text

    with get_engine(url).connect() as watch:
        for _ in range(200):
            waiting = watch.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            ).scalar()
            if waiting or not thread.is_alive():
                return
            watch.rollback()
            thread.join(0.05)
    raise AssertionError("the second transaction neither finished nor waited for a lock")


@pytest.mark.postgres
@pytest.mark.parametrize("first", ["topup", "finish"])
def test_a_top_up_and_a_finish_of_one_item_interleaved_on_postgresql_wait_and_never_deadlock(
    first, monkeypatch, tmp_path
):
    """Review 5c: finish_item locked batch then item, add_topup_round item then batch, so two ranks of one
    item, one topping up and one finishing, deadlocked (DeadlockDetected; retried, but it should not
    happen). Each runs on its own connection, the first held open at its midpoint (add_topup_round choosing
    seeds, finish_item's ``during`` hook) until the second waits for a lock. Both take the batch row first
    now: the second waits, then finds the item changed since its view and writes nothing."""
    import farm.manifest

    url = pgutil.create_database("farm_order")
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    monkeypatch.setenv("FARM_DATABASE_URL", url)
    out: dict[str, object] = {}

    def topup() -> None:
        try:
            out["topup"] = rounds.add_topup_round(url, item_id, passed=0, rounds=0)
        except Exception as exc:  # reported by the assertion below, DeadlockDetected included
            out["topup"] = exc

    def finish(during=None) -> None:
        try:
            out["finish"] = rounds.finish_item(
                url, item_id, ranking=[], winners=[], scores={}, rounds=0, during=during
            )
        except Exception as exc:
            out["finish"] = exc

    try:
        migrate(url)
        item_id = _short_item(url)
        if first == "topup":
            seeds, reached, go = farm.manifest.candidate_seeds, threading.Event(), threading.Event()

            def seeds_held_open(*args, **kwargs):
                reached.set()
                go.wait(20)
                return seeds(*args, **kwargs)

            monkeypatch.setattr(farm.manifest, "candidate_seeds", seeds_held_open)
            topping = threading.Thread(target=topup)
            topping.start()
            assert reached.wait(20)
            finishing = threading.Thread(target=finish)
            finishing.start()
            _lock_wait_or_end(url, finishing)
            go.set()
            topping.join(20)
            finishing.join(20)
            assert isinstance(out["topup"], rounds.TopUp) and out["finish"] is rounds.RACED, out
            assert _item_state(url, item_id) == (("pending", 1, 5), (5, 0), ONE_ROUND)
            assert _kept_rounds(url, item_id) == [(0, "top_up", [])]
        else:
            topping = threading.Thread(target=topup)

            def topup_meanwhile() -> None:
                topping.start()
                _lock_wait_or_end(url, topping)

            finish(during=topup_meanwhile)
            topping.join(20)
            assert isinstance(out["finish"], rounds.Ranked) and out["topup"] is rounds.RACED, out
            assert _item_state(url, item_id)[:2] == (("done", 0, 3), (3, 1))
            assert _kept_rounds(url, item_id) == [(0, "ranked", [])]
    finally:
        get_engine(url).dispose()
        pgutil.drop_database(url)
