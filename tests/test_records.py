"""The stage records a device task writes: delivery counts, guarded results, one stage handing to the next."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import select, update

from farm import dispatch, records, rounds
from farm.config import load_settings
from farm.db import Candidate, get_engine, migrate, session_scope, utcnow
from farm.procs import alive
from farm.tasks.lease import gone, owner_name
from tests import pgutil
from tests.conftest import SLICE_MANIFEST as MANIFEST

CHECKS = ("moderate", "validate", "score")


def _rows(url: str, ids: list[str]) -> dict[str, Candidate]:
    with session_scope(url) as s:
        return {c.id: c for c in s.scalars(select(Candidate).where(Candidate.id.in_(ids)))}


def _checks_started(url: str, ids: list[str]) -> dict[str, records.StagedCandidate]:
    """The slice generated, then delivered again: its candidates as the task holds them."""
    with session_scope(url) as s:
        s.execute(update(Candidate).where(Candidate.id.in_(ids)).values(status="generated"))
    return {c.id: c for c in records.begin_stages(url, ids, CHECKS, max_attempts=3).todo}


def test_a_delivery_counts_each_candidate_against_the_stage_it_enters(slice_ids):
    url, ids = slice_ids
    with session_scope(url) as s:
        s.execute(update(Candidate).where(Candidate.id == ids[1]).values(status="moderated"))
        s.execute(update(Candidate).where(Candidate.id == ids[2]).values(status="failed"))
    start = records.begin_stages(url, ids, ("generate",), max_attempts=3)
    assert [c.id for c in start.todo] == [ids[0]]
    start = records.begin_stages(url, ids, CHECKS, max_attempts=3)
    assert [c.id for c in start.todo] == [ids[1]]
    rows = _rows(url, ids)
    assert rows[ids[0]].stage_attempts == {"generate": 1} and rows[ids[0]].attempts == 1
    assert rows[ids[1]].stage_attempts == {"validate": 1}
    assert rows[ids[2]].stage_attempts == {} and rows[ids[2]].status == "failed"


def test_a_stage_write_counts_the_next_stage_as_started_and_updates_the_candidates_in_hand(slice_ids):
    url, ids = slice_ids
    cands = _checks_started(url, ids)
    results = {
        ids[0]: {"status": "moderated", "verdict": "passed", "pdq_hash": "ab"},
        ids[1]: {"status": "rejected", "verdict": "rejected", "reasons": ["nudenet: too much"]},
        ids[2]: records.failure("moderate", "boom"),
    }
    (written,) = records.apply_stages(
        url, [records.StageWrite("moderate", results, {"s": 0.5}, started=cands, entering="validate")]
    )
    assert {c.id for c in written} == set(ids)
    passed = cands[ids[0]]
    assert (passed.status, passed.pdq_hash) == ("moderated", "ab")
    assert passed.stage_attempts == {"moderate": 1, "validate": 1} and passed.attempts == 2
    assert passed.timings == {"moderate": {"s": 0.5}}
    rows = _rows(url, ids)
    assert rows[ids[0]].stage_attempts == {"moderate": 1, "validate": 1} and rows[ids[0]].attempts == 2
    # Only a candidate that goes on is counted in the next stage.
    assert rows[ids[1]].stage_attempts == {"moderate": 1} and rows[ids[1]].status == "rejected"
    assert rows[ids[2]].stage_attempts == {"moderate": 1} and rows[ids[2]].error == "moderate: boom"


def test_a_result_for_a_candidate_another_delivery_advanced_is_not_written_nor_handed_on(slice_ids):
    url, ids = slice_ids
    cands = _checks_started(url, ids)
    with session_scope(url) as s:  # the other delivery finished moderating ids[0] meanwhile
        s.execute(update(Candidate).where(Candidate.id == ids[0]).values(status="moderated", verdict="flag"))
    results = {cid: {"status": "moderated", "verdict": "passed"} for cid in ids}
    (written,) = records.apply_stages(
        url, [records.StageWrite("moderate", results, {"s": 0.1}, started=cands, entering="validate")]
    )
    assert {c.id for c in written} == set(ids[1:])
    assert cands[ids[0]].status == "generated"
    assert _rows(url, ids)[ids[0]].verdict == "flag"


def test_a_candidate_started_past_the_cap_in_a_later_stage_is_failed_naming_that_stage(slice_ids):
    url, ids = slice_ids
    with session_scope(url) as s:
        s.execute(
            update(Candidate)
            .where(Candidate.id == ids[0])
            .values(status="moderated", stage_attempts={"moderate": 1, "validate": 2})
        )
    start = records.begin_stages(url, [ids[0]], CHECKS, max_attempts=2)
    assert start.todo == []
    row = _rows(url, ids)[ids[0]]
    assert (row.status, row.stage) == ("failed", "validate")
    assert "validate was started 2 times" in row.error and "FARM_MAX_ATTEMPTS=2" in row.error


def test_a_delivery_and_a_rank_read_the_batch_settings_once_as_the_parsed_manifest(slice_ids, monkeypatch):
    import farm.manifest

    url, ids = slice_ids
    manifest, _ = dispatch.plan(MANIFEST, settings=load_settings())
    reads = []
    stored = farm.manifest.stored_manifest
    monkeypatch.setattr(farm.manifest, "stored_manifest", lambda cfg: reads.append(1) or stored(cfg))
    start = records.begin_stages(url, ids, ("generate",), max_attempts=3)
    assert start.config == manifest and start.config is start.config
    assert start.config.defaults.steps == 1 and len(reads) == 1
    assert rounds.rank_view(url, ids[0].rsplit("-", 1)[0]).config == manifest


@pytest.mark.postgres
def test_hash_writes_of_one_batch_wait_for_each_other_on_postgresql_and_other_batches_do_not():
    url = pgutil.create_database("farm_lock")
    got: list[str] = []

    def check(batch_id: str) -> None:
        with get_engine(url).begin() as conn:
            records.lock_batch_hashes(conn, batch_id)
            got.append(batch_id)

    try:
        with get_engine(url).begin() as first:
            records.lock_batch_hashes(first, "batch-a")
            other = threading.Thread(target=check, args=("batch-b",))
            other.start()
            other.join(10)
            assert got == ["batch-b"], "another batch's check does not wait"
            same = threading.Thread(target=check, args=("batch-a",))
            same.start()
            same.join(1.0)
            assert same.is_alive() and got == ["batch-b"], "the same batch waits for the first transaction"
        same.join(10)
        assert got == ["batch-b", "batch-a"]
    finally:
        get_engine(url).dispose()
        pgutil.drop_database(url)


def _claim(owner: str, seconds: float = 60.0) -> records.Claim:
    return records.Claim(owner=owner, seconds=seconds)


def _expire(url: str, ids: list[str]) -> None:
    """The holder stopped renewing: its lease is past its expiry."""
    with session_scope(url) as s:
        s.execute(
            update(Candidate)
            .where(Candidate.id.in_(ids))
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def _moderated(cands: dict[str, records.StagedCandidate]) -> records.StageWrite:
    results = {cid: {"status": "moderated", "verdict": "passed"} for cid in cands}
    return records.StageWrite(
        "moderate", results, {"s": 0.1}, started=cands, entering="validate", keeps=frozenset(STAGE_INPUTS)
    )


STAGE_INPUTS = ("generated", "moderated", "validated")


def _taken(url: str, ids: list[str], owner: str, seconds: float = 60.0) -> dict[str, records.StagedCandidate]:
    """The checks of a slice started by ``owner``, who took the lease: its candidates as it holds them."""
    start = records.begin_stages(url, ids, CHECKS, max_attempts=3, claim=_claim(owner, seconds))
    return {c.id: c for c in start.todo}


def test_a_delivery_takes_the_lease_and_a_second_one_leaves_a_live_lease_to_its_holder(slice_ids):
    url, ids = slice_ids
    with session_scope(url) as s:
        s.execute(update(Candidate).where(Candidate.id.in_(ids)).values(status="generated"))
    first = records.begin_stages(url, ids, CHECKS, max_attempts=3, claim=_claim("cuda0@h pid 1"))
    assert first.token == 1 and {c.lease_token for c in first.todo} == {1}
    rows = _rows(url, ids)
    assert {(r.lease_token, r.lease_owner) for r in rows.values()} == {(1, "cuda0@h pid 1")}
    assert all(r.lease_expires_at > utcnow() + timedelta(seconds=50) for r in rows.values())

    # The same slice again (the kombu message back, a resume) while the holder renews: nothing is started.
    again = records.begin_stages(url, ids, CHECKS, max_attempts=3, claim=_claim("cuda1@h pid 2"))
    assert again.todo == [] and again.token is None and again.held_elsewhere == ids
    assert all(r.stage_attempts == {"moderate": 1} for r in _rows(url, ids).values()), "not counted"

    _expire(url, ids[:1])
    late = records.begin_stages(url, ids, CHECKS, max_attempts=3, claim=_claim("cuda1@h pid 2"))
    assert [c.id for c in late.todo] == ids[:1] and late.token == 2 and late.held_elsewhere == ids[1:]
    assert _rows(url, ids)[ids[0]].lease_owner == "cuda1@h pid 2"


def test_a_holder_whose_lease_was_taken_over_writes_nothing_and_the_new_holder_writes_once(slice_ids):
    url, ids = slice_ids
    with session_scope(url) as s:
        s.execute(update(Candidate).where(Candidate.id.in_(ids)).values(status="generated"))
    old = {
        c.id: c for c in records.begin_stages(url, ids, CHECKS, max_attempts=3, claim=_claim("a pid 1")).todo
    }
    _expire(url, ids)  # paused (SIGSTOP, a long GC) past its lease
    taken = records.take_expired_leases(url, utcnow())
    assert sorted(r.id for r in taken) == ids
    assert {r.lease_token for r in _rows(url, ids).values()} == {2}, "the reaper moved the generation on"
    assert records.renew_lease(url, ids, 1, seconds=60) == set(), "the old holder's renewal finds nothing"
    new = {
        c.id: c for c in records.begin_stages(url, ids, CHECKS, max_attempts=3, claim=_claim("b pid 2")).todo
    }
    assert {c.lease_token for c in new.values()} == {3}

    (late,) = records.apply_stages(url, [_moderated(old)])  # the old holder comes back
    assert late == [] and {c.status for c in old.values()} == {"generated"}, "refused: 0 rows"
    assert {r.status for r in _rows(url, ids).values()} == {"generated"}
    (written,) = records.apply_stages(url, [_moderated(new)])
    assert sorted(c.id for c in written) == ids
    rows = _rows(url, ids)
    assert {(r.status, r.lease_token) for r in rows.values()} == {("moderated", 3)}
    assert all(r.stage_attempts == {"moderate": 2, "validate": 1} for r in rows.values())


def test_a_renewal_extends_only_a_lease_still_held_and_a_write_that_leaves_the_task_releases_it(slice_ids):
    url, ids = slice_ids
    with session_scope(url) as s:
        s.execute(update(Candidate).where(Candidate.id.in_(ids)).values(status="generated"))
    cands = {
        c.id: c
        for c in records.begin_stages(url, ids, CHECKS, max_attempts=3, claim=_claim("a pid 1", 5)).todo
    }
    before = _rows(url, ids)
    assert records.renew_lease(url, ids, 1, seconds=600) == set(ids)
    after = _rows(url, ids)
    assert all(after[i].lease_expires_at > before[i].lease_expires_at + timedelta(seconds=500) for i in ids)
    assert all(after[i].updated_at == before[i].updated_at for i in ids), "a renewal is not progress"
    assert records.take_expired_leases(url, utcnow()) == [], "a renewed lease is not taken"

    results = {
        ids[0]: {"status": "moderated", "verdict": "passed"},
        ids[1]: {"status": "rejected", "verdict": "rejected", "reasons": ["nudenet: too much"]},
        ids[2]: records.failure("moderate", "boom"),
    }
    write = records.StageWrite(
        "moderate", results, {"s": 0.1}, started=cands, entering="validate", keeps=frozenset(STAGE_INPUTS)
    )
    records.apply_stages(url, [write])
    rows = _rows(url, ids)
    assert rows[ids[0]].lease_expires_at is not None, "still worked on by this task: still held"
    assert rows[ids[1]].lease_expires_at is None and rows[ids[2]].lease_expires_at is None, (
        "settled: released"
    )
    assert records.renew_lease(url, ids, 1, seconds=60) == {ids[0]}
    _expire(url, ids)
    assert [r.id for r in records.take_expired_leases(url, utcnow())] == [ids[0]], (
        "settled ones are not re-sent"
    )


def test_a_lease_of_a_process_of_this_host_that_is_gone_is_taken_at_once(slice_ids):
    url, ids = slice_ids
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    holder = owner_name(f"cuda0@{host}", dead.pid)
    records.begin_stages(url, ids, ("generate",), max_attempts=3, claim=_claim(holder))
    assert gone(holder), "a pool child killed on this host"
    assert not gone(f"cuda0@not-{host} pid {dead.pid}"), "another host's process cannot be seen: it runs out"
    assert not gone(f"cuda0@{host} pid 1"), "a live process keeps its lease"
    blind = _claim("cuda1@elsewhere pid 7")  # cannot tell: waits for the lease to run out
    assert records.begin_stages(url, ids, ("generate",), max_attempts=3, claim=blind).held_elsewhere == ids
    mine = records.Claim(owner=owner_name(f"cuda0@{host}"), seconds=60, gone=gone)
    start = records.begin_stages(url, ids, ("generate",), max_attempts=3, claim=mine)
    assert sorted(c.id for c in start.todo) == ids and start.token == 2


def test_a_holder_that_died_but_is_not_yet_reaped_is_gone():
    """Celery may requeue a killed pool child's message before the worker has reaped the child: a zombie
    holds no slice, and its lease is taken at once (seen once as a re-send by the reaper instead)."""
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while alive(zombie.pid):  # until it exits; nobody reaps it before the check
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert gone(owner_name(f"cuda0@{socket.gethostname()}", zombie.pid))
    finally:
        zombie.wait()


def test_a_holder_in_another_pid_namespace_of_this_host_is_never_taken_for_gone():
    """Review F10: containers sharing the host's network (hostNetwork) share its hostname, but each numbers
    its processes on its own; a pid missing here may be a live process of the other container. The owner
    names its pid namespace, and only a holder of this very namespace can be found gone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    assert gone(owner_name(f"cuda0@{host}", dead.pid))
    assert not gone(f"cuda0@{host} pid {dead.pid}"), "the namespace unknown: cannot tell"
    assert not gone(f"cuda0@{host} ns 4026531836.0000abcd pid {dead.pid}"), "another container's"


def test_a_delivery_whose_update_matched_no_row_holds_nothing_of_that_candidate(slice_ids, monkeypatch):
    """Review F2, on one connection: run one row at a time (the retry after a race), a guarded update that
    matches no row (another holder moved the candidate on after this delivery read it) must leave the
    candidate out of the claim; the delivery used to keep it, with the token, as a second holder."""
    url, ids = slice_ids
    records.begin_stages(url, ids, ("generate",), max_attempts=3, claim=_claim("a pid 1"))
    _expire(url, ids)
    write = records._write_guarded
    moved: list[str] = []

    def moved_meanwhile(conn, rows, one_by_one=False):
        # What another holder's committed write looks like to this transaction on PostgreSQL.
        bumped = update(Candidate).where(Candidate.id.in_(moved))
        conn.execute(bumped.values(lease_token=Candidate.lease_token + 5))
        return write(conn, rows, one_by_one=one_by_one)

    monkeypatch.setattr(records, "_write_guarded", moved_meanwhile)
    claim = _claim("b pid 2")
    for moved[:] in (ids[:1], ids):
        with get_engine(url).begin() as conn:
            start = records._begin(conn, ids, ("generate",), 3, None, claim, True)
            conn.rollback()
        held = [c.id for c in start.todo]
        assert held == [i for i in ids if i not in moved] and start.held_elsewhere == moved
        assert start.token == (2 if held else None), "a token only for what was written"


@pytest.mark.postgres
def test_two_deliveries_racing_the_reaper_on_postgresql_never_hold_one_generation_both(monkeypatch, tmp_path):
    """Review F2 as it happened on PostgreSQL, each party on its own connection and committing: the lease of
    a dead holder ran out; kombu's redelivery B reads it; the reaper takes it over (so B's batched update
    matches fewer rows and B runs again one row at a time); B reads the reaper's generation, and before its
    updates the reaper's re-send C takes the next one. B's updates match no row: B must hold nothing, not
    C's generation beside C."""
    url = pgutil.create_database("farm_lease_race")
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    monkeypatch.setenv("FARM_DATABASE_URL", url)
    try:
        migrate(url)
        manifest, items = dispatch.plan(MANIFEST, settings=load_settings())
        batch_id = dispatch.create_batch(manifest, items, MANIFEST, settings=load_settings()).batch_id
        with session_scope(url) as s:
            ids = sorted(s.scalars(select(Candidate.id).where(Candidate.batch_id == batch_id)))
        records.begin_stages(url, ids, ("generate",), max_attempts=3, claim=_claim("a pid 1"))
        _expire(url, ids)
        write, calls, other = records._write_guarded, [], []

        def meanwhile(conn, rows, one_by_one=False):
            calls.append(one_by_one)
            # The others' own writes go straight through.
            monkeypatch.setattr(records, "_write_guarded", write)
            if len(calls) == 1:
                assert len(records.take_expired_leases(url, utcnow())) == 3
            else:
                claim = _claim("c pid 3")
                other.append(records.begin_stages(url, ids, ("generate",), max_attempts=3, claim=claim))
            monkeypatch.setattr(records, "_write_guarded", meanwhile)
            return write(conn, rows, one_by_one=one_by_one)

        monkeypatch.setattr(records, "_write_guarded", meanwhile)
        b = records.begin_stages(url, ids, ("generate",), max_attempts=3, claim=_claim("b pid 2"))
        monkeypatch.setattr(records, "_write_guarded", write)
        (c,) = other
        assert calls == [False, True], "B raced the reaper, then ran one row at a time"
        assert sorted(x.id for x in c.todo) == ids and c.token == 3
        assert (b.todo, b.token, b.held_elsewhere) == ([], None, ids), "B holds nothing C holds"
        rows = _rows(url, ids)
        assert {(r.lease_token, r.lease_owner) for r in rows.values()} == {(3, "c pid 3")}
        assert all(r.stage_attempts == {"generate": 2} for r in rows.values()), "B counted nothing"
    finally:
        get_engine(url).dispose()
        pgutil.drop_database(url)


def test_a_lease_re_send_that_fails_is_sent_by_a_later_reaper_run_and_the_reap_goes_on(
    slice_ids, monkeypatch
):
    """Review F4: the reaper commits the takeover, then sends; a send that raised (the broker restarting)
    left the candidates with neither a lease nor a message, skipped the other items and aborted the reap.
    Now the reaper holds the taken lease until FARM_LEASE_SECONDS: the other items are sent, the rest of
    the reap runs, and a run after the hold ran out sends the failed item again."""
    from farm import reaper
    from farm.db import Batch

    url, _ = slice_ids
    settings = load_settings()
    two = MANIFEST.replace('  - "a kite"', '  - "a kite"\n  - "a boat"')
    manifest, items = dispatch.plan(two, settings=settings)
    batch_id = dispatch.create_batch(manifest, items, two, settings=settings).batch_id
    with session_scope(url) as s:
        by_item: dict[str, list[str]] = {}
        for c in s.scalars(select(Candidate).where(Candidate.batch_id == batch_id).order_by(Candidate.index)):
            by_item.setdefault(c.item_id, []).append(c.id)
        s.execute(update(Batch).where(Batch.id == batch_id).values(created_at=utcnow() - timedelta(hours=1)))
    first, second = sorted(by_item)
    for cids in by_item.values():
        records.begin_stages(url, cids, ("generate",), max_attempts=3, claim=_claim("cuda0@h pid 1"))
    _expire(url, [*by_item[first], *by_item[second]])
    sent: list[tuple[str, list[str]]] = []

    def broker(batch, item, cids, **kwargs):
        if not sent:
            sent.append(("failed", cids))
            raise ConnectionError("Error 111 connecting to redis: Connection refused")
        sent.append((item, cids))

    monkeypatch.setattr(dispatch, "send_item", broker)
    signatures: list[str] = []
    app = SimpleNamespace(
        signature=lambda name, **kw: SimpleNamespace(apply_async=lambda: signatures.append(name))
    )

    report = reaper.reap(app, settings, ignore_queues=True)
    assert sent == [("failed", by_item[first]), (second, by_item[second])] and report.leases == [second]
    assert report.redispatched == [batch_id] and signatures == ["farm.dispatch_batch"], "the reap went on"
    rows = _rows(url, [*by_item[first], *by_item[second]])
    assert {(rows[i].lease_owner, rows[i].lease_expires_at) for i in by_item[second]} == {(None, None)}
    assert {rows[i].lease_owner for i in by_item[first]} == {records.REAPER}

    assert reaper.resend_expired_leases(settings, utcnow()) == [], "held until the hold runs out"
    later = utcnow() + timedelta(seconds=settings.lease_seconds + 1)
    assert reaper.resend_expired_leases(settings, later) == [first]
    assert sent[-1] == (first, by_item[first])
    rows = _rows(url, by_item[first])
    assert {(r.lease_token, r.lease_owner, r.lease_expires_at) for r in rows.values()} == {(3, None, None)}
    claim = _claim("cuda1@h pid 2")
    start = records.begin_stages(url, by_item[first], ("generate",), max_attempts=3, claim=claim)
    assert len(start.todo) == 3 and start.token == 4
